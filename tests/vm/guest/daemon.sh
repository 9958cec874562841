#!/bin/bash
# daemon.sh - the real `volmgr daemon` serving named devices as /dev/ublkbN: linear and
# striped tables, `dev list --json`, ext4 round trip, `dev remove` refused while mounted,
# tables stacked on other devices through /dev/volmgr/NAME, a raid1 table, a thin pool and a
# thin volume, and SIGTERM (exit 0, every ublk device deleted).
#
# Usage: daemon.sh VOLMGR_BINARY   (run by tests/vm/run-vm.sh)
# vm-modules: ublk_drv ext4
# vm-checks: 45
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/daemon-lib.sh"

VOLMGR=${1:-${VOLMGR:-}}
[ -x "$VOLMGR" ] || { fail dmn-setup "volmgr binary '$VOLMGR' not executable"; exit 1; }
export VOLMGR_STATE_DIR=/tmp/volmgr-state
export RUST_LOG=${RUST_LOG:-warn}
W=/tmp/dmn
M=/tmp/mnt
rm -rf $W $VOLMGR_STATE_DIR; mkdir -p $W $M
DLOG=$W/daemon.log

step "daemon start"
if daemon_start $DLOG; then ok dmn-start; else
  fail dmn-start "$(tail -n 5 $DLOG | tr '\n' ' ')"; exit 1; fi
if "$VOLMGR" daemon --state-dir $VOLMGR_STATE_DIR > $W/second.log 2>&1; then
  fail dmn-refuses-second "a second daemon started on the same state dir"
else
  grep -q "already runs" $W/second.log && ok dmn-refuses-second \
    || fail dmn-refuses-second "$(tr '\n' ' ' < $W/second.log)"
fi
[ "$(stat -c %a $VOLMGR_STATE_DIR/control.sock)" = 600 ] && ok dmn-socket-0600 \
  || fail dmn-socket-0600 "mode $(stat -c %a $VOLMGR_STATE_DIR/control.sock)"

# create NAME TABLEFILE: `dev create`, must print /dev/ublkbN of an existing block device.
create() {
  local out
  out=$(vm create "$1" --table "$2" 2>&1)
  if [[ "$out" =~ ^/dev/ublkb[0-9]+$ ]] && wait_for -b "$out" 10; then
    ok "dmn-create-$1"; echo "  $1 -> $out"; echo "$out" > $W/$1.path
  else
    fail "dmn-create-$1" "$(echo "$out" | tr '\n' ' ')"; return 1
  fi
}
path() { cat $W/$1.path 2>/dev/null; }

step "linear and striped tables"
truncate -s 64M $W/a
truncate -s 48M $W/s0 $W/s1 $W/s2
echo "0 131072 linear $W/a 0" > $W/lin.t
echo "0 294912 striped 3 128 $W/s0 0 $W/s1 0 $W/s2 0" > $W/str.t
create lin $W/lin.t
create str $W/str.t
LIN=$(path lin); STR=$(path str)
J=$(vm list --json)
echo "$J" | jq -c '.[] | {name, path, size, state, targets}' | sed 's/^/  | /'
expect_eq dmn-list-json \
  "$(echo "$J" | jq -r '[.[] | "\(.name)=\(.path)=\(.size)=\(.targets)=\(.state)"] | join(" ")')" \
  "lin=$LIN=67108864=linear=active str=$STR=150994944=striped=active"
# Zero copy where the driver has UBLK_F_AUTO_BUF_REG (Linux 6.16+), the driver's copy before.
want_path=copy; kernel_at_least 6 16 && want_path=zero-copy
expect_eq dmn-data-path "$(echo "$J" | jq -r '[.[].data_path] | unique | join(",")')" "$want_path"
expect_eq dmn-striped-size "$(blockdev --getsz "$STR" 2>&1)" 294912
expect_eq dmn-table-roundtrip "$(vm table str)" "$(cat $W/str.t)"

step "ext4 on the striped device"
fs_roundtrip dmn-striped "$STR" $M

step "remove is refused while mounted"
mount -t ext4 "$STR" $M
if out=$(vm remove str 2>&1); then
  fail dmn-remove-refused-mounted "removed a mounted device: $out"
else
  echo "  refused: $out"
  [[ "$out" == *mounted* ]] && ok dmn-remove-refused-mounted \
    || fail dmn-remove-refused-mounted "unexpected error: $out"
fi
check dmn-still-works-after-refusal bash -c "
  head -c 1M /dev/urandom > $W/after && cp $W/after $M/after && sync -f $M/after &&
  echo 3 > /proc/sys/vm/drop_caches && cmp $W/after $M/after && test -b $STR &&
  $VOLMGR dev list | grep -q '^str '"
umount $M
check dmn-remove-after-umount vm remove str
for _ in $(seq 1 100); do [ -e "$STR" ] || break; sleep 0.1; done
[ -e "$STR" ] && fail dmn-remove-deletes-device "$STR still exists" || ok dmn-remove-deletes-device
expect_eq dmn-list-after-remove "$(vm list --json | jq -r '[.[].name] | join(",")')" lin

step "stacking: a table on /dev/volmgr/lin"
[ "$(readlink /dev/volmgr/lin)" = "$LIN" ] && ok dmn-volmgr-symlink \
  || fail dmn-volmgr-symlink "/dev/volmgr/lin -> '$(readlink /dev/volmgr/lin)', want $LIN"
echo "0 65536 linear /dev/volmgr/lin 32768" > $W/stk.t
if create stk $W/stk.t; then
  STK=$(path stk)
  head -c 4M /dev/urandom > $W/pat
  dd if=$W/pat of="$STK" bs=1M seek=2 oflag=direct conv=fsync status=none
  # stk sector 4096 (2 MiB) is lin sector 32768 + 4096 = 18 MiB.
  check dmn-stacked-reads-through bash -c \
    "dd if=$LIN bs=1M skip=18 count=4 iflag=direct status=none | cmp - $W/pat"
  if out=$(vm remove lin 2>&1); then fail dmn-remove-refused-in-use "removed lin under stk"
  else
    [[ "$out" == *"used by stk"* ]] && ok dmn-remove-refused-in-use \
      || fail dmn-remove-refused-in-use "unexpected error: $out"
  fi
fi

step "raid1"
truncate -s 64M $W/r0 $W/r1
echo "0 131072 raid raid1 2 128 nosync 2 - $W/r0 - $W/r1" > $W/raid.t
if create raid $W/raid.t; then
  RAID=$(path raid)
  fs_roundtrip dmn-raid1 "$RAID" $M
  vm status raid | sed 's/^/  | /'
  check dmn-raid1-legs-identical cmp $W/r0 $W/r1
fi

step "thin pool and thin volume"
truncate -s 8M $W/meta
truncate -s 128M $W/data
echo "0 262144 thin-pool $W/meta $W/data 128 0" > $W/pool.t
if create pool $W/pool.t; then
  check dmn-create-thin-0 vm message pool create_thin 0
  echo "0 196608 thin /dev/volmgr/pool 0" > $W/thin.t
  if create thin $W/thin.t; then
    THIN=$(path thin)
    fs_roundtrip dmn-thin "$THIN" $M
    vm status pool | sed 's/^/  pool | /'
    vm status thin | sed 's/^/  thin | /'
  fi
fi
vm list | sed 's/^/  | /'

step "SIGTERM"
PATHS=$(vm list --json | jq -r '.[].path' | tr '\n' ' ')
kill -TERM $DPID
if gone $DPID 120; then
  wait $DPID; rc=$?
  left=""
  for p in $PATHS; do [ -e "$p" ] && left="$left $p"; done
  tail -n 5 $DLOG | sed 's/^/  daemon: /'
  if [ $rc = 0 ] && [ -z "$left" ]; then ok dmn-sigterm-clean
  else fail dmn-sigterm-clean "exit $rc, devices left:${left:- none}"; fi
else
  fail dmn-sigterm-clean "daemon still running 120s after SIGTERM"
  stuck_report $DPID $DLOG; kill -9 $DPID
fi
rm -rf $W
step "done"
