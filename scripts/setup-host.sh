#!/usr/bin/env bash
# Installs the Debian packages that building husk, `make demo` and `make test`
# need. Idempotent: a machine that has them all is left alone (no apt-get run,
# no root needed). Called by `make demo`, `make test` and `.ci/run`, so a fresh
# machine needs nothing else.
#
# As root it runs apt-get itself; otherwise through `sudo -n` when that works
# without a password; otherwise it stops with the exact command to run.
#
# Usage: scripts/setup-host.sh [--check]   (--check: only report what is missing)
set -euo pipefail

packages=(
    linux-source-6.1 flex bison bc libelf-dev libssl-dev make gcc   # guest kernel
    cpio file                                                       # initramfs
    libseccomp-dev pkg-config                                       # agent (static libseccomp)
    qemu-system-x86                                                 # side-by-side benchmarks
    containerd runc containernetworking-plugins iproute2            # containerd / CRI tests
    protobuf-compiler busybox-static                                # CRI protos, test images
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "${1:-}" = "--check" ]; then
    echo "setup-host: missing Debian packages: ${missing[*]}" >&2
    exit 1
fi

install_cmd="apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${missing[*]}"
if [ "$(id -u)" = 0 ]; then
    run=(bash -c)
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run=(sudo -n bash -c)
else
    echo "setup-host: these Debian packages are missing: ${missing[*]}" >&2
    echo "setup-host: install them as root, then run make again:" >&2
    echo "    sudo sh -c '$install_cmd'" >&2
    exit 1
fi
echo "setup-host: installing ${missing[*]}" >&2
"${run[@]}" "$install_cmd"
