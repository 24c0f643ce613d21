#!/usr/bin/env bash
# `make test`'s cargo run: every test of the workspace, then a summary of what ran and, for
# every test that could not check what it is for on this host, what and why. Skips are
# never passes: tests ignored at build time (libtest's `ignored`, with a SKIPPED reason) and
# tests that found the host lacking at run time (`banger_tests::skip`) are counted apart.
set -uo pipefail

readonly ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly CARGO=${CARGO:-cargo}
cd "$ROOT"
mkdir -p target
readonly OUTPUT=target/test-output.log
export BANGER_TEST_SKIPS=$ROOT/target/test-skips.log
: >"$BANGER_TEST_SKIPS"

"$CARGO" test --locked --workspace --no-fail-fast "$@" 2>&1 | tee "$OUTPUT"
status=${PIPESTATUS[0]}

awk -v skips="$BANGER_TEST_SKIPS" '
	/^test result: / {
		for (i = 1; i <= NF; i++) {
			if ($(i + 1) ~ /^passed;?$/) passed += $i
			if ($(i + 1) ~ /^failed;?$/) failed += $i
		}
		binaries++
	}
	/^test .* \.\.\. ignored/ {
		name = $2
		reason = $0
		sub(/^.* \.\.\. ignored,? ?/, "", reason)
		ignored[++n] = name ": " (reason == "" ? "ignored" : reason)
	}
	END {
		runtime = 0
		while ((getline line < skips) > 0) skipped[++runtime] = line
		printf "\nmake test: %d passed, %d failed in %d test binaries; %d skipped (%d ignored at build time, %d at run time)\n",
			passed, failed, binaries, n + runtime, n, runtime
		for (i = 1; i <= n; i++) print "  skipped " ignored[i]
		for (i = 1; i <= runtime; i++) print "  skipped " skipped[i]
	}' "$OUTPUT"
exit "$status"
