#!/bin/bash
# vm-ublk.sh - benchmark (issue #3): our ublk server vs kernel dm-linear and rublk's loop
# target, all over files on tmpfs, in the VM of tests/vm/run-vm.sh; BOOTS boots (default 3).
# Prints per row the median of each target and the median [min-max] of the per-boot ratios.
#
#   bash benches/vm-ublk.sh
#   BOOTS=5 BENCH_RUNTIME=8 BENCH_SIZE=512M BENCH_QUEUES=2 BENCH_DEPTH=128 BENCH_ROUNDS=1 bash benches/vm-ublk.sh
#   (BENCH_ROUNDS=N: N passes over the rows per boot, averaged; OUT=DIR keeps the logs)
#
# rublk (a peer ublk server on libublk, crates.io) is installed once into
# /var/cache/volmgr-vm/rublk (2-3.5 min).
set -euo pipefail
. "$(dirname "$0")/vm/host.sh"
RUBLK_ROOT=${RUBLK_ROOT:-/var/cache/volmgr-vm/rublk}
if [ ! -x "$RUBLK_ROOT/bin/rublk" ]; then
  echo "installing rublk into $RUBLK_ROOT" >&2
  CARGO_TARGET_DIR=/var/cache/volmgr-vm/rublk-target cargo install rublk --root "$RUBLK_ROOT" >&2
fi
build_release
boot_n ublk "$ROOT/benches/vm/ublk-linear.sh" "$TARGET/examples/ublk-serve" "$RUBLK_ROOT/bin/rublk"
echo "vm-ublk: $(date -u +%F) rows: IOPS (4k) or MB/s (1M); ${BENCH_RUNTIME:-10}s per row; logs in $OUT"
"$ROOT/benches/vm/summarize.sh" ours dm rublk $([ -n "${BENCH_ALT_ARGS:-}${BENCH_ALT_ENV:-}" ] && echo alt) -- "$OUT"/ublk.boot*.log
