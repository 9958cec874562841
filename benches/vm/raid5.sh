#!/bin/bash
# raid5.sh - guest side of benches/vm-raid5.sh (issue #4's benchmark). In one boot: our raid5
# (raid5_ls, 4 legs, 64 KiB chunks, no metadata devices, nosync over zero-filled legs so parity
# is already consistent) served as /dev/ublkbN, beside kernel dm-raid with the identical table
# over loop devices on the same kind of files (tmpfs, buffered). Then both degraded: ours by
# the `fail 3` message, the kernel's by giving leg 3 as `- -` (a missing device). Last,
# degraded-ppl: the same degraded arrays with metadata devices on both sides (BENCH_META, default
# 4 MiB, the size of an LVM rmeta extent), so ours keeps its partial parity log (the write hole closed) and the
# kernel its superblock and bitmap (no journal: the hole stays open there).
#
# Usage: raid5.sh BENCH_SERVE   (run by tests/vm/run-vm.sh)
# vm-modules: ublk_drv dm-mod loop
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/tests/vm/guest/lib.sh"
. "$ROOT/benches/vm/lib.sh"
SERVE=$1
QUEUES=${BENCH_QUEUES:-2} DEPTH=${BENCH_DEPTH:-128}
LEG=${BENCH_LEG:-256M}
META=${BENCH_META:-4M}   # metadata devices of the degraded-ppl rows
export RUST_LOG=warn
[ -x "$SERVE" ] || { fail setup "bench-serve '$SERVE' not executable"; exit 1; }
load_modules raid456 dm-raid || exit 1
LEGS=$(( $(numfmt --from=iec "$LEG") / 512 ))
LEN=$(( LEGS * 3 ))
SIZE=$(( LEN * 512 / 1048576 ))M   # fio region: the whole array
step "setup: 2 x 4 legs of $LEG on tmpfs, queues $QUEUES depth $DEPTH, ${RUNTIME}s per row"
LOOPS=()
for i in 0 1 2 3; do
  fill /tmp/o$i.img "$LEG"; fill /tmp/k$i.img "$LEG"
  LOOPS+=("$(loopdev /tmp/k$i.img)")
done
ROWS=("seqwrite-1m-qd32 write 1m 32" "seqread-1m-qd32 read 1m 32"
      "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd32 randwrite 4k 32")

run_state() { # healthy|degraded|degraded-ppl
  local st=$1 ktable
  echo "0 $LEN raid raid5_ls 2 128 nosync 4 - /tmp/o0.img - /tmp/o1.img - /tmp/o2.img - /tmp/o3.img" > /tmp/ours-r5.table
  if [ "$st" = degraded-ppl ]; then
    local m=() i
    for i in 0 1 2 3; do
      head -c "$(numfmt --from=iec "$META")" /dev/zero > /tmp/om$i.img
      head -c "$(numfmt --from=iec "$META")" /dev/zero > /tmp/km$i.img
      m+=("$(loopdev /tmp/km$i.img)")
    done
    echo "0 $LEN raid raid5_ls 2 128 nosync 4 /tmp/om0.img /tmp/o0.img /tmp/om1.img /tmp/o1.img /tmp/om2.img /tmp/o2.img /tmp/om3.img /tmp/o3.img" > /tmp/ours-r5.table
    start_bg ours-$st "$SERVE" --queues "$QUEUES" --depth "$DEPTH" r5=/tmp/ours-r5.table --msg r5 "fail 3" || return 1
    # dm-raid will not build a new array with a leg missing: create it whole once (so the
    # superblocks name 4 legs), then assemble it without leg 3.
    ktable="0 $LEN raid raid5_ls 2 128 nosync 4 ${m[0]} ${LOOPS[0]} ${m[1]} ${LOOPS[1]} ${m[2]} ${LOOPS[2]} ${m[3]} ${LOOPS[3]}"
    dmsetup create bench-r5 --table "$ktable" && sleep 1 && dmsetup remove bench-r5 ||
      { fail "dm-$st" "dmsetup create: $ktable"; return 1; }
    ktable="0 $LEN raid raid5_ls 2 128 nosync 4 ${m[0]} ${LOOPS[0]} ${m[1]} ${LOOPS[1]} ${m[2]} ${LOOPS[2]} - -"
    MLOOPS=("${m[@]}")
  elif [ "$st" = healthy ]; then
    start_bg ours-$st "$SERVE" --queues "$QUEUES" --depth "$DEPTH" r5=/tmp/ours-r5.table || return 1
    ktable="0 $LEN raid raid5_ls 2 128 nosync 4 - ${LOOPS[0]} - ${LOOPS[1]} - ${LOOPS[2]} - ${LOOPS[3]}"
  else
    start_bg ours-$st "$SERVE" --queues "$QUEUES" --depth "$DEPTH" r5=/tmp/ours-r5.table --msg r5 "fail 3" || return 1
    ktable="0 $LEN raid raid5_ls 2 128 nosync 4 - ${LOOPS[0]} - ${LOOPS[1]} - ${LOOPS[2]} - -"
  fi
  local OURS=$DEV PID=$BGPID
  dmsetup create bench-r5 --table "$ktable" || { fail "dm-$st" "dmsetup create: $ktable"; stop_bg $PID; return 1; }
  sleep 1
  echo "  kernel: $(dmsetup status bench-r5)"
  ok "setup-$st"
  for round in $(seq 1 "$ROUNDS"); do
    for spec in "${ROWS[@]}"; do
      set -- $spec
      step "$st $1 (round $round)"
      case " ${BENCH_ROWS:-$st-$1} " in *" $st-$1 "*) ;; *) continue ;; esac
      perf_start "$st-$1-ours" "$PID"
      fio_row "$st-$1" ours "$OURS" "$2" "$3" "$4"
      perf_stop
      fio_row "$st-$1" kernel /dev/mapper/bench-r5 "$2" "$3" "$4"
    done
  done
  echo "  kernel: $(dmsetup status bench-r5)"
  dmsetup remove bench-r5
  stop_bg $PID
  echo "  ours: $(grep -h 'status:' /tmp/ours-$st.err | tail -1)"
}
MLOOPS=()
run_state healthy
run_state degraded
run_state degraded-ppl
for l in "${LOOPS[@]}" "${MLOOPS[@]}"; do losetup -d "$l"; done
ok done
