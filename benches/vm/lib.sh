# lib.sh - helpers for the benchmark guest scripts in benches/vm/ (run by benches/vm-*.sh
# through tests/vm/run-vm.sh). Source it after tests/vm/guest/lib.sh.
#
# Every measurement prints one line `BENCH <row> <target> <value>` (IOPS for 4k rows, MB/s for
# 1M rows); the host-side driver (benches/vm/summarize.sh) turns the lines of several boots
# into a table of ratios. Absolute numbers under TCG are meaningless across boots: only
# ratios of targets measured in the same boot are.

RUNTIME=${BENCH_RUNTIME:-10}
SIZE=${BENCH_SIZE:-512M}
ROUNDS=${BENCH_ROUNDS:-1}   # passes over the rows (scripts that can repeat rows honour it)

# fio_row ROW TARGET DEV RW BS QD: one fio job on DEV, prints the BENCH line.
# direct=1 + io_uring, time-based, 1 s ramp, same size on every target of a row.
fio_row() {
  local row=$1 tgt=$2 dev=$3 rw=$4 bs=$5 qd=$6 out v
  out=$(fio --name=b --filename="$dev" --rw="$rw" --bs="$bs" --iodepth="$qd" --direct=1 \
    --ioengine=io_uring --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 \
    --randrepeat=0 --norandommap --eta=never --group_reporting --output-format=json 2>&1) \
    || { fail "fio-$row-$tgt" "$(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"; echo "BENCH $row $tgt 0"; return 1; }
  case "$bs" in
    4k) v=$(printf '%s' "$out" | jq -r '.jobs[0] | (.read.iops + .write.iops) | floor') ;;
    *)  v=$(printf '%s' "$out" | jq -r '.jobs[0] | ((.read.bw_bytes + .write.bw_bytes) / 1000000) | floor') ;;
  esac
  echo "BENCH $row $tgt $v"
}

# fill FILE SIZE: allocate every page of a backing file (tmpfs reads of holes are free, so an
# unfilled file would flatter reads).
fill() { dd if=/dev/zero of="$1" bs=1M count=$(( $(numfmt --from=iec "$2") >> 20 )) status=none conv=fsync; }

# start_bg NAME CMD...: runs CMD in the background, waits for the first stdout line (the
# /dev/ublkbN path) and stores it in DEV; PID in BGPID.
start_bg() {
  local name=$1; shift
  local out=/tmp/$name.out
  : > "$out"
  "$@" > "$out" 2> "/tmp/$name.err" &
  BGPID=$!
  DEV=""
  for _ in $(seq 1 600); do
    DEV=$(head -n1 "$out"); [ -n "$DEV" ] && [ -b "$DEV" ] && return 0
    kill -0 $BGPID 2>/dev/null || break
    sleep 0.1
  done
  fail "$name-start" "$(tail -n 5 "/tmp/$name.err" | tr '\n' ' ')"
  return 1
}
# stop_bg PID: SIGTERM and wait (60 s).
stop_bg() {
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 1 600); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$1" 2>/dev/null && kill -9 "$1"
  wait "$1" 2>/dev/null
}
# loopdev FILE: a loop device on FILE (buffered: tmpfs refuses direct I/O, like our extents).
loopdev() { losetup -f --show "$1"; }

# fio_raw ROW TARGET BS FIO_ARGS...: like fio_row with the caller's own job arguments (e.g.
# size- or count-bounded runs); BS picks the unit (4k: IOPS, else MB/s).
fio_raw() {
  local row=$1 tgt=$2 bs=$3 out v; shift 3
  out=$(fio --name=b --bs="$bs" --direct=1 --ioengine=io_uring --randrepeat=0 --eta=never \
    --group_reporting --output-format=json "$@" 2>&1) \
    || { fail "fio-$row-$tgt" "$(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"; echo "BENCH $row $tgt 0"; return 1; }
  case "$bs" in
    4k) v=$(printf '%s' "$out" | jq -r '.jobs[0] | (.read.iops + .write.iops) | floor') ;;
    *)  v=$(printf '%s' "$out" | jq -r '.jobs[0] | ((.read.bw_bytes + .write.bw_bytes) / 1000000) | floor') ;;
  esac
  echo "BENCH $row $tgt $v"
}

# With BENCH_PERF=1, perf_start TAG PID samples PID (BENCH_PERF=all: the whole guest) (software cpu-clock: TCG has no PMU)
# until perf_stop, which writes a flat report to $VM_RESULTS/perf-TAG.txt.
perf_start() {
  PERF_TAG=""
  case "${BENCH_PERF:-0}" in 1|all) ;; *) return 0 ;; esac
  command -v perf >/dev/null || return 0
  PERF_TAG=$1
  local who=(-p "$2")
  [ "$BENCH_PERF" = all ] && who=(-a)
  perf record -e cpu-clock -F 999 -g "${who[@]}" -o "/tmp/perf-$1.data" >/dev/null 2>&1 &
  PERF_PID=$!
  sleep 1
}
perf_stop() {
  [ -n "${PERF_TAG:-}" ] || return 0
  kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null
  perf report -i "/tmp/perf-$PERF_TAG.data" --no-children --percent-limit 0.5 --stdio -g none \
    > "$VM_RESULTS/perf-$PERF_TAG.txt" 2>&1
  perf report -i "/tmp/perf-$PERF_TAG.data" --children --percent-limit 2 --stdio -g none \
    > "$VM_RESULTS/perf-$PERF_TAG.children.txt" 2>&1
  perf report -i "/tmp/perf-$PERF_TAG.data" --sort comm --stdio -g none \
    > "$VM_RESULTS/perf-$PERF_TAG.comm.txt" 2>&1
  PERF_TAG=""
}
