#!/bin/sh
# husk node installer: puts husk's binaries, guest assets and default config
# on a Kubernetes node, registers the runtime handler `husk` with the node's
# containerd, checks the node with `husk check` and labels it for the husk
# RuntimeClass.
#
# The husk-installer DaemonSet (husk-installer.yaml) runs it in a privileged
# pod with hostPID and the host's directories mounted under $HOST_ROOT. Host
# commands (containerd, systemctl, husk check) run in PID 1's namespaces via
# nsenter, so they see the host as it is.
#
# Written for the installer image's shell (busybox ash); bash runs it too.
#
# Usage: husk-install.sh [run|install|uninstall]
#   run        install, then wait for SIGTERM (the DaemonSet's command);
#              on SIGTERM with HUSK_UNINSTALL=1, uninstall before exiting
#   install    install once and exit
#   uninstall  remove what install added and exit
#
# Environment (host paths are as seen on the host, without $HOST_ROOT):
#   HOST_ROOT           where the host's directories are mounted (/host)
#   HUSK_INSTALL_DIR    host install prefix (/opt/husk)
#   HUSK_BIN_DIR        host directory on containerd's PATH that gets the
#                       shim and husk symlinks (/usr/local/bin)
#   CONTAINERD_CONFIG   host containerd config (/etc/containerd/config.toml)
#   CONTAINERD_SERVICE  containerd's systemd unit (containerd)
#   HUSK_PAYLOAD        install tree in this image (/opt/husk)
#   HUSK_SNIPPETS       directory of husk-1.x.toml and husk-2.x.toml
#                       (../containerd next to this script)
#   NODE_NAME           this node, for the label (from the downward API)
#   HUSK_NODE_LABEL     label set to "true" once `husk check` passes
#                       (husk.io/runtime; the RuntimeClass selects it)
#   HUSK_UNINSTALL      1: uninstall on SIGTERM in `run` mode (0)
#   HUSK_READY_FILE     created when the node is ready, for the pod's
#                       readiness probe (/tmp/husk-ready)
#   HUSK_NSENTER        the nsenter to use (nsenter); tests point it at a
#                       stand-in, since busybox's shell runs its own applets
#                       before anything on PATH
# shellcheck shell=sh disable=SC3040 # pipefail: busybox ash and bash have it
set -euo pipefail

HOST_ROOT="${HOST_ROOT:-/host}"
HOST_ROOT="${HOST_ROOT%/}"
HUSK_INSTALL_DIR="${HUSK_INSTALL_DIR:-/opt/husk}"
HUSK_BIN_DIR="${HUSK_BIN_DIR:-/usr/local/bin}"
CONTAINERD_CONFIG="${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
CONTAINERD_SERVICE="${CONTAINERD_SERVICE:-containerd}"
HUSK_PAYLOAD="${HUSK_PAYLOAD:-/opt/husk}"
HUSK_SNIPPETS="${HUSK_SNIPPETS:-$(dirname "$0")/../containerd}"
NODE_NAME="${NODE_NAME:-}"
HUSK_NODE_LABEL="${HUSK_NODE_LABEL:-husk.io/runtime}"
HUSK_UNINSTALL="${HUSK_UNINSTALL:-0}"
HUSK_READY_FILE="${HUSK_READY_FILE:-/tmp/husk-ready}"
HUSK_NSENTER="${HUSK_NSENTER:-nsenter}"

# What `make install` puts under the prefix, with the modes it uses.
BINARIES="containerd-shim-husk-v2 husk husk-vmm"
ASSETS="vmlinux initrd.cpio husk.toml"
# The binaries put on PATH: the shim for containerd, husk for admins.
LINKED="containerd-shim-husk-v2 husk"

# Our block in containerd's config lies between these lines, so a re-run or
# an uninstall finds exactly what we added and nothing else.
BEGIN_MARK="# BEGIN husk (managed by husk-install.sh; do not edit, it is replaced on reinstall)"
END_MARK="# END husk"
# First line of a containerd config this script created on a node that had none.
CREATED_MARK="# Created by husk-install.sh: this node had no containerd config."

log() { printf 'husk-install: %s\n' "$*"; }
die() {
    printf 'husk-install: error: %s\n' "$*" >&2
    exit 1
}

# Runs a command on the host: in PID 1's mount, UTS, IPC, network and PID
# namespaces, where the host's binaries, files and systemd are.
on_host() { "$HUSK_NSENTER" -t 1 -m -u -i -n -p -- "$@"; }

# A host path as this container sees it.
host() { printf '%s%s' "$HOST_ROOT" "$1"; }

# check_path NAME VALUE: an absolute path free of characters that sed, TOML
# or the shell would read as syntax (these paths go into containerd's config).
check_path() {
    case "$2" in
        /*) ;;
        *) die "$1=$2 is not an absolute path" ;;
    esac
    if printf '%s' "$2" | grep -q '[^A-Za-z0-9._/+-]'; then
        die "$1=$2: only letters, digits and ._/+- may appear in it"
    fi
}

check_settings() {
    check_path HUSK_INSTALL_DIR "$HUSK_INSTALL_DIR"
    check_path HUSK_BIN_DIR "$HUSK_BIN_DIR"
    check_path CONTAINERD_CONFIG "$CONTAINERD_CONFIG"
    [ -d "$HOST_ROOT/" ] || die "HOST_ROOT=$HOST_ROOT is not a directory (is the host mounted?)"
}

check_payload() {
    for f in $BINARIES; do
        [ -f "$HUSK_PAYLOAD/bin/$f" ] || die "the image lacks $HUSK_PAYLOAD/bin/$f (HUSK_PAYLOAD=$HUSK_PAYLOAD)"
    done
    for f in $ASSETS; do
        [ -f "$HUSK_PAYLOAD/share/husk/$f" ] || die "the image lacks $HUSK_PAYLOAD/share/husk/$f (HUSK_PAYLOAD=$HUSK_PAYLOAD)"
    done
    for f in husk-1.x.toml husk-2.x.toml; do
        [ -f "$HUSK_SNIPPETS/$f" ] || die "the containerd snippet $HUSK_SNIPPETS/$f is missing (HUSK_SNIPPETS=$HUSK_SNIPPETS)"
    done
}

# install_file SRC DST MODE: replaces DST atomically (copy to a temporary
# name beside it, then rename), so a shim starting meanwhile sees either the
# old or the new binary, never half of one; running shims keep the old file.
install_file() {
    src="$1" dst="$2" mode="$3"
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        chmod "$mode" "$dst"
        return 0
    fi
    tmp="$dst.husk-new"
    cp "$src" "$tmp" || die "cannot copy $src to $tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dst" || die "cannot rename $tmp to $dst"
    log "installed ${dst#"$HOST_ROOT"}"
}

install_files() {
    prefix="$(host "$HUSK_INSTALL_DIR")"
    mkdir -p "$prefix/bin" "$prefix/share/husk" || die "cannot create $prefix/bin and $prefix/share/husk"
    for f in $BINARIES; do
        install_file "$HUSK_PAYLOAD/bin/$f" "$prefix/bin/$f" 0755
    done
    for f in $ASSETS; do
        install_file "$HUSK_PAYLOAD/share/husk/$f" "$prefix/share/husk/$f" 0644
    done
}

link_onto_path() {
    dir="$(host "$HUSK_BIN_DIR")"
    mkdir -p "$dir" || die "cannot create $dir"
    for name in $LINKED; do
        link="$dir/$name"
        target="$HUSK_INSTALL_DIR/bin/$name"
        if [ -L "$link" ]; then
            if [ "$(readlink "$link")" = "$target" ]; then
                continue
            fi
            log "replacing $HUSK_BIN_DIR/$name -> $(readlink "$link")"
        elif [ -e "$link" ]; then
            die "$HUSK_BIN_DIR/$name is a file, not the installer's symlink (from \`make install\`?): remove it, or set HUSK_BIN_DIR to another directory on containerd's PATH"
        fi
        ln -s "$target" "$link.husk-new" || die "cannot create $link.husk-new"
        mv -f "$link.husk-new" "$link" || die "cannot rename $link.husk-new to $link"
        log "linked $HUSK_BIN_DIR/$name -> $target"
    done
}

# --- containerd's config -----------------------------------------------------

# The major version of the host's containerd (1 or 2).
containerd_major() {
    out="$(on_host containerd --version 2>&1)" ||
        die "cannot run containerd on the host ($out): husk's installer supports containerd nodes only"
    # "containerd github.com/containerd/containerd v1.7.13 <commit>", or a
    # distribution's "containerd github.com/containerd/containerd 1.6.20~ds1 ...".
    version="$(printf '%s\n' "$out" | awk 'NR == 1 { print $3 }')"
    major="${version#v}"
    major="${major%%.*}"
    case "$major" in
        '' | *[!0-9]*) die "cannot tell containerd's version from: $out" ;;
    esac
    printf '%s' "$major"
}

# Prints FILE without our block (BEGIN_MARK..END_MARK) and without trailing
# blank lines, so base + one blank line + block is the same on every run.
strip_block() {
    awk -v begin="$BEGIN_MARK" -v end="$END_MARK" '
        $0 == begin { skip = 1; next }
        skip && $0 == end { skip = 0; next }
        skip { next }
        /^[ \t]*$/ { blank = blank $0 "\n"; next }
        { printf "%s%s\n", blank, $0; blank = "" }
    ' "$1"
}

# The `version = N` of a config (a top-level key: before the first table),
# or nothing.
config_version() {
    awk '
        /^[ \t]*\[/ { exit }
        /^[ \t]*version[ \t]*=/ {
            v = $0
            sub(/^[ \t]*version[ \t]*=[ \t]*/, "", v)
            sub(/[ \t]*(#.*)?$/, "", v)
            print v
            exit
        }
    ' "$1"
}

# has_runtime FILE PLUGIN NAME: does FILE declare a table of the CRI
# runtime NAME (an extended regex) of PLUGIN, such as
# [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]?
has_runtime() {
    p="$(printf '%s' "$2" | sed 's/\./\\./g')"
    s='[[:space:]]*'
    q="[\"']"
    grep -Eq "^${s}\\[${s}plugins${s}\\.${s}${q}${p}${q}${s}\\.${s}containerd${s}\\.${s}runtimes${s}\\.${s}${q}?($3)${q}?${s}[].]" "$1"
}

# Any runtime name, bare or quoted.
ANY_RUNTIME='[^].[:space:]]+'

# has_content FILE: anything but blank lines and comments?
has_content() { grep -Eqv '^[[:space:]]*(#.*)?$' "$1"; }

# Writes what CONTAINERD_CONFIG should hold to $1. Sets `plugin` and
# `snippet` for the version found.
render_config() {
    out="$1"
    cfg="$(host "$CONTAINERD_CONFIG")"
    major="$(containerd_major)"
    base="$out.base"
    if [ -f "$cfg" ]; then
        strip_block "$cfg" >"$base"
    else
        : >"$base"
    fi
    if ! has_content "$base"; then
        # No config, or only comments: containerd runs on its defaults. Give
        # it the version its own `containerd config default` would write.
        wanted=2
        if [ "$major" -ge 2 ]; then
            wanted=3
        fi
        {
            if [ -s "$base" ]; then
                cat "$base"
            else
                printf '%s\n' "$CREATED_MARK"
            fi
            printf 'version = %s\n' "$wanted"
        } >"$base.tmp"
        mv -f "$base.tmp" "$base"
        log "$CONTAINERD_CONFIG has no settings: writing a version $wanted config"
    fi
    version="$(config_version "$base")"
    case "$version" in
        2)
            plugin=io.containerd.grpc.v1.cri
            snippet="$HUSK_SNIPPETS/husk-1.x.toml"
            ;;
        3)
            [ "$major" -ge 2 ] || die "$CONTAINERD_CONFIG has version = 3, which containerd $major.x cannot read: fix the config first"
            plugin=io.containerd.cri.v1.runtime
            snippet="$HUSK_SNIPPETS/husk-2.x.toml"
            ;;
        '') die "$CONTAINERD_CONFIG has no \`version = \` line, so containerd reads it as version 1, which husk does not support: convert it to version 2 (containerd 1.6/1.7) or 3 (containerd 2.x; \`containerd config migrate\` does it)" ;;
        *) die "$CONTAINERD_CONFIG has version = $version: husk supports config versions 2 (containerd 1.6/1.7) and 3 (containerd 2.x)" ;;
    esac

    cp "$base" "$out"
    if has_runtime "$base" "$plugin" husk; then
        log "$CONTAINERD_CONFIG already declares the husk runtime outside the installer's block: leaving that as it is"
    else
        {
            printf '\n%s\n' "$BEGIN_MARK"
            # The snippet's tables without its comments, paths moved to the
            # install prefix.
            awk '/^[ \t]*(#.*)?$/ { next } /^[ \t]*\[/ && n++ { print "" } { print }' "$snippet" |
                sed "s|\"/usr/local/|\"$HUSK_INSTALL_DIR/|g"
            if ! has_runtime "$base" "$plugin" "$ANY_RUNTIME"; then
                # Declaring husk alone would replace containerd's built-in
                # runtime list and drop runc, the default runtime: then the
                # CRI plugin does not load and no pod starts on the node.
                printf '\n[plugins."%s".containerd.runtimes.runc]\n' "$plugin"
                printf '  runtime_type = "io.containerd.runc.v2"\n'
            fi
            printf '%s\n' "$END_MARK"
        } >>"$out"
    fi
    rm -f "$base"
}

# A free name for a backup of FILE: FILE.husk-backup-<UTC time>[.N].
backup_name() {
    name="$1.husk-backup-$(date -u +%Y%m%dT%H%M%SZ)"
    n=1
    candidate="$name"
    while [ -e "$candidate" ]; do
        candidate="$name.$n"
        n=$((n + 1))
    done
    printf '%s' "$candidate"
}

# config_changes NEW: does NEW differ from the current config?
config_changes() {
    cfg="$(host "$CONTAINERD_CONFIG")"
    ! { [ -f "$cfg" ] && cmp -s "$1" "$cfg"; }
}

# validate_config NEW: the host's containerd must accept NEW before it is
# put in place: a config containerd cannot read stops every pod on the node.
validate_config() {
    if ! err="$(on_host containerd --config "${1#"$HOST_ROOT"}" config dump 2>&1 >/dev/null)"; then
        rm -f "$1"
        die "containerd rejects the config husk would write, so $CONTAINERD_CONFIG is left as it was: $err"
    fi
}

# replace_config NEW: keeps a backup of the current config and renames NEW
# over it.
replace_config() {
    new="$1"
    cfg="$(host "$CONTAINERD_CONFIG")"
    if [ -f "$cfg" ]; then
        backup="$(backup_name "$cfg")"
        cp -p "$cfg" "$backup" || die "cannot back up $cfg to $backup"
        chmod "$(stat -c %a "$cfg")" "$new"
        log "saved the previous config as ${backup#"$HOST_ROOT"}"
    else
        backup=""
        chmod 0644 "$new"
    fi
    mv -f "$new" "$cfg" || die "cannot rename $new to $cfg"
}

# Restarts containerd for a changed config; if it does not come back, puts
# the previous config back and restarts again.
restart_containerd() {
    log "restarting $CONTAINERD_SERVICE"
    if on_host systemctl restart "$CONTAINERD_SERVICE"; then
        return 0
    fi
    cfg="$(host "$CONTAINERD_CONFIG")"
    if [ -n "$backup" ]; then
        mv -f "$backup" "$cfg"
    else
        rm -f "$cfg"
    fi
    on_host systemctl restart "$CONTAINERD_SERVICE" ||
        log "containerd does not start with the previous config either"
    die "$CONTAINERD_SERVICE did not restart with husk's config; the previous config is back in $CONTAINERD_CONFIG (see \`journalctl -u $CONTAINERD_SERVICE\` on the node)"
}

# Writes and validates the config containerd should have, before anything
# on the node changes: a config husk cannot extend stops the install here.
# Sets `config_changed`.
prepare_containerd_config() {
    cfg="$(host "$CONTAINERD_CONFIG")"
    mkdir -p "$(dirname "$cfg")" || die "cannot create $(dirname "$cfg")"
    render_config "$cfg.husk-new"
    config_changed=0
    if config_changes "$cfg.husk-new"; then
        validate_config "$cfg.husk-new"
        config_changed=1
    fi
}

# Puts the prepared config in place, once the files it names are there, and
# restarts containerd if it changed.
apply_containerd_config() {
    new="$(host "$CONTAINERD_CONFIG").husk-new"
    if [ "$config_changed" = 1 ]; then
        replace_config "$new"
        log "registered the runtime handler husk in $CONTAINERD_CONFIG ($plugin)"
        restart_containerd
    else
        rm -f "$new"
        log "$CONTAINERD_CONFIG already registers husk: containerd not restarted"
    fi
}

# --- readiness -----------------------------------------------------------------

# Runs `husk check` on the host with the config the runtime handler names.
node_check() {
    log "husk check:"
    if out="$(export HUSK_CONFIG="$HUSK_INSTALL_DIR/share/husk/husk.toml" &&
        on_host "$HUSK_INSTALL_DIR/bin/husk" check 2>&1)"; then
        printf '%s\n' "$out" | sed 's/^/    /'
        return 0
    fi
    printf '%s\n' "$out" | sed 's/^/    /'
    return 1
}

# label VALUE: sets the node label to VALUE, or removes it if VALUE is "-".
label() {
    if [ -z "$NODE_NAME" ]; then
        log "NODE_NAME is not set: not labeling the node"
        return 0
    fi
    if [ "$1" = - ]; then
        arg="$HUSK_NODE_LABEL-"
        what="removed the label $HUSK_NODE_LABEL from node $NODE_NAME"
    else
        arg="$HUSK_NODE_LABEL=$1"
        what="labeled node $NODE_NAME $arg"
    fi
    if ! command -v kubectl >/dev/null 2>&1; then
        log "this image has no kubectl: run \`kubectl label node $NODE_NAME $arg --overwrite\` yourself"
        return 0
    fi
    if ! kubectl label node "$NODE_NAME" "$arg" --overwrite >/dev/null; then
        log "cannot label node $NODE_NAME $arg (may the ServiceAccount patch nodes?)"
        return 1
    fi
    log "$what"
}

do_install() {
    check_settings
    check_payload
    prepare_containerd_config
    install_files
    link_onto_path
    apply_containerd_config
    if node_check; then
        label true || die "the node is installed but not labeled; running the installer again is safe"
        : >"$HUSK_READY_FILE"
        log "node ready for runtimeClassName: husk"
    else
        rm -f "$HUSK_READY_FILE"
        label - || die "cannot remove the label of a node that fails husk check"
        log "husk check failed: the node is not labeled $HUSK_NODE_LABEL=true, so no husk pod is scheduled here"
    fi
}

# --- uninstall -------------------------------------------------------------------

do_uninstall() {
    check_settings
    rm -f "$HUSK_READY_FILE"
    # Go on without the API (its ServiceAccount may be deleted already): the
    # label is then left for the admin to remove.
    label - || log "remove the label yourself: kubectl label node $NODE_NAME $HUSK_NODE_LABEL-"
    cfg="$(host "$CONTAINERD_CONFIG")"
    if [ -f "$cfg" ] && grep -qxF "$BEGIN_MARK" "$cfg"; then
        new="$cfg.husk-new"
        strip_block "$cfg" >"$new"
        if [ "$(head -n 1 "$new")" = "$CREATED_MARK" ] &&
            [ "$(grep -Ev '^[[:space:]]*(#.*)?$' "$new")" = "$(grep -E '^version' "$new" | head -n 1)" ]; then
            # We created the file and nothing but its version is left in it.
            backup="$(backup_name "$cfg")"
            mv -f "$cfg" "$backup"
            rm -f "$new"
            log "removed $CONTAINERD_CONFIG, which the installer had created (saved as ${backup#"$HOST_ROOT"})"
        else
            validate_config "$new"
            replace_config "$new"
            log "removed husk from $CONTAINERD_CONFIG"
        fi
        restart_containerd
    fi
    dir="$(host "$HUSK_BIN_DIR")"
    for name in $LINKED; do
        if [ -L "$dir/$name" ] && [ "$(readlink "$dir/$name")" = "$HUSK_INSTALL_DIR/bin/$name" ]; then
            rm -f "$dir/$name"
        fi
    done
    # Only the files install put there: the prefix may be shared (/usr/local).
    prefix="$(host "$HUSK_INSTALL_DIR")"
    for f in $BINARIES; do rm -f "$prefix/bin/$f"; done
    for f in $ASSETS; do rm -f "$prefix/share/husk/$f"; done
    for d in "$prefix/share/husk" "$prefix/share" "$prefix/bin" "$prefix"; do
        rmdir "$d" 2>/dev/null || true
    done
    log "uninstalled husk from this node"
}

# --- run -----------------------------------------------------------------------------

sleeper=""
on_term() {
    [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null || true
    if [ "$HUSK_UNINSTALL" = 1 ]; then
        log "SIGTERM with HUSK_UNINSTALL=1: uninstalling"
        do_uninstall
    else
        log "SIGTERM: leaving husk installed (set HUSK_UNINSTALL=1 to remove it with the DaemonSet)"
    fi
    exit 0
}

do_run() {
    trap on_term TERM INT
    do_install
    log "waiting; HUSK_UNINSTALL=$HUSK_UNINSTALL"
    # A DaemonSet's pod must keep running. Sleep in the background and wait,
    # so SIGTERM interrupts the wait at once.
    while :; do
        sleep 3600 &
        sleeper=$!
        wait "$sleeper" || true
    done
}

cleanup() {
    cfg="$(host "$CONTAINERD_CONFIG")"
    rm -f "$cfg.husk-new" "$cfg.husk-new.base" "$cfg.husk-new.base.tmp"
}
trap cleanup EXIT

case "${1:-run}" in
    run) do_run ;;
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "unknown command ${1}: use run, install or uninstall" ;;
esac
