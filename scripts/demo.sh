#!/usr/bin/env bash
# `make demo`: start bangerd (unless one already serves the socket), boot a VM from the
# default image, run a command in it, print its output, delete the VM, and stop the daemon
# this script started.
set -euo pipefail

readonly ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly BANGERD=$ROOT/target/debug/bangerd
readonly BANGER=$ROOT/target/debug/banger
readonly SOCKET=${BANGER_SOCKET:-/run/banger/bangerd.sock}
readonly LOG=${BANGER_DEMO_LOG:-/tmp/bangerd-demo.log}
export BANGER_SOCKET=$SOCKET
# This script starts (and stops) its own daemon; the CLI must not start one behind its back.
export BANGER_NO_AUTOSTART=1

daemon_pid=
stop_daemon() {
	if [[ -n $daemon_pid ]]; then
		kill -TERM "$daemon_pid" 2>/dev/null || true
		wait "$daemon_pid" 2>/dev/null || true
	fi
}
trap stop_daemon EXIT

if "$BANGER" vm list >/dev/null 2>&1; then
	echo "demo: using the bangerd already serving $SOCKET"
else
	echo "demo: starting bangerd on $SOCKET (log: $LOG)"
	"$BANGERD" --socket "$SOCKET" >"$LOG" 2>&1 &
	daemon_pid=$!
	# The first start on a host tries KVM once (accel = "auto"): up to 8 s more.
	for _ in $(seq 300); do
		"$BANGER" vm list >/dev/null 2>&1 && break
		kill -0 "$daemon_pid" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
		sleep 0.1
	done
fi

echo "demo: banger vm run --rm --name demo-$$ -- sh -c '...'"
start=$(date +%s.%N)
"$BANGER" vm run --rm --name "demo-$$" -- sh -c \
	'echo "hello from $(hostname), a banger microVM"; echo "Debian $(cat /etc/debian_version), $(uname -srm)"; echo "address: $(ip -4 -o addr show eth0 | awk "{print \$4}")"; echo "uptime: $(cut -d" " -f1 /proc/uptime)s"; echo "vCPUs: $(nproc), memory: $(awk "/MemTotal/{print \$2}" /proc/meminfo) kB"'
end=$(date +%s.%N)
awk -v s="$start" -v e="$end" 'BEGIN { printf "demo: create + boot + exec + delete took %.1f s\n", e - s }'
