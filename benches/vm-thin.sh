#!/bin/bash
# vm-thin.sh - benchmark (issue #5): our thin pool + thin volume vs kernel dm-thin over loop
# devices on the same kind of files (64 KiB blocks), in the VM of tests/vm/run-vm.sh; BOOTS boots
# (default 3). Prints per row the medians and the median [min-max] of ours/kernel.
#
#   bash benches/vm-thin.sh
#   BOOTS=1 BENCH_RUNTIME=8 BENCH_UNPROV_IOS=8000 bash benches/vm-thin.sh
set -euo pipefail
. "$(dirname "$0")/vm/host.sh"
export VM_PASS_ENV="$VM_PASS_ENV BENCH_UNPROV_IOS"
build_release
boot_n thin "$ROOT/benches/vm/thin.sh" "$TARGET/examples/bench-serve"
echo "vm-thin: $(date -u +%F) rows: IOPS (4k) or MB/s (1M); ${BENCH_RUNTIME:-10}s per timed row; logs in $OUT"
"$ROOT/benches/vm/summarize.sh" ours kernel -- "$OUT"/thin.boot*.log
