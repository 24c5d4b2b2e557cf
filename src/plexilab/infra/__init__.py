"""Infrastructure: what providers build on (imports only plexilab.host/deps/proc).

* ``buildsteps``: the cache root, content digests, lock files, build steps;
* ``images`` (guest images: profiles, recipes, rootfs, kernel, assembly),
  ``depsdisk`` (the guests' read-only dependency disk), ``setup_host``;
* ``wheels`` (per-arch wheel and wheelhouse builds), ``artifacts`` (the
  content-hashed artifact cache and ``dist/``);
* ``rundir`` (run directories, pidfiles, the reaper, the launcher thread),
  ``kvm`` (the KVM probe), ``qmp`` (QMP client), ``machine`` (one QEMU guest);
* ``sshclient`` (paramiko client, keys), ``leases`` (remote nodes die with
  the lab), ``ssh`` (``SSHHost``); ``links``, ``tlscerts``;
* ``engine``: the Docker engine, base images and the PlexiChat image.
"""
