#!/bin/bash
# ublk-checks.sh - builds the ublk test server and runs the ublk guest checks in the VM
# (or directly, on a host with /dev/ublk-control). Exit status: run-vm.sh's verdict.
# Usage: tests/vm/ublk-checks.sh   (from anywhere in the repo; extra env: see run-vm.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
cargo build -q -p ublk-target --example ublk-serve
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
exec "$ROOT/tests/vm/run-vm.sh" "$ROOT/tests/vm/guest/ublk-all.sh" "$TARGET/debug/examples/ublk-serve"
