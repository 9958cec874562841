#!/bin/bash
# ublk-tables.sh - linear and striped tables served as /dev/ublkbN, cross-checked with the
# kernel's device-mapper: the same table given to dmsetup over loop devices on the same
# backing files must read back exactly what our server wrote, and the other way round.
#
# Usage: ublk-tables.sh UBLK_SERVE_BINARY   (run by tests/vm/run-vm.sh)
# vm-modules: ublk_drv ext4 dm-mod loop
# vm-checks: 19
. "$(dirname "$0")/lib.sh"

SERVE=${1:-${UBLK_SERVE:-}}
[ -x "$SERVE" ] || { fail setup "ublk-serve binary '$SERVE' not executable"; exit 1; }
M=/tmp/mnt
mkdir -p $M
export RUST_LOG=${RUST_LOG:-warn}
load_modules dm-mod loop || exit 1

start_server() {
  serve_bg /tmp/serve.$$.out /tmp/serve.err "$SERVE" "$@"
}
stop_server() {
  kill -TERM $SPID
  for _ in $(seq 1 600); do kill -0 $SPID 2>/dev/null || break; sleep 0.1; done
  if kill -0 $SPID 2>/dev/null; then fail "$1" "still running 60s after SIGTERM"; kill -9 $SPID; return; fi
  wait $SPID; local rc=$?
  if [ $rc = 0 ] && [ ! -e "$DEV" ]; then ok "$1"; else
    fail "$1" "exit $rc: $(tail -n 3 /tmp/serve.err | tr '\n' ' ')"; fi
}
# dm_table TABLEFILE: the table with every /tmp/FILE replaced by a loop device on it
# (sets LOOPS for cleanup).
dm_table() {
  local t f l
  t=$(cat "$1"); LOOPS=""
  for f in $(grep -o '/tmp/[A-Za-z0-9_.-]*' "$1" | sort -u); do
    l=$(losetup -f --show "$f") || return 1
    LOOPS="$LOOPS $l"
    t=$(printf '%s\n' "$t" | sed "s|$f |$l |g")
  done
  printf '%s\n' "$t"
}
dm_cleanup() { dmsetup remove "$1" 2>/dev/null; for l in $LOOPS; do losetup -d $l; done; }

# crosscheck NAME TABLEFILE SECTORS: write through ours, read through dm; then the reverse.
crosscheck() {
  local name=$1 tf=$2 sectors=$3 s1 s2 tbl
  step "$name: ours -> kernel dm"
  if ! start_server table:$tf --queues 2; then
    fail "$name-start" "$(tail -n 5 /tmp/serve.err | tr '\n' ' ')"; return; fi
  ok "$name-start"
  expect_eq "$name-size" "$(blockdev --getsz $DEV)" "$sectors"
  Q=/sys/block/$(basename $DEV)/queue
  echo "  io_min $(cat $Q/minimum_io_size) io_opt $(cat $Q/optimal_io_size) discard $(cat $Q/discard_granularity) max_sectors_kb $(cat $Q/max_sectors_kb)"
  check "$name-fio-verify" fio --name=v --filename=$DEV --rw=randwrite --bsrange=4k-256k \
    --size=32M --ioengine=io_uring --iodepth=32 --direct=1 --verify=crc32c --verify_fatal=1 \
    --randrepeat=0 --eta=never --group_reporting --output-format=terse
  # Unaligned to chunks on purpose: 1M blocks starting at 4k.
  dd if=/dev/urandom of=$DEV bs=1M count=12 seek=4k oflag=direct,seek_bytes status=none
  s1=$(dd if=$DEV bs=1M iflag=direct status=none | sha256sum)
  stop_server "$name-stop"
  tbl=$(dm_table $tf) || { fail "$name-dm" "losetup failed"; return; }
  echo "  dm table: $tbl"
  if dmsetup create "vm-$name" --table "$tbl"; then
    s2=$(dd if=/dev/mapper/vm-$name bs=1M iflag=direct status=none | sha256sum)
    expect_eq "$name-dm-reads-our-data" "$s2" "$s1"
    step "$name: kernel dm -> ours"
    dd if=/dev/urandom of=/dev/mapper/vm-$name bs=1M count=8 seek=7000k oflag=direct,seek_bytes status=none
    s2=$(dd if=/dev/mapper/vm-$name bs=1M iflag=direct status=none | sha256sum)
  else
    fail "$name-dm-reads-our-data" "dmsetup create failed"
  fi
  dm_cleanup "vm-$name"
  if start_server table:$tf --queues 1; then
    s1=$(dd if=$DEV bs=1M iflag=direct status=none | sha256sum)
    expect_eq "$name-we-read-dm-data" "$s1" "$s2"
    stop_server "$name-stop2"
  else
    fail "$name-we-read-dm-data" "restart failed: $(tail -n 3 /tmp/serve.err | tr '\n' ' ')"
  fi
}

# Striped: 3 legs x 16 MiB, 64 KiB chunks (dm-stripe placement).
for i in 0 1 2; do truncate -s 16M /tmp/s$i; done
cat > /tmp/striped.table <<'EOF'
0 98304 striped 3 128 /tmp/s0 0 /tmp/s1 0 /tmp/s2 0
EOF
crosscheck striped /tmp/striped.table 98304

# Linear: two segments, the second at an offset inside its file.
truncate -s 16M /tmp/l0; truncate -s 17M /tmp/l1
cat > /tmp/linear.table <<'EOF'
0 32768 linear /tmp/l0 0
32768 32768 linear /tmp/l1 2048
EOF
crosscheck linear /tmp/linear.table 65536

step "ext4 on a striped table"
if start_server table:/tmp/striped.table --queues 2; then
  check striped-mkfs-ext4 mkfs.ext4 -F -q $DEV
  if check striped-mount mount -t ext4 $DEV $M; then
    for i in $(seq 1 20); do head -c $(( i * 20000 )) /dev/urandom > $M/f$i; done
    (cd $M && sha256sum f*) > /tmp/ssums
    umount $M
    check striped-e2fsck-clean e2fsck_clean $DEV
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 -o ro $DEV $M && { check striped-ext4-verify bash -c "cd $M && sha256sum --quiet -c /tmp/ssums"; umount $M; }
  fi
  stop_server striped-ext4-stop
else
  fail striped-ext4 "start failed"
fi
rm -f /tmp/s0 /tmp/s1 /tmp/s2 /tmp/l0 /tmp/l1
step "done"
