#!/bin/sh
# plexilab-dockerd: start the guest's Docker engine (docker image variant).
#
# Run over SSH by the lab right after boot. Mounts the unified cgroup
# hierarchy (the PlexiLab init mounts none), hands every controller down to
# child cgroups, then starts dockerd in its own session with no bridge and no
# iptables rules: containers use the guest's host network or none. Waits
# until the engine answers; prints the guest uptime at that moment.
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
timeout=${1:-180}
log=/run/plexilab/dockerd.log

if ! grep -q '^cgroup2 /sys/fs/cgroup ' /proc/mounts; then
    mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup
fi
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
done

if ! docker version >/dev/null 2>&1; then
    mkdir -p /run/plexilab
    setsid dockerd \
        --host=unix:///var/run/docker.sock \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
        --storage-driver=overlay2 \
        --exec-opt native.cgroupdriver=cgroupfs \
        --log-level=warn \
        >"$log" 2>&1 </dev/null &
fi
n=$((timeout * 10))
until [ -S /var/run/docker.sock ] && docker version >/dev/null 2>&1; do
    n=$((n - 2))
    if [ $n -le 0 ]; then
        echo "dockerd did not answer within ${timeout}s" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    sleep 0.2
done
read -r up _ </proc/uptime
echo "$up"
