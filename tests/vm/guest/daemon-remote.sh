#!/bin/bash
# daemon-remote.sh - a table over a remote NBD extent served as /dev/ublkbN: nbdkit in the
# guest (loopback only), the daemon's linear table over nbd://127.0.0.1, ext4 made, fsck'ed
# and verified through the kernel's block layer, `dev status` showing the extent, and the NBD
# server killed and restarted under writes with nothing lost.
#
# Usage: daemon-remote.sh VOLMGR_BINARY   (run by tests/vm/run-vm.sh)
# vm-modules: ublk_drv ext4
# vm-checks: 17
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/daemon-lib.sh"

VOLMGR=${1:-${VOLMGR:-}}
[ -x "$VOLMGR" ] || { fail rem-setup "volmgr binary '$VOLMGR' not executable"; exit 1; }
export VOLMGR_STATE_DIR=/tmp/volmgr-remote-state
export RUST_LOG=${RUST_LOG:-warn}
W=/tmp/drem
M=/tmp/mnt
rm -rf $W $VOLMGR_STATE_DIR; mkdir -p $W $M
DLOG=$W/daemon.log

step "loopback and an NBD server"
ip link set lo up
truncate -s 256M $W/remote.img
start_nbdkit() {
  nbdkit -f -i 127.0.0.1 -p 10809 file "$W/remote.img" >/dev/null 2>>$W/nbdkit.log &
  NPID=$!
  echo $NPID > $W/nbdkit.pid
  for _ in $(seq 1 100); do nbdinfo --size nbd://127.0.0.1:10809/ >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
if start_nbdkit; then ok rem-nbdkit; else fail rem-nbdkit "$(tail -n 3 $W/nbdkit.log)"; fi

step "daemon and a table over nbd://127.0.0.1:10809"
if daemon_start $DLOG; then ok rem-daemon-start; else
  fail rem-daemon-start "$(tail -n 5 $DLOG | tr '\n' ' ')"; exit 1; fi
echo "0 524288 linear nbd://127.0.0.1:10809/?timeout=5&reconnect-delay=30 0" > $W/rem.t
out=$(vm create rem --table $W/rem.t 2>&1)
if [[ "$out" =~ ^/dev/ublkb[0-9]+$ ]] && wait_for -b "$out" 10; then
  ok rem-create; DEV=$out; echo "  rem -> $DEV"
else
  fail rem-create "$(echo "$out" | tr '\n' ' ')"; exit 1
fi
expect_eq rem-size "$(blockdev --getsz $DEV)" 524288

step "ext4 through /dev/ublkbN onto the remote extent"
fs_roundtrip rem-ext4 "$DEV" $M
vm status rem | sed 's/^/  | /'
check rem-status-extent bash -c "$VOLMGR dev status rem | grep -q '^extent nbd://127.0.0.1:10809/.* up server 127.0.0.1:10809 connections 1/1'"

step "the server dies and comes back under writes"
head -c 16M /dev/urandom > $W/data
# The writer runs in the background; the restart happens here (an nbdkit started from a
# subshell that then exits does not live on).
dd if=$W/data of=$DEV bs=64k oflag=direct,sync status=none 2>$W/dd.err &
DD=$!
sleep 1; kill -9 $NPID; sleep 2
start_nbdkit || echo "  nbdkit did not come back: $(tail -n 3 $W/nbdkit.log)"
if wait $DD; then ok rem-write-across-restart; else
  fail rem-write-across-restart "dd: $(cat $W/dd.err)"; fi
vm status rem | sed 's/^/  | /'
tail -n 5 $W/nbdkit.log | sed 's/^/  nbdkit: /'
tail -n 5 $DLOG | sed 's/^/  daemon: /'
echo 3 > /proc/sys/vm/drop_caches
check rem-readback bash -c "cmp <(head -c 16M $DEV) $W/data"
check rem-backing-file cmp -n 16777216 $W/remote.img $W/data
check rem-reconnected bash -c "$VOLMGR dev status rem | grep -q ' reconnects [1-9]'"

step "SIGTERM"
kill -TERM $DPID
if gone $DPID 120; then wait $DPID; ok rem-sigterm; else
  fail rem-sigterm "still running"; stuck_report $DPID $DLOG; kill -9 $DPID; fi
kill "$(cat $W/nbdkit.pid)" 2>/dev/null
rm -rf $W
step "done"
