#!/bin/bash
# ublk-basic.sh - our ublk server end to end against a real kernel (run by tests/vm/run-vm.sh).
#
# Usage: ublk-basic.sh UBLK_SERVE_BINARY
#   UBLK_SERVE_BINARY is ublk-target's example `ublk-serve` (until `volmgr serve --ublk`).
# Serves a sparse file on the guest's tmpfs through FileExtent, then: device size and queue
# limits, ext4 (tree of files with sha256, e2fsck -fn, remount and verify), xfs (xfs_repair
# -n), fio randwrite with crc32c verify at QD 32, blkdiscard / write-zeroes read back as
# zeroes, data reaches the backing file, and stop deletes the device. Also a RAM-disk run
# created with the user-recovery flag (start, read back, stop; no crash/re-attach yet), and
# dead queue threads (VOLMGR_UBLK_FAULT, ublk-serve's test-only fault injection): the device
# fails its I/O within seconds instead of hanging, goes away, and the server says why.
# vm-modules: ublk_drv ext4 xfs
# vm-checks: 62
. "$(dirname "$0")/lib.sh"

SERVE=${1:-${UBLK_SERVE:-}}
[ -x "$SERVE" ] || { fail setup "ublk-serve binary '$SERVE' not executable"; exit 1; }
SIZE=$((512 << 20))
IMG=/tmp/ublk-basic.img
M=/tmp/mnt
mkdir -p $M
export RUST_LOG=${RUST_LOG:-warn}

# start_server TARGET ARGS...: starts ublk-serve, sets SPID and DEV (the /dev/ublkbN it printed).
start_server() {
  serve_bg /tmp/serve.$$.out /tmp/serve.err "$SERVE" "$@"
}
# stop_server: SIGTERM, wait; OK if it exits 0 and the device nodes are gone.
stop_server() {
  local name=$1 id=${DEV#/dev/ublkb} rc
  kill -TERM $SPID
  for _ in $(seq 1 600); do kill -0 $SPID 2>/dev/null || break; sleep 0.1; done
  if kill -0 $SPID 2>/dev/null; then
    fail "$name" "ublk-serve still running 60s after SIGTERM"; kill -9 $SPID; wait $SPID; return
  fi
  wait $SPID; rc=$?
  sed 's/^/  serve: /' /tmp/serve.err | tail -n 20
  if [ $rc != 0 ]; then fail "$name" "ublk-serve exited $rc"
  elif [ -e "$DEV" ]; then fail "$name" "$DEV still exists"
  elif [ -e /sys/class/ublk-char/ublkc$id ]; then fail "$name" "ublkc$id still registered"
  else ok "$name"; fi
}

step "ublk driver"
if [ -c /dev/ublk-control ]; then ok ublk-control; else fail ublk-control "no /dev/ublk-control"; exit 1; fi

step "start: file extent on tmpfs, 2 queues"
truncate -s $SIZE $IMG
if start_server $IMG --queues 2; then ok start; else
  fail start "no device (server said: $(tail -n 5 /tmp/serve.err | tr '\n' ' '))"; exit 1; fi
echo "  device $DEV, server pid $SPID"
sed 's/^/  serve: /' /tmp/serve.err
[ -b "$DEV" ] && ok bdev-node || fail bdev-node "$DEV is not a block device"
# Zero copy (UBLK_F_AUTO_BUF_REG) from Linux 6.16; the server falls back to copying before.
want_path=copy; kernel_at_least 6 16 && want_path="zero copy"
expect_eq data-path "$(sed -n 's/.*data path: //p' /tmp/serve.err | head -n1)" "$want_path"
expect_eq device-size "$(blockdev --getsize64 $DEV)" $SIZE
Q=/sys/block/$(basename $DEV)/queue
for f in logical_block_size physical_block_size minimum_io_size optimal_io_size max_sectors_kb \
         discard_granularity discard_max_bytes write_zeroes_max_bytes write_cache fua nr_requests; do
  echo "  queue/$f = $(cat $Q/$f 2>/dev/null)"
done
expect_eq queue-lbs "$(cat $Q/logical_block_size)" 512
expect_eq queue-discard "$(cat $Q/discard_granularity)" 4096
expect_eq queue-write-cache "$(cat $Q/write_cache)" "write back"
expect_eq queue-fua "$(cat $Q/fua)" 1
expect_eq queue-count "$(ls /sys/block/$(basename $DEV)/mq | wc -l)" 2

step "ext4"
t=$(uptime_s)
check mkfs-ext4 mkfs.ext4 -F -q $DEV
echo "  mkfs.ext4 took $(awk -v a=$t -v b=$(uptime_s) 'BEGIN{print b-a}')s"
if check mount-ext4 mount -t ext4 $DEV $M; then
  mkdir -p $M/tree
  for i in $(seq 1 40); do
    mkdir -p $M/tree/d$((i % 7))
    head -c $(( (i * 7919) % 300000 + 1 )) /dev/urandom > $M/tree/d$((i % 7))/f$i
  done
  head -c 16M /dev/urandom > $M/tree/big
  (cd $M && find tree -type f -print0 | sort -z | xargs -0 sha256sum) > /tmp/sums
  echo "  wrote $(wc -l < /tmp/sums) files, $(du -sh $M/tree | cut -f1)"
  check umount-ext4 umount $M
  check e2fsck-clean e2fsck_clean $DEV
  echo 3 > /proc/sys/vm/drop_caches
  if check remount-ext4 mount -t ext4 -o ro $DEV $M; then
    check ext4-sha256-verify bash -c "cd $M && sha256sum --quiet -c /tmp/sums"
    umount $M
  fi
fi

step "xfs"
check mkfs-xfs mkfs.xfs -f -q $DEV
if check mount-xfs mount -t xfs $DEV $M; then
  head -c 16M /dev/urandom > $M/x; S1=$(sha256sum < $M/x); cp -r /usr/share/doc/fio $M/ 2>/dev/null
  check umount-xfs umount $M
  check xfs-repair-clean xfs_repair -n $DEV
  echo 3 > /proc/sys/vm/drop_caches
  mount -t xfs -o ro $DEV $M && { expect_eq xfs-sha256-verify "$(sha256sum < $M/x)" "$S1"; umount $M; }
fi

step "fio randwrite verify=crc32c QD32 direct io_uring"
t=$(uptime_s)
check fio-verify fio --name=ublkverify --filename=$DEV --rw=randwrite --bsrange=4k-64k \
  --size=128M --ioengine=io_uring --iodepth=32 --direct=1 --verify=crc32c --verify_fatal=1 \
  --do_verify=1 --randrepeat=0 --eta=never --group_reporting
echo "  fio took $(awk -v a=$t -v b=$(uptime_s) 'BEGIN{print b-a}')s"

step "discard and write-zeroes"
dd if=/dev/urandom of=$DEV bs=1M count=8 seek=64 oflag=direct status=none
check blkdiscard blkdiscard -o $((64 << 20)) -l $((4 << 20)) $DEV
# FileExtent on a regular file promises zeroes after discard (hole punch).
check discard-reads-zeroes cmp -n $((4 << 20)) <(dd if=$DEV bs=1M skip=64 count=4 iflag=direct status=none) /dev/zero
check write-zeroes blkdiscard -z -o $((68 << 20)) -l $((4 << 20)) $DEV
check write-zeroes-reads-zeroes cmp -n $((4 << 20)) <(dd if=$DEV bs=1M skip=68 count=4 iflag=direct status=none) /dev/zero
check blkdiscard-whole blkdiscard $DEV

step "data reaches the backing file"
head -c 1M /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of=$DEV bs=1M seek=100 oflag=direct conv=fsync status=none
check flush-via-fsync sync $DEV 2>/dev/null || check flush-via-fsync blockdev --flushbufs $DEV

step "stop"
stop_server stop-deletes-device
check backing-file-has-data cmp -n $((1 << 20)) /tmp/pattern <(dd if=$IMG bs=1M skip=100 count=1 status=none)
rm -f $IMG

step "RAM disk (tables MemDevice), 1 queue, depth 32, user-recovery flag"
if start_server mem:64M --queues 1 --depth 32 --user-recovery; then
  ok mem-start
  expect_eq mem-size "$(blockdev --getsize64 $DEV)" $((64 << 20))
  head -c 8M /dev/urandom > /tmp/p8
  dd if=/tmp/p8 of=$DEV bs=64k oflag=direct status=none
  check mem-readback cmp /tmp/p8 <(dd if=$DEV bs=64k count=128 iflag=direct status=none)
  stop_server mem-stop
else
  fail mem-start "no device: $(tail -n 5 /tmp/serve.err | tr '\n' ' ')"
fi

# dead_queue NAME KIND SERVE_ARGS...: serves a RAM disk whose queue thread dies (KIND:
# tag-error, tag-panic, loop-error, thread-panic; see ublk-target/src/ublk/fault.rs) at the
# first request for sector FAULT_SECTOR, while fio writes below
# it through one open descriptor. OK if the read that kills the queue does not hang, fio (its
# I/O in flight then) fails within 20 s instead of running on or hanging, the device is
# removed, and stopping the server fails with the reason.
FAULT_SECTOR=65536
# serve_diag: what the server said, and where each of its threads sleeps (after a failure).
serve_diag() {
  local t
  sed 's/^/  serve: /' /tmp/serve.err | tail -n 20
  for t in /proc/$SPID/task/*; do
    [ -d "$t" ] || continue
    echo "  thread $(cat $t/comm 2>/dev/null) state $(awk '{print $3}' $t/stat 2>/dev/null):" \
      "$(head -n 4 $t/stack 2>/dev/null | awk '{print $2}' | tr '\n' ' ')"
  done
}
dead_queue() {
  local name=$1 kind=$2 fpid dpid t0 rc
  shift 2
  export VOLMGR_UBLK_FAULT=$kind@$FAULT_SECTOR
  serve_bg /tmp/serve.$$.out /tmp/serve.err "$SERVE" mem:64M "$@"; rc=$?
  unset VOLMGR_UBLK_FAULT
  if [ $rc != 0 ]; then
    fail $name-start "no device: $(tail -n 5 /tmp/serve.err | tr '\n' ' ')"; return; fi
  [ -b "$DEV" ] || { fail $name-serves "$DEV is not a block device"; return; }
  check $name-serves dd if=$DEV of=/dev/null bs=4k count=16 iflag=direct status=none
  # allow_file_create=0: fio reopens its file between passes, and must not then create a
  # regular file where the removed device node was.
  fio --name=deadq --filename=$DEV --rw=randwrite --bs=4k --size=$((FAULT_SECTOR * 512)) \
    --ioengine=psync --direct=1 --time_based --runtime=120 --allow_file_create=0 \
    --eta=never > /tmp/deadq.fio 2>&1 &
  fpid=$!
  sleep 2
  if kill -0 $fpid 2>/dev/null; then ok $name-fio-running; else
    fail $name-fio-running "fio ended before the fault: $(tail -n 3 /tmp/deadq.fio | tr '\n' ' ')"; fi
  t0=$(uptime_s)
  # In the background: a read the kernel never completes sleeps uninterruptibly.
  dd if=$DEV of=/dev/null bs=4k skip=$((FAULT_SECTOR / 8)) count=1 iflag=direct status=none &
  dpid=$!
  if gone $dpid 30; then wait $dpid; echo "  the read at the fault: exit $?"; ok $name-fault-read-returns
  else fail $name-fault-read-returns "the read at the fault hung for 30 s"; serve_diag; kill -9 $dpid; fi
  if gone $fpid 20; then
    wait $fpid; rc=$?
    echo "  fio ended $(awk -v a=$t0 -v b=$(uptime_s) 'BEGIN{print b-a}')s after the fault, exit $rc"
    grep -m1 -iE 'error|err=' /tmp/deadq.fio | sed 's/^/  fio: /'
    if [ $rc != 0 ]; then ok $name-io-fails; else fail $name-io-fails "fio exited 0"; fi
  else
    fail $name-io-fails "fio still running (I/O served or hanging) 20 s after the fault"
    serve_diag; kill -9 $fpid
  fi
  for _ in $(seq 1 100); do [ -e $DEV ] || break; sleep 0.1; done
  if [ ! -e $DEV ]; then ok $name-device-removed; else
    fail $name-device-removed "$DEV still exists 10 s after fio ended"; fi
  kill -TERM $SPID
  if gone $SPID 60; then
    wait $SPID; rc=$?
    sed 's/^/  serve: /' /tmp/serve.err | grep -v '^  serve: *$' | tail -n 12
    if [ $rc != 0 ] && grep -q 'failed while serving: ublk queue [0-9]* died' /tmp/serve.err; then
      ok $name-stop-reports-failure
    else fail $name-stop-reports-failure "ublk-serve exited $rc without naming the dead queue"; fi
    [ -e /sys/class/ublk-char/ublkc${DEV#/dev/ublkb} ] &&
      fail $name-deleted "ublkc${DEV#/dev/ublkb} still registered" || ok $name-deleted
  else
    fail $name-stop-reports-failure "ublk-serve still running 60 s after SIGTERM"
    serve_diag; kill -9 $SPID
  fi
}

step "a tag task fails (2 queues)"
dead_queue deadq-tag tag-error --queues 2 --depth 16
step "a tag task panics (1 queue, user recovery: no re-queueing for a server that lives)"
dead_queue deadq-tag-panic tag-panic --queues 1 --depth 16 --user-recovery
step "a queue's event loop fails (2 queues, user recovery)"
dead_queue deadq-loop loop-error --queues 2 --depth 16 --user-recovery
step "a queue thread panics (2 queues)"
dead_queue deadq-thread-panic thread-panic --queues 2 --depth 16
step "done"
