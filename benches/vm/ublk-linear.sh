#!/bin/bash
# ublk-linear.sh - guest side of benches/vm-ublk.sh (issue #3's benchmark). In one boot:
# (a) our /dev/ublkbN serving a linear table over a file on tmpfs, (b) kernel dm-linear over a
# loop device on the same kind of file, (c) rublk's loop target on the same kind of file.
# All three back onto tmpfs with buffered I/O (tmpfs refuses O_DIRECT: our extent falls back to
# buffered, loop is buffered, rublk runs with --buffered-io), same size, same queues x depth
# for the two ublk servers. Rows run target after target, row by row, so drift in the boot
# hits all three alike.
#
# Usage: ublk-linear.sh UBLK_SERVE RUBLK   (run by tests/vm/run-vm.sh)
# vm-modules: ublk_drv dm-mod loop
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/tests/vm/guest/lib.sh"
. "$ROOT/benches/vm/lib.sh"
SERVE=$1 RUBLK=$2
QUEUES=${BENCH_QUEUES:-2} DEPTH=${BENCH_DEPTH:-128}
export RUST_LOG=warn
[ -x "$SERVE" ] || { fail setup "ublk-serve '$SERVE' not executable"; exit 1; }
[ -x "$RUBLK" ] || { fail setup "rublk '$RUBLK' not executable"; exit 1; }
SECT=$(( $(numfmt --from=iec "$SIZE") / 512 ))
echo "  cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2-); string-copy flags:" \
  "$(grep -m1 '^flags' /proc/cpuinfo | grep -ow 'erms\|fsrm' | tr '\n' ' ')"
step "setup: 3 x $SIZE files on tmpfs, queues $QUEUES depth $DEPTH, ${RUNTIME}s per row"
for f in ours dm rublk; do fill /tmp/$f.img "$SIZE"; done
# A/B in one boot: BENCH_ALT_ARGS (extra server options, e.g. --pin-queues) and/or
# BENCH_ALT_ENV (VAR=VALUE words for its environment) add target "alt": ours again, so changed.
ALT=0; [ -n "${BENCH_ALT_ARGS:-}${BENCH_ALT_ENV:-}" ] && ALT=1

echo "0 $SECT linear /tmp/ours.img 0" > /tmp/ours.table
start_bg ours "$SERVE" table:/tmp/ours.table --queues "$QUEUES" --depth "$DEPTH" || exit 1
OURS=$DEV OURS_PID=$BGPID
if [ "$ALT" = 1 ]; then
  fill /tmp/alt.img "$SIZE"
  echo "0 $SECT linear /tmp/alt.img 0" > /tmp/alt.table
  # shellcheck disable=SC2086 # word lists on purpose
  start_bg alt env ${BENCH_ALT_ENV:-} "$SERVE" table:/tmp/alt.table --queues "$QUEUES" --depth "$DEPTH" ${BENCH_ALT_ARGS:-} || exit 1
  ALT_DEV=$DEV ALT_PID=$BGPID
  echo "  alt: env ${BENCH_ALT_ENV:-} args ${BENCH_ALT_ARGS:-}"
fi
L=$(loopdev /tmp/dm.img) || { fail setup losetup; exit 1; }
dmsetup create bench-lin --table "0 $SECT linear $L 0" || { fail setup dmsetup; exit 1; }
DM=/dev/mapper/bench-lin
"$RUBLK" add loop -n 7 -f /tmp/rublk.img --buffered-io -q "$QUEUES" -d "$DEPTH" --quiet \
  || { fail setup "rublk add"; exit 1; }
RU=/dev/ublkb7
wait_for -b $RU 30 || { fail setup "no $RU"; exit 1; }
for d in $OURS $DM $RU; do
  echo "  $d: $(blockdev --getsize64 $d) bytes, max_sectors_kb $(cat /sys/block/$(basename $(readlink -f $d))/queue/max_sectors_kb), nr_requests $(cat /sys/block/$(basename $(readlink -f $d))/queue/nr_requests)"
done
ok setup

# ROUNDS passes over all rows (RUNTIME seconds per target per pass; the summary averages the
# passes): a burst of load on the host then hits every target of a row more evenly.
for round in $(seq 1 "$ROUNDS"); do
  for spec in "randread-4k-qd32 randread 4k 32" "randwrite-4k-qd32 randwrite 4k 32" \
              "seqread-1m-qd32 read 1m 32" "seqwrite-1m-qd32 write 1m 32"; do
    set -- $spec
    step "$1 (round $round)"
    case " ${BENCH_ROWS:-$1} " in *" $1 "*) ;; *) continue ;; esac
    perf_start "$1-ours" "$OURS_PID"
    fio_row "$1" ours "$OURS" "$2" "$3" "$4"
    perf_stop
    [ "$ALT" = 1 ] && fio_row "$1" alt "$ALT_DEV" "$2" "$3" "$4"
    [ "${BENCH_PERF:-0}" = all ] && perf_start "$1-dm" 1
    fio_row "$1" dm "$DM" "$2" "$3" "$4"
    perf_stop
    perf_start "$1-rublk" "$(pgrep -o -f 'rublk add' || pgrep -o rublk)"
    fio_row "$1" rublk "$RU" "$2" "$3" "$4"
    perf_stop
  done
done

step teardown
stop_bg "$OURS_PID"
[ "$ALT" = 1 ] && stop_bg "$ALT_PID"
dmsetup remove bench-lin; losetup -d "$L"
"$RUBLK" del -n 7 || fail teardown "rublk del"
ok done
