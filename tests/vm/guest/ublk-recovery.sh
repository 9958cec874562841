#!/bin/bash
# ublk-recovery.sh - kill -9 of the ublk server under a mounted, busy ext4, then re-attach
# (UBLK_F_USER_RECOVERY + REISSUE): the filesystem must see no I/O error, every file written
# with fsync before the kill must be intact, and e2fsck -fn must be clean.
#
# Usage: ublk-recovery.sh UBLK_SERVE_BINARY   (run by tests/vm/run-vm.sh)
# vm-modules: ublk_drv ext4
# vm-checks: 17
. "$(dirname "$0")/lib.sh"

SERVE=${1:-${UBLK_SERVE:-}}
[ -x "$SERVE" ] || { fail setup "ublk-serve binary '$SERVE' not executable"; exit 1; }
IMG=/tmp/ublk-recovery.img
M=/tmp/mnt
mkdir -p $M
export RUST_LOG=${RUST_LOG:-warn}

# serve OUT ERR ARGS...: starts ublk-serve in the background; SPID; DEV when it printed one.
serve() {
  local out=$1 err=$2; shift 2
  serve_bg "$out" "$err" "$SERVE" "$@"
}

step "start with user recovery"
truncate -s 256M $IMG
if serve /tmp/s1.out /tmp/s1.err $IMG --queues 2 --user-recovery; then ok rec-start; else
  fail rec-start "$(tail -n 5 /tmp/s1.err | tr '\n' ' ')"; exit 1; fi
S1=$SPID; ID=${DEV#/dev/ublkb}
echo "  $DEV served by pid $S1"
check rec-mkfs mkfs.ext4 -F -q $DEV || exit 1
check rec-mount mount -t ext4 $DEV $M || exit 1
# Only this run's kernel messages count below (ublk-basic.sh fails I/O on purpose).
dmesg -c > /dev/null

step "a second server must not take a live device"
if serve /tmp/s2.out /tmp/s2.err $IMG --recover $ID; then
  fail recover-refuses-live "took over a live device"; kill -TERM $SPID
else
  gone $SPID 30
  grep -q "live" /tmp/s2.err && ok recover-refuses-live \
    || fail recover-refuses-live "unexpected error: $(tail -n 2 /tmp/s2.err | tr '\n' ' ')"
fi

step "write load: files written with fsync, one after another"
rm -f /tmp/stop /tmp/fsynced /tmp/writer.err
(
  i=0
  while [ ! -e /tmp/stop ]; do
    i=$((i + 1))
    if dd if=/dev/urandom of=$M/f$i bs=64k count=4 conv=fsync status=none 2>>/tmp/writer.err; then
      (cd $M && sha256sum f$i) >> /tmp/fsynced
    else
      echo "write of f$i failed" >> /tmp/writer.err
    fi
  done
) &
W=$!
sleep 3
before=$(wc -l < /tmp/fsynced)
echo "  $before files fsynced before the kill"

step "kill -9 the server under load"
kill -9 $S1
if gone $S1 60; then ok rec-killed; else fail rec-killed "server did not die in 60s (deadlock?)"; exit 1; fi
wait $S1 2>/dev/null
[ -b $DEV ] && ok device-survives-kill || fail device-survives-kill "$DEV vanished"
sleep 1

step "recover"
t=$(uptime_s)
if serve /tmp/s3.out /tmp/s3.err $IMG --recover $ID; then ok rec-recover; else
  fail rec-recover "$(tail -n 5 /tmp/s3.err | tr '\n' ' ')"
  touch /tmp/stop; kill -9 $W; exit 1
fi
S3=$SPID
echo "  recovered $DEV in $(awk -v a=$t -v b=$(uptime_s) 'BEGIN{print b-a}')s, now pid $S3"
expect_eq rec-same-device "$DEV" "/dev/ublkb$ID"
sleep 3
touch /tmp/stop
if gone $W 120; then ok writer-finished; else fail writer-finished "writer stuck"; kill -9 $W; fi
wait $W
after=$(wc -l < /tmp/fsynced)
echo "  $after files fsynced in total ($((after - before)) after the kill started)"
if [ -s /tmp/writer.err ]; then fail writer-no-io-error "$(head -n 3 /tmp/writer.err | tr '\n' ' ')"
else ok writer-no-io-error; fi
[ "$after" -gt "$before" ] && ok writes-continue-after-recovery \
  || fail writes-continue-after-recovery "no file completed after the kill"
if dmesg | grep -E "I/O error|EXT4-fs error|Buffer I/O" | grep -q ublkb; then
  fail kernel-no-io-error "$(dmesg | grep ublkb | grep -E 'error' | tail -n 3 | tr '\n' ' ')"
else ok kernel-no-io-error; fi

step "verify"
check rec-umount umount $M
check rec-e2fsck-clean e2fsck_clean $DEV
echo 3 > /proc/sys/vm/drop_caches
if check rec-remount mount -t ext4 -o ro $DEV $M; then
  check fsynced-files-intact bash -c "cd $M && sha256sum --quiet -c /tmp/fsynced"
  umount $M
fi

step "stop the recovered server"
kill -TERM $S3
if gone $S3 60; then
  wait $S3; rc=$?
  sed 's/^/  serve: /' /tmp/s3.err | tail -n 10
  if [ $rc = 0 ] && [ ! -e $DEV ]; then ok rec-stop-deletes-device
  else fail rec-stop-deletes-device "exit $rc, node exists: $([ -e $DEV ] && echo yes || echo no)"; fi
else
  fail rec-stop-deletes-device "server still running 60s after SIGTERM"; kill -9 $S3
fi
rm -f $IMG
step "done"
