#!/usr/bin/env bash
# Builds the husk guest kernel (vmlinux) from Debian's linux-source-6.1, with
# configs/guest/kernel.config on top of tinyconfig and configs/guest/patches/*.
#
# The build takes ~10 minutes on 2 cores, so its result is cached outside the
# repository under $HUSK_CACHE (default ~/.cache/husk), keyed by the source
# package version, the config fragment, the patches and this script: an
# unchanged kernel is never rebuilt.
#
# Usage: scripts/build-kernel.sh OUTPUT_VMLINUX
set -euo pipefail

out=${1:?usage: $0 OUTPUT_VMLINUX}
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${HUSK_CACHE:-$HOME/.cache/husk}
tarball=/usr/src/linux-source-6.1.tar.xz

if [ ! -f "$tarball" ]; then
    echo "build-kernel: $tarball not found; install Debian's linux-source-6.1 (or run .ci/run)" >&2
    exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)

key=$( { echo "linux-source-6.1 $src_version"
         cat "$repo/configs/guest/kernel.config"
         cat "$repo"/configs/guest/patches/*.patch
         cat "$0"; } | sha256sum | cut -c1-16)
cached="$cache/kernel/$key"

if [ ! -f "$cached/vmlinux" ]; then
    echo "build-kernel: building guest kernel $key (cache miss; ~10 min)" >&2
    work="$cache/kernel/build-$key.$$"
    rm -rf "$work"
    mkdir -p "$work"
    trap 'rm -rf "$work"' EXIT
    tar -C "$work" -xf "$tarball"
    tree="$work/linux-source-6.1"
    for p in "$repo"/configs/guest/patches/*.patch; do
        patch -d "$tree" -p1 --quiet < "$p"
    done
    make -C "$tree" -s ARCH=x86_64 tinyconfig
    (cd "$tree" && ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config "$repo/configs/guest/kernel.config" >/dev/null)
    make -C "$tree" -s ARCH=x86_64 olddefconfig
    # Every line of the fragment must have survived olddefconfig: a symbol
    # that Kconfig silently dropped means the guest lacks what we asked for.
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$tree/.config" || { echo "build-kernel: not in final .config: $line" >&2; missing=1; } ;;
            "# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *}
                if grep -q "^$sym=" "$tree/.config"; then echo "build-kernel: still enabled: $sym" >&2; missing=1; fi ;;
        esac
    done < "$repo/configs/guest/kernel.config"
    [ "$missing" = 0 ] || { echo "build-kernel: config fragment not applied" >&2; exit 1; }
    make -C "$tree" -s ARCH=x86_64 -j"$(nproc)" vmlinux
    mkdir -p "$cached.tmp"
    cp "$tree/vmlinux" "$tree/.config" "$cached.tmp/"
    # --no-print-directory: under a parent make (MAKEFLAGS has w) the
    # "Entering directory" lines would land in the release file.
    make --no-print-directory -C "$tree" -s ARCH=x86_64 kernelrelease > "$cached.tmp/release"
    rm -rf "$cached"
    mv "$cached.tmp" "$cached"
fi

mkdir -p "$(dirname "$out")"
cp "$cached/vmlinux" "$out"
cp "$cached/release" "$(dirname "$out")/kernel-release"
echo "build-kernel: $out ($(cat "$cached/release"), cache $key)" >&2
