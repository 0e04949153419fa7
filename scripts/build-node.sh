#!/usr/bin/env bash
# Builds kiln-node, the binary kiln puts on the nodes it boots (the two-stage loader, the status agent), as a
# static executable: it must run on images with no C library or another one. Prints its path last.
#   scripts/build-node.sh            # release build (what packages ship)
#   PROFILE=dev scripts/build-node.sh
# There is no musl Rust standard library on these machines, but glibc links statically: +crt-static on the gnu
# target gives a static-pie binary (it avoids NSS: it never looks names up through glibc).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --quiet -p kiln-node --target "$triple" \
	--profile "$profile" >&2
dir=$profile
[[ $profile == dev ]] && dir=debug
bin=target/$triple/$dir/kiln-node
if ldd "$bin" 2>&1 | grep -q '=>'; then
	echo "build-node.sh: $bin is not static" >&2
	exit 1
fi
echo "$PWD/$bin"
