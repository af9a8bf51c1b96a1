#!/usr/bin/env bash
# Installs the Debian packages that building husk, `make demo` and `make test`
# need. Idempotent: a machine that has them all is left alone (no apt-get run,
# no root needed). Called by `make demo`, `make test` and `.ci/run`, so a fresh
# machine needs nothing else.
#
# As root it runs apt-get itself; otherwise through `sudo -n` when that works
# without a password; otherwise it stops with the exact command to run.
#
# It also makes sure rustup has the toolchain rust-toolchain.toml pins (see
# ensure_toolchain below).
#
# Usage: scripts/setup-host.sh [--check | --toolchain]
#   --check: only report what is missing
#   --toolchain: only the Rust toolchain (what the Makefile's cargo targets need)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
toolchain_file="$repo/rust-toolchain.toml"

# The pinned toolchain, e.g. 1.95.0: the one place it is written is
# rust-toolchain.toml.
pinned_toolchain() {
    sed -n 's/^[[:space:]]*channel[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$toolchain_file"
}

# rustup resolves rust-toolchain.toml by name, and a fresh machine knows its
# one toolchain only as `stable`. Idempotent: when rustup already has the
# pinned name nothing happens. Else a `stable` of exactly that version is
# linked under the pinned name (no download); else rustup installs it; else
# this says which file to change. Without rustup, a rustc of that version
# on PATH is enough.
ensure_toolchain() {
    local want have
    want=$(pinned_toolchain)
    if [ -z "$want" ]; then
        echo "setup-host: no channel = \"...\" in $toolchain_file" >&2
        return 1
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        have=$(rustc --version 2>/dev/null | awk '{print $2}')
        [ "$have" = "$want" ] && return 0
        echo "setup-host: rustup is missing and rustc is ${have:-missing}, not $want;" >&2
        echo "setup-host: install rustup, or change channel in $toolchain_file" >&2
        return 1
    fi
    rustup run "$want" rustc --version >/dev/null 2>&1 && return 0
    if [ "${1:-}" = "--check" ]; then
        echo "setup-host: rustup has no toolchain $want (pinned in $toolchain_file)" >&2
        return 1
    fi
    have=$(rustc +stable --version 2>/dev/null | awk '{print $2}')
    if [ "$have" = "$want" ]; then
        # `rustup toolchain link` refuses a name that looks like a release
        # ("invalid custom toolchain name"), so the link is made the way
        # rustup stores toolchains: toolchains/<name>-<host> -> stable's sysroot.
        local host dir
        host=$(rustc +stable -vV | sed -n 's/^host: //p')
        dir="${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$want-$host"
        echo "setup-host: linking rustup's stable ($have) as toolchain $want" >&2
        ln -sfn "$(rustc +stable --print sysroot)" "$dir"
        if rustup run "$want" rustc --version >/dev/null 2>&1; then
            return 0
        fi
        echo "setup-host: $dir does not work as toolchain $want" >&2
    fi
    echo "setup-host: installing Rust toolchain $want (pinned in $toolchain_file)" >&2
    if rustup toolchain install "$want" --profile minimal --component rustfmt clippy; then
        return 0
    fi
    echo "setup-host: cannot install Rust toolchain $want (stable here is ${have:-missing});" >&2
    echo "setup-host: install it with rustup, or change channel in $toolchain_file to a toolchain this machine has" >&2
    return 1
}

# Sourced (e.g. to test ensure_toolchain): define the functions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

ensure_toolchain "${1:-}"
[ "${1:-}" = "--toolchain" ] && exit 0

packages=(
    linux-source-6.1 flex bison bc libelf-dev libssl-dev make gcc   # guest kernel
    cpio file                                                       # initramfs
    libseccomp-dev pkg-config                                       # agent (static libseccomp)
    qemu-system-x86                                                 # side-by-side benchmarks
    containerd runc containernetworking-plugins iproute2            # containerd / CRI tests
    iptables                                                        # port-forward, portmap
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
