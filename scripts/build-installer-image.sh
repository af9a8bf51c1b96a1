#!/usr/bin/env bash
# Builds the husk node installer's container image as an OCI image archive
# (oci-layout, index.json, blobs/sha256/...; one uncompressed tar layer), with
# no container engine and no registry: `make installer-image` runs it.
#
# The image holds:
#   /opt/husk/...                   the installed tree (`make install
#                                   DESTDIR=<payload> PREFIX=/opt/husk`)
#   /husk-installer/configs/...     husk-install.sh and the containerd snippets
#   /bin/busybox and its applets    /bin/sh and the tools the script uses
#   /usr/local/bin/kubectl          optional, to label the node
#
# The archive is reproducible: the same inputs give the same image digest.
#
# Usage: scripts/build-installer-image.sh --payload DIR --out FILE
#            [--name REF] [--kubectl PATH|auto|none] [--busybox PATH]
#   --payload DIR  the tree `make install DESTDIR=DIR PREFIX=/opt/husk` wrote
#   --out FILE     where to write the archive
#   --name REF     the image name `ctr image import` gives it (default:
#                  docker.io/library/husk-installer:<workspace version>; CRI
#                  looks images up by fully qualified name)
#   --kubectl P    a statically linked kubectl to include; auto (default):
#                  kubectl from PATH if there is one; none: leave it out (the
#                  admin then labels nodes by hand)
#   --busybox P    a statically linked busybox (default /bin/busybox, from
#                  Debian's busybox-static)
set -euo pipefail
umask 022

die() {
    printf 'build-installer-image: error: %s\n' "$*" >&2
    exit 1
}
usage() {
    sed -n 's/^# \{0,1\}//; /^Usage:/,/^set -euo/p' "$0" | sed '$d' >&2
    exit 2
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
payload="" out="" name="" kubectl="auto" busybox="/bin/busybox"
while [ $# -gt 0 ]; do
    case "$1" in
        --payload) payload="${2:?--payload needs a directory}"; shift 2 ;;
        --out) out="${2:?--out needs a file}"; shift 2 ;;
        --name) name="${2:?--name needs an image reference}"; shift 2 ;;
        --kubectl) kubectl="${2:?--kubectl needs a path, auto or none}"; shift 2 ;;
        --busybox) busybox="${2:?--busybox needs a path}"; shift 2 ;;
        -h | --help) usage ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$payload" ] || die "--payload is required (a \`make install DESTDIR=... PREFIX=/opt/husk\` tree)"
[ -n "$out" ] || die "--out is required"

if [ -z "$name" ]; then
    version="$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$repo/Cargo.toml" | head -n 1)"
    [ -n "$version" ] || die "cannot read the workspace version from $repo/Cargo.toml"
    name="docker.io/library/husk-installer:$version"
fi
# The name goes into JSON unescaped: allow reference characters only.
[[ "$name" =~ ^[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9._-]+)*:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$ ]] ||
    die "--name $name is not an image reference with a tag (like registry.example/husk/husk-installer:0.1.0)"
tag="${name##*:}"

# The image has no libc: every binary in it must be static.
is_static() {
    command -v readelf >/dev/null || die "readelf (binutils) is needed to check that $1 is statically linked"
    readelf -h "$1" >/dev/null 2>&1 || return 1
    ! readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

[ -f "$busybox" ] || die "$busybox is missing: install Debian's busybox-static (or pass --busybox)"
is_static "$busybox" || die "$busybox is not a static binary: install Debian's busybox-static (or pass --busybox)"

case "$kubectl" in
    none) kubectl="" ;;
    auto)
        kubectl="$(command -v kubectl || true)"
        if [ -z "$kubectl" ]; then
            echo "build-installer-image: no kubectl on PATH: the image cannot label nodes; admins label them by hand (README.md: Kubernetes)" >&2
        else
            kubectl="$(readlink -f "$kubectl")"
            is_static "$kubectl" || die "kubectl ($kubectl) is not statically linked, so it cannot run in the image: pass --kubectl with a static one, or --kubectl none"
        fi
        ;;
    *)
        [ -f "$kubectl" ] || die "--kubectl $kubectl: no such file"
        is_static "$kubectl" || die "--kubectl $kubectl is not statically linked, so it cannot run in the image"
        ;;
esac

for f in bin/containerd-shim-husk-v2 bin/husk bin/husk-vmm share/husk/vmlinux share/husk/initrd.cpio share/husk/husk.toml; do
    [ -f "$payload/opt/husk/$f" ] || die "$payload/opt/husk/$f is missing: build the payload with \`make install DESTDIR=$payload PREFIX=/opt/husk\`"
done

work="$(mktemp -d "${TMPDIR:-/tmp}/husk-installer-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"

# --- the root filesystem -------------------------------------------------------
mkdir -p "$root"/{bin,etc,dev,proc,sys,run,root,host,husk-installer/configs/kubernetes,husk-installer/configs/containerd}
install -d -m 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
"$busybox" --list | while read -r applet; do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
cp -a "$payload/." "$root/"
install -m 0755 "$repo/configs/kubernetes/husk-install.sh" "$root/husk-installer/configs/kubernetes/husk-install.sh"
install -m 0644 "$repo/configs/containerd/husk-1.x.toml" "$repo/configs/containerd/husk-2.x.toml" \
    "$root/husk-installer/configs/containerd/"
if [ -n "$kubectl" ]; then
    install -D -m 0755 "$kubectl" "$root/usr/local/bin/kubectl"
fi
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"

# Fixed owner, order and times: the same tree gives the same bytes.
reproducible_tar() {
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu "$@"
}

# --- the OCI layout ----------------------------------------------------------------
layout="$work/layout"
blobs="$layout/blobs/sha256"
mkdir -p "$blobs"

# put FILE: stores FILE as a blob; sets `digest` and `size`.
put() {
    digest="sha256:$(sha256sum "$1" | cut -d' ' -f1)"
    size="$(stat -c %s "$1")"
    cp "$1" "$blobs/${digest#sha256:}"
}

reproducible_tar -C "$root" -cf "$work/layer.tar" .
put "$work/layer.tar"
layer_digest="$digest" layer_size="$size"

cat >"$work/config.json" <<EOF
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":["/husk-installer/configs/kubernetes/husk-install.sh"],"Cmd":["run"],"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"husk-installer","org.opencontainers.image.version":"$tag"}},"rootfs":{"type":"layers","diff_ids":["$layer_digest"]}}
EOF
put "$work/config.json"
config_digest="$digest" config_size="$size"

cat >"$work/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$config_digest","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$layer_digest","size":$layer_size}]}
EOF
put "$work/manifest.json"

cat >"$layout/index.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"$digest","size":$size,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"$tag"}}]}
EOF
printf '{"imageLayoutVersion":"1.0.0"}\n' >"$layout/oci-layout"

mkdir -p "$(dirname "$out")"
reproducible_tar -C "$layout" -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
echo "build-installer-image: wrote $out: $name, manifest $digest, layer $((layer_size / 1048576)) MiB${kubectl:+, with kubectl}"
