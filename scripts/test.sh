#!/usr/bin/env bash
# Runs all of kiln's tests: installs what they need (scripts/setup.sh), then checks formatting,
# lints, the Nix flake's syntax, and runs the unit, integration and QEMU boot tests.
# Fixtures are built on first use by scripts/fixtures/* and cached outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "== flake.nix parses"
nix-instantiate --parse flake.nix >/dev/null
echo "== kiln-node (static)"
KILN_NODE=$(PROFILE=dev scripts/build-node.sh)
export KILN_NODE
echo "== cargo test"
# Two test threads: QEMU boots under TCG share the machine's cores.
cargo test --locked --no-fail-fast --workspace -- --test-threads=2
