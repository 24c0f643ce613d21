#!/usr/bin/env bash
# Fails when code, tests or scripts name a path outside the checkout (the `shared/` folder
# beside it holds reference material for developers, not a dependency). The one allowed
# place is server/build.rs, which falls back: the Firecracker contract tests are ignored with
# a SKIPPED reason when the API description is absent.
set -euo pipefail

readonly ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
readonly ALLOWED='^server/build\.rs$'

if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	files=$(git ls-files --cached --others --exclude-standard)
else
	files=$(find . -path ./target -prune -o -path ./.tools -prune -o -path ./build -prune \
		-o -path '*/node_modules' -prune -o -type f -print | sed 's|^\./||')
fi
offenders=$(grep -v -E "$ALLOWED" <<<"$files" |
	grep -E '(\.rs|\.sh|\.py|\.ts|\.toml|\.json|Makefile|\.ci/run)$' |
	grep -v -E '^scripts/check-self-contained\.sh$' |
	xargs -r -d '\n' grep -n -E '\.\./shared|shared/reference|shared/notes' -- 2>/dev/null || true)
if [[ -n $offenders ]]; then
	echo "check-self-contained: these read a path outside the checkout without a fallback:" >&2
	echo "$offenders" >&2
	echo "(only server/build.rs may, and it must fall back when the path is absent)" >&2
	exit 1
fi
echo "check-self-contained: no code, test or script reads outside the checkout"
