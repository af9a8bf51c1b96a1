#!/usr/bin/env bash
# Builds the guest initramfs: an uncompressed newc cpio whose /init is the
# static husk-agent.
#
#   scripts/build-initrd.sh AGENT_BINARY OUTPUT_CPIO [EXTRA_DIR]
#
# EXTRA_DIR, if given, is copied into the image root as it is (e.g. the
# busybox rootfs of the container tests: `make guest-test`).
#
# Uncompressed on purpose: unpacking gzip costs ~26 s of emulated kernel
# time on a nested-KVM host, and a compressed initrd gains nothing on a
# local disk. The archive is reproducible: sorted names, fixed mtimes
# (SOURCE_DATE_EPOCH, default 0), owner 0:0, GNU cpio --reproducible.
#
# Layout: /init (the agent, stripped unless HUSK_INITRD_STRIP=0), empty
# /proc /sys /run /tmp /etc, and /dev with two device nodes, both required:
# /dev/console (5:1), which the kernel opens as init's fds 0-2, and /dev/null
# (1:3), which Rust's runtime opens instead if that failed (it aborts
# before main when it cannot, and PID 1 aborting panics the kernel). Nodes
# need root; as another user the script re-runs itself under fakeroot.
#
# Needs: GNU cpio, readelf (binutils), file, root or fakeroot; strip optionally.
set -euo pipefail

die() { echo "build-initrd: $*" >&2; exit 1; }

[[ $# -eq 2 || $# -eq 3 ]] || die "usage: $0 AGENT_BINARY OUTPUT_CPIO [EXTRA_DIR]"
agent=$1
output=$2
extra=${3:-}
[[ -z $extra || -d $extra ]] || die "extra directory $extra does not exist"

for tool in cpio readelf file; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install cpio binutils file)"
done
cpio --version 2>/dev/null | grep -q 'GNU cpio' || die "GNU cpio required (for --reproducible)"

build_hint="RUSTFLAGS='-C target-feature=+crt-static' LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu cargo build --release --target x86_64-unknown-linux-gnu -p husk-agent"
[[ -f $agent ]] || die "agent binary $agent does not exist; build it with: $build_hint"
[[ -x $agent ]] || die "agent binary $agent is not executable"

# Static means: no program interpreter and no shared-library dependencies.
# `file` wording varies across versions, so readelf decides and file is
# only shown.
description=$(file -b "$agent")
[[ $description == ELF\ 64-bit* ]] || die "$agent is not a 64-bit ELF: $description"
if readelf -lW "$agent" | grep -q 'Requesting program interpreter'; then
    die "$agent is dynamically linked (has a program interpreter): $description; build it with: $build_hint"
fi
if readelf -dW "$agent" | grep -q '(NEEDED)'; then
    die "$agent needs shared libraries: $(readelf -dW "$agent" | grep '(NEEDED)' | tr -s ' ')"
fi

# A device node needs root; fakeroot fakes it for the cpio that follows.
if [[ $(id -u) -ne 0 && -z ${HUSK_INITRD_UNDER_FAKEROOT:-} ]] && command -v fakeroot >/dev/null; then
    HUSK_INITRD_UNDER_FAKEROOT=1 exec fakeroot -- "$0" "$@"
fi

epoch=${SOURCE_DATE_EPOCH:-0}
staging=$(mktemp -d "${TMPDIR:-/tmp}/husk-initrd.XXXXXX")
tmp_output="$output.tmp.$$"
trap 'rm -rf "$staging" "$tmp_output"' EXIT

install -m 0755 "$agent" "$staging/init"
if [[ ${HUSK_INITRD_STRIP:-1} != 0 ]] && command -v strip >/dev/null; then
    # Every byte is copied by emulated kernel code at boot.
    strip --strip-all "$staging/init"
fi
for dir in dev proc sys run etc; do
    mkdir -m 0755 "$staging/$dir"
done
mkdir -m 1777 "$staging/tmp"
mknod -m 0600 "$staging/dev/console" c 5 1 && mknod -m 0666 "$staging/dev/null" c 1 3 ||
    die "cannot create /dev/console and /dev/null: run as root or install fakeroot"
if [[ -n $extra ]]; then
    cp -a "$extra/." "$staging/"
fi


find "$staging" -exec touch -h -d "@$epoch" {} +

mkdir -p "$(dirname "$output")"
(
    cd "$staging"
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio --create --format=newc --owner=0:0 --reproducible --quiet
) >"$tmp_output"
mv -f "$tmp_output" "$output"

echo "build-initrd: $output ($(stat -c %s "$output") bytes), /init: $(file -b "$staging/init")"
