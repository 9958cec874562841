# host.sh - host-side helpers for benches/vm-*.sh (source it).
#
# Benchmarks boot the VM of tests/vm/run-vm.sh (one boot per repetition), keep each boot's
# console log under $OUT, and summarize the `BENCH row target value` lines with
# benches/vm/summarize.sh. VMs never run concurrently: run-vm.sh takes the exclusive lock
# /var/lock/volmgr-vm.lock itself once it has it; until then we take it around each boot.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BOOTS=${BOOTS:-3}
OUT=${OUT:-$(mktemp -d /var/tmp/vm-bench.XXXXXX)}
mkdir -p "$OUT"
export VM_MEM=${VM_MEM:-6G}
# Linux 7.x (trixie-backports): ublk zero copy (UBLK_F_AUTO_BUF_REG, 6.16+) is the data path
# a current kernel gives; VM_KERNEL_SUITE=bookworm-backports measures 6.12's copy mode.
export VM_KERNEL_SUITE=${VM_KERNEL_SUITE:-trixie-backports}
# The guest CPU hides ERMS (VM_CPU=max to keep it). With ERMS the kernel copies to and from
# user memory with `rep movsb`, which TCG emulates one byte per step, while its own
# kernel-to-kernel memcpy (what dm and loop use) takes an unrolled 8-byte loop: that penalizes
# only the userspace servers (ours, rublk), by 2-3x on 1M rows. On hardware `rep movsb` is
# the fast path; without ERMS user copies use `rep movsq`. See BENCHMARKS.md.
export VM_CPU=${VM_CPU:-max,-erms}
export VM_PASS_ENV="${VM_PASS_ENV:-} BENCH_RUNTIME BENCH_SIZE BENCH_QUEUES BENCH_DEPTH BENCH_PERF BENCH_ROUNDS BENCH_ROWS BENCH_ALT_ARGS BENCH_ALT_ENV VOLMGR_UBLK_ZERO_COPY"

build_release() {
  (cd "$ROOT" && cargo build --release -q -p volmgr -p ublk-target --examples) >&2
  TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
}

# boot_n NAME GUEST_SCRIPT ARGS...: BOOTS boots, logs in $OUT/NAME.bootK.log; a boot whose run
# fails (a CHECK_FAIL, fio error) is reported and its numbers still kept if it printed any.
boot_n() {
  local name=$1; shift
  local k lockwrap=()
  grep -q 'volmgr-vm.lock' "$ROOT/tests/vm/run-vm.sh" || lockwrap=(flock /var/lock/volmgr-vm.lock)
  for k in $(seq 1 "$BOOTS"); do
    echo "== $name: boot $k/$BOOTS ($(date -u +%H:%M:%S))" >&2
    VM_RESULTS="$OUT/$name.boot$k" VM_KEEP=1 "${lockwrap[@]}" "$ROOT/tests/vm/run-vm.sh" "$@" \
      > "$OUT/$name.boot$k.run.txt" 2>&1 \
      || echo "   boot $k failed: $(tail -n 3 "$OUT/$name.boot$k.run.txt" | tr '\n' ' ')" >&2
    grep -a '^BENCH ' "$OUT/$name.boot$k/console.log" 2>/dev/null | sed 's/^/   /' >&2
    cp "$OUT/$name.boot$k/console.log" "$OUT/$name.boot$k.log" 2>/dev/null || true
  done
}
