#!/usr/bin/env bash
# Builds banger's guest image: OUT_DIR/{vmlinuz,initrd.img,rootfs.ext4,manifest.txt}.
#
# usage: scripts/build-image.sh [--cache DIR] [--userland debian|busybox] OUT_DIR AGENT_BINARY
#
#   vmlinuz      Debian's cloud kernel (linux-image-cloud-amd64, resolved to the real package).
#   initrd.img   busybox-static, the virtio/vsock modules and the agent; its /init names the
#                host, configures eth0, mounts root= and switch_roots to its /sbin/init, or, with
#                banger.init=agent (images without an agent: container images), makes the agent
#                PID 1 over it.
#   rootfs.ext4  --userland debian (the default image): Debian bookworm from Debian's packages
#                (mmdebstrap, minbase plus what a job expects: ca-certificates, curl, git, procps,
#                less, vim-tiny, iproute2, iputils-ping), 2 GiB; --userland busybox: busybox-
#                static only, 1 GiB. Both carry /usr/bin/banger-agent and a /sbin/init that names
#                the host (banger.hostname= on the kernel command line) and execs
#                `banger-agent --init` (no systemd on the way to ready). Built with
#                `mkfs.ext4 -d`, never mounted. The daemon boots each VM from an overlay of it.
#   manifest.txt package versions and sha256 of every artifact (shell-sourceable key=value).
#
# The .deb files are cached in --cache (default OUT_DIR/../cache); only `apt-get download`
# touches the network, and `apt-get update` runs only when apt does not know a package.
# Outputs are reproducible for the same inputs: fixed mtimes (SOURCE_DATE_EPOCH), fixed
# ext4 UUID and hash seed, E2FSPROGS_FAKE_TIME, `cpio --reproducible`, `gzip -n`.
# Needs root: the initramfs carries a /dev/console node, and ownership must be root's.
set -euo pipefail

# Modules the guest needs, in load order (each needs the ones before it).
readonly MODULES=(virtio_ring virtio virtio_mmio virtio_blk vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
	failover net_failover virtio_net virtio_console)
readonly KERNEL_META_PACKAGE=linux-image-cloud-amd64
readonly BUSYBOX_PACKAGE=busybox-static
# The Debian userland: minbase plus what a CI job expects.
readonly DEBIAN_SUITE=bookworm
readonly DEBIAN_PACKAGES=ca-certificates,curl,git,procps,less,vim-tiny,iproute2,iputils-ping,netbase
# Fixed identities keep rootfs.ext4 byte-for-byte reproducible.
readonly ROOTFS_UUID=6e2c3b1a-9d0f-4f7e-8b5a-62616e676572
readonly ROOTFS_HASH_SEED=0b7d8e2f-3c41-4a96-9e15-62616e676572
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200} # 2024-01-01T00:00:00Z
export LC_ALL=C TZ=UTC

die() {
	echo "build-image: $*" >&2
	exit 1
}
log() { echo "build-image: $*" >&2; }
usage() { sed -n '4p' "$0" | sed 's/^# //'; }

cache_dir=
userland=debian
positional=()
while [[ $# -gt 0 ]]; do
	case $1 in
	--cache)
		[[ $# -ge 2 ]] || die "--cache needs a directory"
		cache_dir=$2
		shift 2
		;;
	--cache=*)
		cache_dir=${1#--cache=}
		shift
		;;
	--userland)
		[[ $# -ge 2 ]] || die "--userland needs debian or busybox"
		userland=$2
		shift 2
		;;
	-h | --help)
		usage
		exit 0
		;;
	-*) die "unknown option $1 ($(usage))" ;;
	*)
		positional+=("$1")
		shift
		;;
	esac
done
[[ ${#positional[@]} -eq 2 ]] || die "$(usage)"
case $userland in
debian) readonly ROOTFS_SIZE=${ROOTFS_SIZE:-2G} ;;
busybox) readonly ROOTFS_SIZE=${ROOTFS_SIZE:-1G} ;;
*) die "--userland is debian or busybox, not $userland" ;;
esac

[[ $EUID -eq 0 ]] || die "must run as root (the initramfs needs a /dev/console node)"
for tool in apt-get apt-cache dpkg-deb cpio gzip mkfs.ext4 debugfs sha256sum ldd mknod; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ $userland != debian ]] || command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (make setup installs it)" 

agent=$(realpath -e "${positional[1]}") || die "agent binary ${positional[1]} not found"
[[ -f $agent && -x $agent ]] || die "agent binary $agent is not an executable file"
# The rootfs has no libc: a dynamically linked agent would fail at boot with an obscure error.
ldd "$agent" 2>&1 | grep -Eq 'statically linked|not a dynamic executable' ||
	die "agent binary $agent is not statically linked (build it with RUSTFLAGS='-C target-feature=+crt-static')"

mkdir -p "${positional[0]}"
out_dir=$(realpath "${positional[0]}")
cache_dir=${cache_dir:-$out_dir/../cache}
mkdir -p "$cache_dir"
cache_dir=$(realpath "$cache_dir")

# Staging lives next to the outputs so that the final mv is a rename on the same file system.
work=$(mktemp -d "$out_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

apt_updated=false
apt_update_once() {
	$apt_updated && return 1
	apt_updated=true
	log "apt does not know a package; running apt-get update"
	apt-get update -qq >&2
}

# Prints the candidate version of a package, or nothing if apt does not know it.
candidate_version() {
	apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'
}

# Downloads package $1 into the cache unless it is already there; prints the .deb's path.
fetch_deb() {
	local package=$1 version deb
	version=$(candidate_version "$package")
	if [[ -z $version ]]; then
		apt_update_once || true
		version=$(candidate_version "$package")
	fi
	if [[ -z $version ]]; then
		# Offline and without lists: fall back to the newest cached copy.
		deb=$(find "$cache_dir" -maxdepth 1 -name "${package}_*_amd64.deb" | sort -V | tail -n1)
		[[ -n $deb ]] || die "apt knows no package $package and none is cached in $cache_dir"
		log "apt knows no $package; using cached $(basename "$deb")"
		echo "$deb"
		return
	fi
	# apt-get download names files like this, with the epoch colon escaped.
	deb=$cache_dir/${package}_${version//:/%3a}_amd64.deb
	if [[ ! -s $deb ]]; then
		log "downloading $package $version"
		if ! (cd "$cache_dir" && apt-get download -qq "$package=$version" >&2); then
			apt_update_once || die "apt-get download $package=$version failed"
			(cd "$cache_dir" && apt-get download -qq "$package=$version" >&2) ||
				die "apt-get download $package=$version failed"
		fi
	fi
	[[ -s $deb ]] || die "apt-get download did not produce $deb"
	echo "$deb"
}

# The meta package only depends on the real, versioned kernel package.
resolve_kernel_package() {
	local package
	package=$(apt-cache depends "$KERNEL_META_PACKAGE" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
	if [[ -z $package ]] && apt_update_once; then
		package=$(apt-cache depends "$KERNEL_META_PACKAGE" 2>/dev/null |
			awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
	fi
	if [[ -z $package ]]; then
		# Offline: reuse whichever kernel is cached.
		package=$(find "$cache_dir" -maxdepth 1 -name 'linux-image-[0-9]*-cloud-amd64_*.deb' -printf '%f\n' |
			sort -V | tail -n1 | cut -d_ -f1)
	fi
	[[ -n $package ]] || die "cannot resolve $KERNEL_META_PACKAGE to a kernel package"
	echo "$package"
}

# Sets every mtime in a tree (symlinks included) to SOURCE_DATE_EPOCH.
clamp_mtimes() {
	find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

# Puts busybox in $1/bin with a symlink for each applet.
install_busybox() {
	local root=$1 applet
	install -D -m 0755 "$busybox" "$root/bin/busybox"
	for applet in $("$busybox" --list); do
		# The applet list includes busybox itself: a symlink would replace the binary.
		[[ $applet == busybox ]] && continue
		ln -sfn busybox "$root/bin/$applet"
	done
}

# --- packages -----------------------------------------------------------------------------
kernel_package=$(resolve_kernel_package)
kernel_deb=$(fetch_deb "$kernel_package")
busybox_deb=$(fetch_deb "$BUSYBOX_PACKAGE")
kernel_version=$(dpkg-deb -f "$kernel_deb" Version)
busybox_version=$(dpkg-deb -f "$busybox_deb" Version)

dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$busybox_deb" "$work/busybox"
busybox=$work/busybox/bin/busybox
[[ -x $busybox ]] || die "$BUSYBOX_PACKAGE has no bin/busybox"

mapfile -t releases < <(find "$work/kernel" -mindepth 3 -maxdepth 3 -path '*/lib/modules/*' -type d -printf '%f\n')
[[ ${#releases[@]} -eq 1 ]] || die "expected one kernel release in $kernel_package, found: ${releases[*]:-none}"
kernel_release=${releases[0]}
modules_dir=$(find "$work/kernel" -mindepth 3 -maxdepth 3 -path "*/lib/modules/$kernel_release" -type d)
vmlinuz=$work/kernel/boot/vmlinuz-$kernel_release
[[ -f $vmlinuz ]] || die "$kernel_package has no boot/vmlinuz-$kernel_release"
log "kernel $kernel_package $kernel_version ($kernel_release), busybox $busybox_version"

# --- initrd.img ---------------------------------------------------------------------------
initramfs=$work/initramfs
mkdir -p "$initramfs"/{dev,proc,sys,mnt,lib/modules}
install_busybox "$initramfs"
mknod -m 0600 "$initramfs/dev/console" c 5 1 # the kernel opens it for /init's stdio
install -D -m 0755 "$agent" "$initramfs/banger/banger-agent" # init over images without it
: >"$initramfs/lib/modules/load-order"
for module in "${MODULES[@]}"; do
	source_ko=$(find "$modules_dir" -name "$module.ko" -o -name "$module.ko.*" | head -n1)
	if [[ -z $source_ko ]]; then
		grep -q "/$module.ko\$" "$modules_dir/modules.builtin" 2>/dev/null ||
			die "module $module is neither shipped nor built into $kernel_release"
		continue # built in: nothing to load
	fi
	target=$initramfs/lib/modules/$module.ko
	case $source_ko in
	*.ko) cp "$source_ko" "$target" ;;
	*.ko.xz) xz -dc "$source_ko" >"$target" ;;
	*.ko.zst) zstd -qdc "$source_ko" >"$target" ;;
	*.ko.gz) gzip -dc "$source_ko" >"$target" ;;
	*) die "unknown module compression: $source_ko" ;;
	esac
	echo "$module" >>"$initramfs/lib/modules/load-order"
done

cat >"$initramfs/init" <<'EOF'
#!/bin/sh
# banger initramfs: load the virtio and vsock modules, name the host, configure eth0, mount
# the root disk, then start init on it:
#   - banger.init=agent: the root disk is an image that does not carry banger's agent (a
#     container image): the agent from this initramfs becomes PID 1 over it (it moves the
#     disk onto / itself); nothing is written into the image but /etc/resolv.conf when
#     banger.dns= is given;
#   - otherwise: switch_root to the disk's /sbin/init.
# The agent's key: /banger-agent.key (64 hex digits), put there by the host, in the agent's
# environment as BANGER_AGENT_KEY.
# Kernel command line: banger.hostname= (default "banger"), banger.ip=ADDR/PREFIX,
# banger.gw=ADDR, banger.dns=ADDR (bangerd serving <vm>.vm).
# Exiting is fatal on purpose: PID 1 dying panics the kernel, and with panic=-1 and QEMU's
# -no-reboot the VMM exits, which the daemon sees at once.
export PATH=/bin
fail() {
	echo "banger-initramfs: $*" >&2
	exit 1
}
# The agent's key for this boot, from an archive the host put before this one (never the
# kernel command line, which the host shows to all its users): handed to the agent in its
# environment, and off the file system before anything else runs.
if [ -f /banger-agent.key ]; then
	read -r BANGER_AGENT_KEY </banger-agent.key
	export BANGER_AGENT_KEY
	rm -f /banger-agent.key
fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
	insmod "/lib/modules/$module.ko" || fail "insmod $module failed"
done </lib/modules/load-order

root= init= name=banger address= gateway= nameserver=
set -f # the command line is split on spaces, never globbed
for arg in $(cat /proc/cmdline); do
	case $arg in
	root=*) root=${arg#root=} ;;
	banger.init=?*) init=${arg#banger.init=} ;;
	banger.hostname=?*) name=${arg#banger.hostname=} ;;
	banger.ip=?*) address=${arg#banger.ip=} ;;
	banger.gw=?*) gateway=${arg#banger.gw=} ;;
	banger.dns=?*) nameserver=${arg#banger.dns=} ;;
	esac
done
set +f

# The host name and the network are kernel state: they outlive switch_root.
hostname "$name" || echo "banger-initramfs: cannot set hostname $name" >&2
ip link set lo up
if [ -n "$address" ]; then
	ip addr add "$address" dev eth0 && ip link set eth0 up || echo "banger-initramfs: cannot configure eth0 with $address" >&2
	[ -z "$gateway" ] || ip route add default via "$gateway" || echo "banger-initramfs: cannot route via $gateway" >&2
fi

[ -n "$root" ] || fail "no root= on the kernel command line"
tries=0
while [ ! -b "$root" ]; do
	[ "$tries" -ge 50 ] && fail "root device $root did not appear within 5 s"
	sleep 0.1
	tries=$((tries + 1))
done
mount -t ext4 -o rw "$root" /mnt || fail "cannot mount $root"

if [ "$init" = agent ]; then
	# What a container runtime gives a container: /proc, /sys, /dev with pts and shm, and
	# the name server. Mount points an image lacks (one built FROM scratch) are made, as runc
	# and crun make them; what still fails is the agent's to report (it checks its root).
	for dir in proc sys dev; do
		[ -d "/mnt/$dir" ] || mkdir -m 0755 "/mnt/$dir" || echo "banger-initramfs: cannot make /$dir in the image" >&2
	done
	[ -d /mnt/proc ] && mount -t proc -o nosuid,nodev,noexec proc /mnt/proc
	[ -d /mnt/sys ] && mount -t sysfs -o nosuid,nodev,noexec sysfs /mnt/sys
	umount /proc /sys
	if [ -d /mnt/dev ]; then
		mount --move /dev /mnt/dev
		mkdir -p /mnt/dev/pts /mnt/dev/shm
		mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /mnt/dev/pts
		mount -t tmpfs -o nosuid,nodev,mode=1777 shm /mnt/dev/shm
	fi
	if [ -n "$nameserver" ] && [ -d /mnt/etc ] && [ ! -L /mnt/etc/resolv.conf ]; then
		printf 'nameserver %s\nsearch vm\n' "$nameserver" >/mnt/etc/resolv.conf
	fi
	export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	exec /banger/banger-agent --init --switch-root /mnt
	fail "cannot start the agent"
fi
umount /proc /sys
mount --move /dev /mnt/dev
exec switch_root /mnt /sbin/init
EOF
chmod 0755 "$initramfs/init"

clamp_mtimes "$initramfs"
(cd "$initramfs" && find . -mindepth 1 -print0 | sort -z |
	cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) |
	gzip -9 -n >"$work/initrd.img"

# --- rootfs.ext4 ---------------------------------------------------------------------------
# Writes banger's /sbin/init (as $1): it finishes the mounts, records the host name, makes a
# machine-id on a first boot, points resolv.conf at banger.dns=, then execs the agent.
write_init() {
cat >"$1" <<'EOF'
#!/bin/sh
# banger guest init: finish the mounts, record the host name the initramfs set, make a
# machine-id on a first boot, point resolv.conf at banger.dns= when given, then hand PID 1 to
# the agent, which reaps orphans.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Debian's busybox-static has no mountpoint applet; /proc/mounts answers the same question.
[ -e /proc/mounts ] || mount -t proc proc /proc
mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run

# The initramfs named the host and configured eth0 (banger.hostname=, banger.ip=, banger.gw=).
hostname >/etc/hostname
# Each VM's disk starts as a copy of the image: its first boot gives it its own machine-id
# (a clone of a snapshot is told a new one, written over this one).
[ -s /etc/machine-id ] || tr -d '-' </proc/sys/kernel/random/uuid >/etc/machine-id
nameserver=
set -f # the command line is split on spaces, never globbed
for arg in $(cat /proc/cmdline); do
	case $arg in banger.dns=?*) nameserver=${arg#banger.dns=} ;; esac
done
set +f
[ -z "$nameserver" ] || printf 'nameserver %s\nsearch vm\n' "$nameserver" >/etc/resolv.conf

exec /usr/bin/banger-agent --init
echo "init: cannot start /usr/bin/banger-agent" >&2
exit 1
EOF
chmod 0755 "$1"
}

build_busybox_rootfs() {
	local rootfs=$work/rootfs
	mkdir -p "$rootfs"/{dev,proc,sys,run,mnt,sbin,etc,usr/bin,usr/sbin,usr/local/bin,usr/local/sbin,var/log}
	install -d -m 1777 "$rootfs/tmp" "$rootfs/var/tmp"
	install -d -m 0700 "$rootfs/root"
	install_busybox "$rootfs"
	install -m 0755 "$agent" "$rootfs/usr/bin/banger-agent"
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
	printf 'root:x:0:\n' >"$rootfs/etc/group"
	printf 'banger\n' >"$rootfs/etc/hostname"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$rootfs/etc/hosts"
	write_init "$rootfs/sbin/init"

	clamp_mtimes "$rootfs"
	E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L root -U "$ROOTFS_UUID" \
		-E "hash_seed=$ROOTFS_HASH_SEED,root_owner=0:0" -d "$rootfs" "$work/rootfs.ext4" "$ROOTFS_SIZE" >/dev/null # it reports "Creating regular file" even with -q
	# mkfs.ext4 -d copies each file's ctime, which touch cannot set: pin them with debugfs.
	(cd "$rootfs" && find . -mindepth 1 | sort) >"$work/rootfs.paths"
	! grep -q '[[:space:]]' "$work/rootfs.paths" || die "rootfs paths must not contain spaces (debugfs commands)"
	sed -e 's|^\.|set_inode_field |' -e "s|\$| ctime @$SOURCE_DATE_EPOCH|" "$work/rootfs.paths" >"$work/ctime.debugfs"
	E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$work/ctime.debugfs" "$work/rootfs.ext4" >/dev/null 2>"$work/debugfs.log"
	! grep -v '^debugfs [0-9]' "$work/debugfs.log" | grep -q . || die "debugfs failed: $(head -n3 "$work/debugfs.log")"
}

# Debian's packages as mmdebstrap installs them, as a tar stream: built once per package
# list (cached; about a minute), then banger's two files are appended, and mkfs.ext4 reads
# the tar itself (e2fsprogs >= 1.47.1): every time comes from the tar (SOURCE_DATE_EPOCH).
build_debian_rootfs() {
	local key base extra=$work/debian-extra
	key=$(printf '%s %s %s' "$DEBIAN_SUITE" "$DEBIAN_PACKAGES" "$SOURCE_DATE_EPOCH" | sha256sum | cut -c1-12)
	base=$cache_dir/debian-userland-$DEBIAN_SUITE-$key.tar
	if [[ ! -s $base ]]; then
		log "building the Debian userland with mmdebstrap ($DEBIAN_SUITE, minbase + ${DEBIAN_PACKAGES//,/ }; about a minute)"
		mmdebstrap --quiet --variant=minbase --mode=root --format=tar --include="$DEBIAN_PACKAGES" \
			--customize-hook='echo banger >"$1/etc/hostname"' \
			--customize-hook='printf "127.0.0.1\tlocalhost\n::1\tlocalhost\n" >"$1/etc/hosts"' \
			--customize-hook='rm -f "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"' \
			"$DEBIAN_SUITE" "$base.partial" >&2 || die "mmdebstrap failed"
		mv "$base.partial" "$base"
	fi
	debian_version=$(tar -xOf "$base" ./etc/debian_version)
	# /sbin is a link to usr/sbin in bookworm: the files go where it points.
	mkdir -p "$extra/usr/sbin" "$extra/usr/bin"
	install -m 0755 "$agent" "$extra/usr/bin/banger-agent"
	write_init "$extra/usr/sbin/init"
	cp "$base" "$work/rootfs.tar"
	tar --append -f "$work/rootfs.tar" -C "$extra" --owner=0 --group=0 --numeric-owner \
		--mtime="@$SOURCE_DATE_EPOCH" ./usr/bin/banger-agent ./usr/sbin/init
	truncate -s "$ROOTFS_SIZE" "$work/rootfs.ext4"
	# libarchive needs a UTF-8 locale for names such as ca-certificates' Főtanúsítvány.crt.
	LC_ALL=C.UTF-8 E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L root -U "$ROOTFS_UUID" -b 4096 \
		-E "hash_seed=$ROOTFS_HASH_SEED,root_owner=0:0" -d "$work/rootfs.tar" "$work/rootfs.ext4" >/dev/null
	rm -f "$work/rootfs.tar"
}

debian_version=
case $userland in
debian) build_debian_rootfs ;;
busybox) build_busybox_rootfs ;;
esac

# --- outputs ------------------------------------------------------------------------------
cp "$vmlinuz" "$work/vmlinuz"
touch -d "@$SOURCE_DATE_EPOCH" "$work/vmlinuz" "$work/initrd.img" "$work/rootfs.ext4"
sha() { sha256sum "$1" | cut -d' ' -f1; }
cat >"$work/manifest.txt" <<EOF
# banger guest image, built by scripts/build-image.sh
kernel_package=$kernel_package
kernel_version=$kernel_version
kernel_release=$kernel_release
busybox_package=$BUSYBOX_PACKAGE
busybox_version=$busybox_version
userland=$userland
debian_suite=$([[ $userland == debian ]] && echo "$DEBIAN_SUITE")
debian_version=$debian_version
debian_packages=$([[ $userland == debian ]] && echo "$DEBIAN_PACKAGES")
modules="$(tr '\n' ' ' <"$initramfs/lib/modules/load-order" | sed 's/ $//')"
# The initramfs starts /banger/banger-agent over images that lack it (banger.init=agent).
initramfs_agent=1
source_date_epoch=$SOURCE_DATE_EPOCH
agent_sha256=$(sha "$agent")
vmlinuz_sha256=$(sha "$work/vmlinuz")
initrd_sha256=$(sha "$work/initrd.img")
rootfs_sha256=$(sha "$work/rootfs.ext4")
EOF
for artifact in vmlinuz initrd.img rootfs.ext4 manifest.txt; do
	mv -f "$work/$artifact" "$out_dir/$artifact"
done
log "wrote $out_dir/{vmlinuz,initrd.img,rootfs.ext4,manifest.txt}"
