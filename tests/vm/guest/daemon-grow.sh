#!/bin/bash
# daemon-grow.sh - `volmgr dev reload` growing a linear table while ext4 is mounted on it,
# then an online `resize2fs`. The new size reaches the kernel through ublk's
# UBLK_U_CMD_UPDATE_SIZE, which only Linux >= 6.16 has: on an older kernel the grow check is
# reported as not possible (a `CHECK_SKIP` line, never a CHECK_OK) and only the refusal is
# checked (the reload must fail with an error that says why, and the device keep working).
#
# Usage: daemon-grow.sh VOLMGR_BINARY   (run by tests/vm/run-vm.sh;
#        VM_KERNEL_SUITE=trixie-backports gives a kernel that has UPDATE_SIZE)
# vm-modules: ublk_drv ext4
# vm-checks: 16
# vm-checks-below-6.16: 14
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/daemon-lib.sh"

VOLMGR=${1:-${VOLMGR:-}}
[ -x "$VOLMGR" ] || { fail grow-setup "volmgr binary '$VOLMGR' not executable"; exit 1; }
export VOLMGR_STATE_DIR=/tmp/volmgr-grow-state
export RUST_LOG=${RUST_LOG:-warn}
W=/tmp/dgrow
M=/tmp/mnt
rm -rf $W $VOLMGR_STATE_DIR; mkdir -p $W $M
DLOG=$W/daemon.log

KV=$(uname -r)
has_update_size() {
  local maj min
  maj=${KV%%.*}; min=${KV#*.}; min=${min%%[.+-]*}
  [ "$maj" -gt 6 ] || { [ "$maj" = 6 ] && [ "$min" -ge 16 ]; }
}

step "daemon, linear device, ext4"
daemon_start $DLOG || { fail grow-start "$(tail -n 5 $DLOG | tr '\n' ' ')"; exit 1; }
truncate -s 64M $W/a $W/b
echo "0 131072 linear $W/a 0" > $W/small.t
printf '0 131072 linear %s 0\n131072 131072 linear %s 0\n' $W/a $W/b > $W/big.t
DEV=$(vm create vol --table $W/small.t 2>&1)
if [[ "$DEV" =~ ^/dev/ublkb[0-9]+$ ]] && wait_for -b "$DEV" 10; then ok grow-start; else
  fail grow-start "dev create: $DEV"; exit 1; fi
check grow-mkfs mkfs.ext4 -F -q "$DEV" || exit 1
check grow-mount mount -t ext4 "$DEV" $M || exit 1
make_tree $M $W/sums
blocks0=$(df -k --output=size $M | tail -n1 | tr -d ' ')

if has_update_size; then
  step "reload with a table twice the size, while mounted"
  check grow-reload vm reload vol --table $W/big.t
  expect_eq grow-kernel-size "$(blockdev --getsz "$DEV")" 262144
  expect_eq grow-list-size "$(vm list --json | jq -r '.[] | select(.name == "vol") | .size')" 134217728
  expect_eq grow-table "$(vm table vol)" "$(cat $W/big.t)"
  check grow-resize2fs-online resize2fs "$DEV"
  blocks1=$(df -k --output=size $M | tail -n1 | tr -d ' ')
  echo "  ext4 size ${blocks0}K -> ${blocks1}K"
  if [ "$blocks1" -gt $(( blocks0 * 3 / 2 )) ]; then
    ok grow-fs-bigger
    # The whole online grow worked (the check a kernel without UPDATE_SIZE reports as skipped).
    [ "$(blockdev --getsz "$DEV")" = 262144 ] && ok grow-online
  else
    fail grow-fs-bigger "ext4 size ${blocks0}K -> ${blocks1}K"
  fi
  # Fill past the old end: the new blocks must be real.
  check grow-write-new-space bash -c "head -c 90M /dev/urandom > $M/fill && sync -f $M/fill &&
    (cd $M && sha256sum fill) >> $W/sums"
else
  step "reload growing the table: not possible on $KV"
  echo "CHECK_SKIP grow-online: kernel $KV lacks UBLK_U_CMD_UPDATE_SIZE (Linux >= 6.16);" \
    "run with VM_KERNEL_SUITE=trixie-backports"
  if out=$(vm reload vol --table $W/big.t 2>&1); then
    fail grow-refused-clearly "reload claimed success: $out"
  else
    echo "  refused: $out"
    [[ "$out" == *6.16* ]] && ok grow-refused-clearly || fail grow-refused-clearly "unclear error: $out"
  fi
  expect_eq grow-kernel-size-unchanged "$(blockdev --getsz "$DEV")" 131072
  # The refused reload leaves the old table in place: daemon and kernel agree on the size.
  expect_eq grow-table-unchanged "$(vm table vol)" "$(cat $W/small.t)"
  expect_eq grow-list-size-unchanged "$(vm list --json | jq -r '.[] | select(.name == "vol") | .size')" 67108864
  check grow-still-works bash -c "head -c 1M /dev/urandom > $M/after && sync -f $M/after &&
    (cd $M && sha256sum after) >> $W/sums"
fi

step "verify"
check grow-umount umount $M
check grow-e2fsck-clean e2fsck_clean "$DEV"
echo 3 > /proc/sys/vm/drop_caches
if check grow-remount mount -t ext4 -o ro "$DEV" $M; then
  check grow-verify bash -c "cd $M && sha256sum --quiet -c $W/sums"
  umount $M
fi
kill -TERM $DPID
if gone $DPID 60; then wait $DPID; rc=$?; expect_eq grow-sigterm-exit "$rc" 0
else fail grow-sigterm-exit "daemon still running"; kill -9 $DPID; fi
rm -rf $W
step "done"
