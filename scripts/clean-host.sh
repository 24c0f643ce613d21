#!/usr/bin/env bash
# `make clean-host`: removes what banger leaves on this host outside a checkout, so that the
# next run sees what a fresh host sees. Run as root. It stops banger's processes by PID (the
# daemon named by the default state dir's lock, the processes in banger's cgroups), never by
# name, then removes:
#   - the default state dir /var/lib/banger (VMs, images, snapshots, jails, the database),
#     with the loop and device-mapper devices over its files,
#   - the runtime dir /run/banger (socket, autostarted daemon's log) and the memory dir
#     /dev/shm/banger,
#   - the installed images /usr/local/share/banger/images/{default,busybox}, and the cache
#     /var/cache/banger (what `accel = "auto"` found when it booted a kernel under KVM),
#   - banger's cgroups (`banger` under each hierarchy), its taps (bgtapN), the bridge of
#     network = "auto" (banger0), its nftables
#     tables (`banger`, in the ip and bridge families) and the network namespaces its tests
#     make (banger-test-*, banger-e2e-*).
# Packages and tools `make setup` installed stay. A daemon with another state dir is not
# touched: stop it first.
set -uo pipefail

readonly STATE_DIR=/var/lib/banger
readonly RUN_DIR=/run/banger
readonly MEMORY_DIR=/dev/shm/banger
readonly IMAGE_DIR=${DEFAULT_IMAGE_DIR:-/usr/local/share/banger/images/default}
readonly BUSYBOX_IMAGE_DIR=${BUSYBOX_IMAGE_DIR:-$(dirname "$IMAGE_DIR")/busybox}
readonly CACHE_DIR=/var/cache/banger

log() { echo "clean-host: $*" >&2; }

if [[ $(id -u) != 0 ]]; then
	echo "clean-host: run as root (banger's host state is root's)" >&2
	exit 1
fi

# Kills PID and waits for it to be gone (a zombie counts as gone).
stop_pid() {
	local pid=$1 what=$2
	[[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]] || return 0
	log "stopping $what (pid $pid)"
	kill -KILL "$pid" 2>/dev/null
	for _ in $(seq 50); do
		[[ -d /proc/$pid && $(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 0
		sleep 0.1
	done
	log "pid $pid did not exit"
}

# The daemon of the default state dir: the lock file names it, and it holds the lock open.
lock=$STATE_DIR/bangerd.lock
if [[ -f $lock ]]; then
	pid=$(tr -dc '0-9' <"$lock")
	if [[ -n $pid ]] && ls -l "/proc/$pid/fd" 2>/dev/null | grep -qF -- "-> $lock"; then
		stop_pid "$pid" "bangerd of $STATE_DIR"
	fi
fi

# Every process in banger's cgroups (VMMs, vsock backends), then the cgroups, deepest first.
for hierarchy in /sys/fs/cgroup /sys/fs/cgroup/*; do
	group=$hierarchy/banger
	[[ -d $group ]] || continue
	while read -r procs; do
		while read -r pid; do
			stop_pid "$pid" "a process in $(dirname "$procs")"
		done <"$procs"
	done < <(find "$group" -name cgroup.procs 2>/dev/null)
	find "$group" -depth -type d -exec rmdir {} + 2>/dev/null
	[[ -d $group ]] && log "could not remove $group" || log "removed $group"
done

# Any process still running from the state dir or the memory dir (a VMM outside a cgroup).
for proc in /proc/[0-9]*; do
	exe=$(readlink "$proc/exe" 2>/dev/null) || continue
	cmdline=$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null)
	case "$exe $cmdline" in
	*"$STATE_DIR/"* | *"$MEMORY_DIR/"*) stop_pid "${proc#/proc/}" "a process of banger's ($exe)" ;;
	esac
done

# Device-mapper snapshots and loop devices over the state dir's files.
if command -v dmsetup >/dev/null && [[ -e /dev/mapper/control ]]; then
	dmsetup ls 2>/dev/null | awk '$1 ~ /^banger-/ { print $1 }' | while read -r name; do
		log "removing device-mapper device $name"
		dmsetup remove --force "$name" || log "could not remove $name"
	done
fi
losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v dir="$STATE_DIR/" 'index($2, dir) == 1 { print $1 }' |
	while read -r loop; do
		log "detaching $loop"
		losetup -d "$loop" || log "could not detach $loop"
	done

# Taps, nftables tables and the tests' network namespaces.
ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -E '^bgtap[0-9]+$' |
	while read -r tap; do
		log "deleting tap $tap"
		ip link delete "$tap" || log "could not delete $tap"
	done
if ip link show dev banger0 >/dev/null 2>&1; then
	log "deleting bridge banger0"
	ip link delete banger0 type bridge || log "could not delete banger0"
fi
if command -v nft >/dev/null; then
	for family in ip bridge; do
		if nft list table "$family" banger >/dev/null 2>&1; then
			log "deleting nftables table $family banger"
			nft delete table "$family" banger || log "could not delete table $family banger"
		fi
	done
fi
ip netns list 2>/dev/null | awk '{ print $1 }' | grep -E '^banger-(test|e2e)' | while read -r netns; do
	for pid in $(ip netns pids "$netns" 2>/dev/null); do
		stop_pid "$pid" "a process in netns $netns"
	done
	log "deleting network namespace $netns"
	ip netns delete "$netns" || log "could not delete $netns"
done

# The directories.
for dir in "$STATE_DIR" "$RUN_DIR" "$MEMORY_DIR" "$IMAGE_DIR" "$BUSYBOX_IMAGE_DIR" "$CACHE_DIR"; do
	if [[ -e $dir || -L $dir ]]; then
		log "removing $dir"
		rm -rf --one-file-system -- "$dir" || log "could not remove $dir"
	fi
done
for dir in "$(dirname "$IMAGE_DIR")" "$(dirname "$(dirname "$IMAGE_DIR")")"; do
	rmdir "$dir" 2>/dev/null && log "removed empty $dir"
done
log "done: no banger state left on this host"
exit 0
