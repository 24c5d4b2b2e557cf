#!/bin/sh
# PlexiLab guest init: PID 1 of every guest (no systemd, no udev, no initramfs).
#
# Mounts the kernel file systems, loads the few modules the cloud kernel keeps
# as modules, unpacks the per-node seed (SSH host key, authorized_keys,
# hostname, node files) from fw_cfg into /run/plexilab/seed, configures eth0 for
# QEMU user networking, starts sshd and then reaps orphans until asked to power
# off (`plexilab-poweroff`, i.e. SIGUSR2 to PID 1). Per-node secrets never live
# in the shared base image: the seed is on a tmpfs.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

log() { echo "plexilab-init: $*" >/dev/console; }

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=755,nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
exec </dev/console >/dev/console 2>&1

# Modules, dependencies first (generated at image build).
while read -r module; do
    insmod "$module" 2>/dev/null
done </etc/plexilab/modules.order

seed=/run/plexilab/seed
mkdir -p "$seed"
chmod 700 /run/plexilab "$seed"
raw=/sys/firmware/qemu_fw_cfg/by_name/opt/plexilab/seed/raw
if [ -r "$raw" ]; then
    tar -x -o -C "$seed" -f "$raw" || log "seed: unpacking failed"
else
    log "seed: $raw missing (no -fw_cfg name=opt/plexilab/seed)"
fi

# Optional read-only disk with pre-installed runtime dependencies (virtio-blk).
if [ -b /dev/vda ]; then
    mkdir -p /opt/plexichat-deps
    mount -o ro /dev/vda /opt/plexichat-deps || log "deps disk: mount failed"
fi

name=plexilab
[ -s "$seed/hostname" ] && read -r name <"$seed/hostname"
echo "$name" >/proc/sys/kernel/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" >/etc/hosts

# QEMU user networking defaults; the seed may override them (network.env).
ADDRESS=10.0.2.15/24
GATEWAY=10.0.2.2
[ -r "$seed/network.env" ] && . "$seed/network.env"
ip link set lo up
ip link set eth0 up
ip addr add "$ADDRESS" dev eth0
ip route add default via "$GATEWAY"

mkdir -p /run/sshd
chmod 755 /run/sshd
if [ -s "$seed/ssh_host_ed25519_key" ]; then
    # -r: no re-exec per connection (each exec costs a lot under TCG).
    /usr/sbin/sshd -r -f /etc/plexilab/sshd_config -E /run/plexilab/sshd.log ||
        log "sshd failed: $(cat /run/plexilab/sshd.log)"
else
    log "no SSH host key in the seed: sshd not started"
fi
read -r up _ </proc/uptime
log "ready after ${up}s (hostname $name)"

poweroff() {
    log "powering off"
    kill -TERM -1 2>/dev/null
    sleep 1
    kill -KILL -1 2>/dev/null
    sync
    mount -o remount,ro / 2>/dev/null
    echo o >/proc/sysrq-trigger
    sleep 10
}
trap poweroff USR2 TERM

# PID 1 must stay alive and reap orphans: `wait` collects any child.
while :; do
    sleep 3600 &
    wait $!
done
