#!/bin/bash
# vm-raid5.sh - benchmark (issue #4): our raid5 over 4 files vs kernel dm-raid raid5 over loop
# devices on the same kind of files, healthy and degraded, in the VM of tests/vm/run-vm.sh;
# BOOTS boots (default 3). Prints per row the medians and the median [min-max] of ours/kernel.
#
#   bash benches/vm-raid5.sh
#   BOOTS=2 BENCH_RUNTIME=4 BENCH_ROUNDS=2 BENCH_LEG=256M bash benches/vm-raid5.sh   (as in BENCHMARKS.md)
set -euo pipefail
. "$(dirname "$0")/vm/host.sh"
export VM_PASS_ENV="$VM_PASS_ENV BENCH_LEG BENCH_META"
build_release
boot_n raid5 "$ROOT/benches/vm/raid5.sh" "$TARGET/examples/bench-serve"
echo "vm-raid5: $(date -u +%F) rows: IOPS (4k) or MB/s (1M); ${BENCH_RUNTIME:-10}s per row; logs in $OUT"
"$ROOT/benches/vm/summarize.sh" ours kernel -- "$OUT"/raid5.boot*.log
