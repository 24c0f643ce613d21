#!/usr/bin/env bash
# Builds what the container-image tests boot, once (kept in the cache directory):
#
#   debian-minbase-bookworm.tar   a real Debian root file system from Debian's packages
#                                 (mmdebstrap --variant=minbase), as a tar stream
#
# usage: scripts/build-test-images.sh [CACHE_DIR]   (default build/cache)
set -euo pipefail

readonly CACHE=${1:-build/cache}
readonly MINBASE=$CACHE/debian-minbase-bookworm.tar
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}

log() { echo "build-test-images: $*" >&2; }

[[ -s $MINBASE ]] && exit 0
command -v mmdebstrap >/dev/null || {
	log "mmdebstrap is not installed (make setup installs it)"
	exit 1
}
mkdir -p "$CACHE"
log "building $MINBASE with mmdebstrap (bookworm, minbase; about half a minute)"
mmdebstrap --quiet --variant=minbase --mode=root --format=tar bookworm "$MINBASE.partial"
mv "$MINBASE.partial" "$MINBASE"
log "wrote $MINBASE ($(du -h "$MINBASE" | cut -f1))"
