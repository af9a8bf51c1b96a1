#!/usr/bin/env bash
# Builds a minimal container rootfs from Debian's busybox-static, for the
# container tests (agent/tests/containers.rs on the host, and inside the
# test initramfs that `make guest-test` builds).
#
#   scripts/busybox-rootfs.sh DIR
#
# Layout: /bin/busybox and one symlink per applet, /etc/passwd and
# /etc/group (root, a user 1000 with HOME /home/user, nobody), and the empty
# directories a container's mounts land on.
set -euo pipefail

die() { echo "busybox-rootfs: $*" >&2; exit 1; }

dest=${1:?usage: $0 DIR}
busybox=${BUSYBOX:-/bin/busybox}
[[ -x $busybox ]] || die "$busybox not found (apt-get install busybox-static)"
readelf -lW "$busybox" | grep -q 'Requesting program interpreter' && die "$busybox is not static"

mkdir -p "$dest"/{bin,etc,proc,sys,dev,run,root,home/user,tmp}
chmod 1777 "$dest/tmp"
chown 1000:1000 "$dest/home/user" 2>/dev/null || true
install -m 0755 "$busybox" "$dest/bin/busybox"
for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$dest/bin/$applet"
done
cat >"$dest/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$dest/etc/group" <<'GROUP'
root:x:0:
user:x:1000:
nogroup:x:65534:
GROUP
