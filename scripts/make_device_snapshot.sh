#!/usr/bin/env bash
# Build .snap/: the staged tree (git index) for a device run, so that files other
# developers are editing in the working tree do not travel half-written.
# Usage: bash scripts/make_device_snapshot.sh [extra files copied from the working tree ...]
set -e
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rm -rf .snap
git checkout-index -a --prefix=.snap/
for f in "$@"; do mkdir -p ".snap/$(dirname "$f")"; cp "$f" ".snap/$f"; done
[ -d .whl ] && cp -r .whl .snap/
echo "snapshot: $(find .snap -type f | wc -l) files"
