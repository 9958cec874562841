#!/bin/bash
# thin.sh - guest side of benches/vm-thin.sh (issue #5's benchmark). In one boot: our thin
# pool (64 KiB blocks, block zeroing on, as dm-thin's default) with one thin volume served as
# /dev/ublkbN, beside kernel dm-thin with the same pool table over loop devices on the same
# kind of files (tmpfs, buffered). The thin volumes are 16 GiB virtual over a 1 GiB pool.
#
# Rows, in this order (each needs the state the previous ones left):
#   seqwrite-1m-unprov   1M sequential writes over the first 256 MiB (every block new), once
#   randwrite-4k-prov    4k random writes, QD32, inside those 256 MiB (all provisioned)
#   randread-4k          4k random reads, QD32, inside those 256 MiB
#   randwrite-4k-unprov  8000 4k random writes, QD32, over the last 15 GiB (each almost surely
#                        in a new 64 KiB block: ~1.6% land in an already provisioned one)
#
# Usage: thin.sh BENCH_SERVE   (run by tests/vm/run-vm.sh)
# vm-modules: ublk_drv dm-mod loop
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/tests/vm/guest/lib.sh"
. "$ROOT/benches/vm/lib.sh"
SERVE=$1
QUEUES=${BENCH_QUEUES:-2} DEPTH=${BENCH_DEPTH:-128}
NIOS=${BENCH_UNPROV_IOS:-8000}
export RUST_LOG=warn
[ -x "$SERVE" ] || { fail setup "bench-serve '$SERVE' not executable"; exit 1; }
load_modules dm-thin-pool || exit 1
DATA=1G META=64M
DSECT=$(( $(numfmt --from=iec $DATA) / 512 ))
TSECT=$(( 16 * 1024 * 1024 * 2 ))
step "setup: pools of $DATA data + $META metadata on tmpfs, queues $QUEUES depth $DEPTH, ${RUNTIME}s per timed row"
for f in ometa kmeta; do fill /tmp/$f.img $META; done
for f in odata kdata; do fill /tmp/$f.img $DATA; done
echo "0 $DSECT thin-pool /tmp/ometa.img /tmp/odata.img 128 0" > /tmp/pool.table
echo "0 $TSECT thin pool 0" > /tmp/thin.table
start_bg ours "$SERVE" --queues "$QUEUES" --depth "$DEPTH" pool=/tmp/pool.table \
  --msg pool "create_thin 0" thin0=/tmp/thin.table || exit 1
OURS=$DEV OPID=$BGPID
KM=$(loopdev /tmp/kmeta.img) KD=$(loopdev /tmp/kdata.img)
dmsetup create bench-pool --table "0 $DSECT thin-pool $KM $KD 128 0" || { fail setup "dm pool"; exit 1; }
dmsetup message bench-pool 0 "create_thin 0" || { fail setup "dm create_thin"; exit 1; }
dmsetup create bench-thin --table "0 $TSECT thin /dev/mapper/bench-pool 0" || { fail setup "dm thin"; exit 1; }
K=/dev/mapper/bench-thin
ok setup

both() { # ROW BS ARGS...
  local row=$1 bs=$2; shift 2
  step "$row"
  perf_start "thin-$row" "$OPID"
  fio_raw "$row" ours "$bs" --filename="$OURS" "$@"
  perf_stop
  fio_raw "$row" kernel "$bs" --filename="$K" "$@"
}
both seqwrite-1m-unprov 1m --rw=write --iodepth=32 --offset=0 --size=256M
both randwrite-4k-prov 4k --rw=randwrite --iodepth=32 --offset=0 --size=256M --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap
both randread-4k 4k --rw=randread --iodepth=32 --offset=0 --size=256M --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap
both randwrite-4k-unprov 4k --rw=randwrite --iodepth=32 --offset=1G --size=15G --number_ios="$NIOS"
echo "  kernel pool: $(dmsetup status bench-pool)"

step teardown
dmsetup remove bench-thin; dmsetup remove bench-pool; losetup -d "$KM"; losetup -d "$KD"
stop_bg $OPID
ok done
