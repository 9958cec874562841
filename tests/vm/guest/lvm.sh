#!/bin/bash
# lvm.sh - the volume manager against the kernel's own LVM: a VG volmgr writes on loop
# devices is activated by real lvm2 on kernel device-mapper, and ext4 made through either
# activation is mounted and fsck'ed clean through the other; a VG lvm2 writes (with dm
# active, so lvm2 zeroes and activates as in production) is activated by volmgr as
# /dev/VG/LV -> /dev/ublkbN. Then the protection: with a volmgr raid1 LV in the VG, lvm2's
# lvchange -ay / lvcreate / vgextend are refused and change nothing of ours. Then lvextend -r,
# lvreduce -r, and pvmove under a written ext4 with a kill -9 of the daemon mid-move. Last,
# discovery: an lvm2 VG on a loop device is listed (vgs/lvs/pvs) and activated by volmgr with
# no --devices and no devices file, and reads back the bytes written where lvm2 put the LV.
#
# Usage: lvm.sh VOLMGR_BINARY   (run by tests/vm/run-vm.sh through all.sh)
# vm-modules: ublk_drv ext4 dm-mod loop
# vm-checks: 64
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/daemon-lib.sh"

VOLMGR=${1:-${VOLMGR:-}}
[ -x "$VOLMGR" ] || { fail lvm-setup "volmgr binary '$VOLMGR' not executable"; exit 1; }
load_modules dm-mod loop || exit 1
export VOLMGR_STATE_DIR=/tmp/volmgr-lvm-state
export RUST_LOG=${RUST_LOG:-warn}
W=/tmp/lvmvm
M=/tmp/mnt-lvm
rm -rf $W $VOLMGR_STATE_DIR; mkdir -p $W/etc $M $VOLMGR_STATE_DIR
DLOG=$W/daemon.log

LOOPS=()
# d5: 64 MiB, for the discovery step (an lvm2 VG found with no device hints).
for i in 0 1 2 3 4 5; do
  if [ $i = 5 ]; then truncate -s 64M $W/d$i; else truncate -s 160M $W/d$i; fi
  LOOPS+=("$(losetup -f --show $W/d$i)")
done
A="${LOOPS[0]},${LOOPS[1]},${LOOPS[2]}"
B="${LOOPS[3]}"
filter=""
for l in "${LOOPS[@]}"; do filter="$filter\"a|^$l\$|\", "; done
cat > $W/etc/lvm.conf <<EOF
devices { filter = [ $filter "r|.*|" ] global_filter = [ $filter "r|.*|" ] use_devicesfile = 0
  obtain_device_list_from_udev = 0 hints = "none" scan = [ "/dev" ] }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
global { use_lvmlockd = 0 }
EOF
export LVM_SYSTEM_DIR=$W/etc LVM_SUPPRESS_FD_WARNINGS=1
lvm() { command lvm "$@"; }
v() { "$VOLMGR" "$@"; }

step "volmgr writes a VG and LVs; lvm2 checks and activates them on kernel dm"
check lvm-vgcreate v vgcreate -s 1m vga ${LOOPS[0]} ${LOOPS[1]} ${LOOPS[2]} --devices $A
check lvm-lvcreate-linear v lvcreate -an -L 40m -n lin vga --devices $A
check lvm-lvcreate-striped v lvcreate -an -i 3 -I 64k -L 48m -n str vga --devices $A
check lvm-lvm2-vgck lvm vgck vga
check lvm-lvm2-activates lvm lvchange -ay vga/lin vga/str
if wait_for -b /dev/mapper/vga-lin 10 && wait_for -b /dev/mapper/vga-str 10; then
  ok lvm-dm-devices; else fail lvm-dm-devices "no /dev/mapper/vga-{lin,str}"; fi
check lvm-dm-mkfs mkfs.ext4 -F -q /dev/mapper/vga-lin
mount /dev/mapper/vga-lin $M && make_tree $M $W/lin.sums && umount $M
check lvm-lvm2-deactivates lvm lvchange -an vga/lin vga/str

step "volmgr activates the same LVs through ublk and reads what the kernel wrote"
daemon_start $DLOG || { fail lvm-daemon "$(tail -n 5 $DLOG | tr '\n' ' ')"; exit 1; }
check lvm-volmgr-activates v vgchange -ay vga --devices $A
if [ -L /dev/vga/lin ] && wait_for -b /dev/vga/lin 10; then ok lvm-dev-link; else
  fail lvm-dev-link "/dev/vga/lin: $(ls -l /dev/vga 2>&1 | tr '\n' ' ')"; fi
check lvm-volmgr-e2fsck e2fsck_clean /dev/vga/lin
mount -o ro /dev/vga/lin $M
check lvm-volmgr-reads-kernel-tree bash -c "cd $M && sha256sum --quiet -c $W/lin.sums"
umount $M
# The other way: ext4 made through our striped LV, read back by the kernel's dm-stripe.
check lvm-volmgr-mkfs-striped mkfs.ext4 -F -q /dev/vga/str
mount /dev/vga/str $M && make_tree $M $W/str.sums && umount $M
check lvm-volmgr-deactivates v vgchange -an vga --devices $A
expect_eq lvm-links-gone "$(ls /dev/vga 2>/dev/null | wc -l)" 0
check lvm-lvm2-activates-striped lvm lvchange -ay vga/str
check lvm-dm-e2fsck-striped e2fsck_clean /dev/mapper/vga-str
mount -o ro /dev/mapper/vga-str $M
check lvm-dm-reads-our-tree bash -c "cd $M && sha256sum --quiet -c $W/str.sums"
umount $M
lvm lvchange -an vga/str

step "lvm2 writes a VG (dm active); volmgr activates it"
check lvm-lvm2-vg lvm vgcreate -s 4m vgb $B
check lvm-lvm2-lv lvm lvcreate -y -L 32m -n data vgb
mkfs.ext4 -F -q /dev/vgb/data && mount /dev/vgb/data $M && make_tree $M $W/b.sums && umount $M
lvm lvchange -an vgb/data
check lvm-volmgr-activates-lvm2-lv v lvchange -ay vgb/data --devices $B
mount /dev/vgb/data $M
check lvm-volmgr-reads-lvm2-tree bash -c "cd $M && sha256sum --quiet -c $W/b.sums"
umount $M
check lvm-volmgr-deactivates-lvm2-lv v lvchange -an vgb/data --devices $B

step "a volmgr raid1 LV: lvm2 keeps off it, with kernel dm-raid available"
check lvm-volmgr-raid1 v lvcreate --type raid1 -m 1 -L 16m -n r1 vga --devices $A
R1=$(readlink -f /dev/vga/r1)
head -c 8M /dev/urandom > $W/r1.data
dd if=$W/r1.data of=$R1 bs=1M oflag=direct status=none
seq0=$(lvm vgs --noheadings -o vg_seqno vga | tr -d ' ')
if lvm lvchange -ay vga/r1 >$W/a.out 2>&1; then fail lvm-lvm2-refuses-raid1 "$(cat $W/a.out)"
else ok lvm-lvm2-refuses-raid1; fi
if ls /dev/mapper/ | grep -q 'vga-r1'; then fail lvm-no-dm-raid "$(ls /dev/mapper)"
else ok lvm-no-dm-raid; fi
if lvm lvcreate -y -L 4m -n x vga >$W/c.out 2>&1; then fail lvm-lvm2-refuses-lvcreate "$(cat $W/c.out)"
else ok lvm-lvm2-refuses-lvcreate; fi
if lvm vgextend vga ${LOOPS[4]} >$W/e.out 2>&1; then fail lvm-lvm2-refuses-vgextend "$(cat $W/e.out)"
else ok lvm-lvm2-refuses-vgextend; fi
expect_eq lvm-lvm2-wrote-nothing "$(lvm vgs --noheadings -o vg_seqno vga | tr -d ' ')" "$seq0"
expect_eq lvm-raid1-data "$(dd if=$R1 bs=1M count=8 iflag=direct status=none | sha256sum)" \
  "$(sha256sum < $W/r1.data)"

step "lvextend -r: the LV and its mounted ext4 grow online"
v lvcreate -L 32m -n grow vga --devices $A >/dev/null
mkfs.ext4 -F -q /dev/vga/grow && mount /dev/vga/grow $M
k0=$(df -k --output=size $M | tail -n1 | tr -d ' ')
if kernel_at_least 6 16; then
  check lvm-lvextend-r v lvextend -r -L +32m vga/grow --devices $A
  k1=$(df -k --output=size $M | tail -n1 | tr -d ' ')
  if [ "$k1" -gt $(( k0 * 3 / 2 )) ]; then ok lvm-fs-grew; else fail lvm-fs-grew "${k0}K -> ${k1}K"; fi
else
  # No UBLK_U_CMD_UPDATE_SIZE before 6.16: the grow is refused with the reason, the file
  # system keeps working.
  if v lvextend -r -L +32m vga/grow --devices $A >$W/g.out 2>&1; then
    fail lvm-lvextend-r-refused "$(cat $W/g.out)"
  elif grep -q "did not take it" $W/g.out; then ok lvm-lvextend-r-refused
  else fail lvm-lvextend-r-refused "$(cat $W/g.out)"; fi
  echo still > $M/f && sync && ok lvm-fs-still-works
fi
umount $M
check lvm-grow-e2fsck e2fsck_clean /dev/vga/grow
v lvremove -y vga/grow --devices $A >/dev/null

step "lvreduce -r: the ext4 shrinks first, then the LV"
v lvcreate -L 64m -n shrink vga --devices $A >/dev/null
mkfs.ext4 -F -q /dev/vga/shrink && mount /dev/vga/shrink $M && head -c 8M /dev/urandom > $M/f \
  && (cd $M && sha256sum f > $W/shrink.sums) && umount $M
check lvm-lvreduce-r v lvreduce -r -L 32m vga/shrink --devices $A
expect_eq lvm-reduced-size "$(blockdev --getsize64 /dev/vga/shrink)" 33554432
check lvm-reduced-e2fsck e2fsck_clean /dev/vga/shrink
mount -o ro /dev/vga/shrink $M
check lvm-reduced-data bash -c "cd $M && sha256sum --quiet -c $W/shrink.sums"
umount $M
v lvremove -y vga/shrink --devices $A >/dev/null

step "pvmove under a mounted ext4 being written; kill -9 of the daemon mid-move; resume"
check lvm-pvmove-lv bash -c "'$VOLMGR' lvcreate -L 48m -n mv vga ${LOOPS[0]} --devices $A \
  && mkfs.ext4 -F -q /dev/vga/mv && mount /dev/vga/mv $M" || exit 1
make_tree $M $W/mv.sums
v pvmove -n mv ${LOOPS[0]} --rate 4096 --devices $A >$W/pvmove1.log 2>&1 &
PMV=$!
for _ in $(seq 1 200); do vm list 2>/dev/null | grep -q '^vga-pvmove0 ' && break; sleep 0.1; done
# Files written and fsynced while the move runs, and while the daemon is gone.
( for i in $(seq 1 30); do head -c 256K /dev/urandom > $M/w$i && sync $M/w$i; sleep 0.1; done ) &
WP=$!
sleep 1
kill -9 $DPID
wait $PMV 2>/dev/null
if daemon_start $DLOG; then ok lvm-pvmove-daemon-restart; else
  fail lvm-pvmove-daemon-restart "$(tail -n 5 $DLOG | tr '\n' ' ')"; fi
if gone $WP 120; then ok lvm-pvmove-writer; else fail lvm-pvmove-writer "writer stuck"; kill -9 $WP; fi
(cd $M && sha256sum w* > $W/w.sums)
check lvm-pvmove-resumes v pvmove -n mv ${LOOPS[0]} --devices $A
expect_eq lvm-pvmove-off-source "$(v lvs --noheadings -o devices vga/mv --devices $A | grep -c "${LOOPS[0]}")" 0
umount $M
check lvm-pvmove-e2fsck e2fsck_clean /dev/vga/mv
mount -o ro /dev/vga/mv $M
check lvm-pvmove-data bash -c "cd $M && sha256sum --quiet -c $W/mv.sums && sha256sum --quiet -c $W/w.sums"
umount $M
v lvremove -y vga/mv --devices $A >/dev/null

# Four files, not three: raid10 -i 2 -m 1 has four images, and no two images share a PV.
step "a VG on four files: every LV type volmgr creates, ext4 on each"
F=$W/files; mkdir -p $F $W/mf
for i in 0 1 2 3; do truncate -s 200M $F/f$i; done
FD="$F/f0,$F/f1,$F/f2,$F/f3"
check lvm-files-vg v vgcreate vgf $F/f0 $F/f1 $F/f2 $F/f3 --devices $FD
one_type() { # NAME LVCREATE-ARGS...: create, mkfs, write, fsck, verify
  local n=$1; shift
  check "lvm-type-$n" bash -c "set -e; '$VOLMGR' lvcreate -n $n $* vgf --devices $FD
    mkfs.ext4 -F -q /dev/vgf/$n; mount /dev/vgf/$n $W/mf
    head -c 4M /dev/urandom > $W/mf/data; (cd $W/mf && sha256sum data > $W/$n.sum); umount $W/mf
    e2fsck -fn /dev/vgf/$n; mount -o ro /dev/vgf/$n $W/mf
    (cd $W/mf && sha256sum --quiet -c $W/$n.sum); umount $W/mf"
}
one_type lin -L 24m
one_type str -i 3 -L 24m
one_type r1 --type raid1 -m 1 -L 24m
one_type r5 --type raid5 -i 2 -L 24m
one_type r10 --type raid10 -i 2 -m 1 -L 24m
v lvcreate --type thin-pool -L 48m -n pool vgf --devices $FD >/dev/null
one_type thin -V 64m -T pool
check lvm-type-snap bash -c "set -e; '$VOLMGR' lvcreate -s vgf/thin -n snap --devices $FD
  e2fsck -fn /dev/vgf/snap; mount -o ro /dev/vgf/snap $W/mf
  (cd $W/mf && sha256sum --quiet -c $W/thin.sum); umount $W/mf"
expect_eq lvm-files-all-active "$(v lvs --noheadings -o lv_attr vgf --devices $FD | grep -c -- '-a-')" 8
check lvm-files-deactivate v vgchange -an vgf --devices $FD

step "discovery: a VG lvm2 wrote on a loop device, found with no --devices and no devices file"
# What this step must not be given: a devices list (option or file). The guest's / is the
# host's, read-only: a devices file there is pointed away from (a path that does not exist is
# no devices file, as with lvm2's use_devicesfile=0).
unset VOLMGR_LVM_DEVICESFILE
if [ -e /etc/volmgr/lvm-devices ]; then
  echo "  /etc/volmgr/lvm-devices exists on this host: using none instead"
  export VOLMGR_LVM_DEVICESFILE=$W/no-devices-file
fi
L=${LOOPS[5]}
check lvm-disc-lvm2-vg bash -c "set -e; lvm pvcreate -q $L; lvm vgcreate -q -s 4m vgdisc $L
  lvm lvcreate -q -an -Zn -y -l 1 -n pad vgdisc; lvm lvcreate -q -an -Zn -y -L 16m -n data vgdisc"
# lvm2's side: 16 MiB of data where lvm2 says the LV is (pe_start + first PE * 4 MiB).
pe_start=$(lvm pvs --noheadings --units b --nosuffix -o pe_start $L | tr -d ' ')
range=$(lvm lvs --noheadings -o seg_pe_ranges vgdisc/data | tr -d ' ')   # /dev/loopN:1-4
pe=${range##*:}; pe=${pe%%-*}
head -c 16M /dev/urandom > $W/disc.data
check lvm-disc-lvm2-bytes dd if=$W/disc.data of=$L bs=1M seek=$(( pe_start + pe * 4194304 )) \
  oflag=direct,seek_bytes conv=notrunc status=none
# volmgr finds it by scanning the machine's block devices: same names, sizes and PV path as
# lvm2 reports (15 extents of 4 MiB on a 64 MiB device; the LV 16 MiB on PE 1-4 of $L).
norm() { tr -s ' ' | sed 's/^ //; s/ $//'; }
got=$(v vgs --noheadings --units b --nosuffix -o vg_name,pv_count,lv_count,vg_size,vg_free vgdisc | norm)
expect_eq lvm-disc-vgs "$got" "vgdisc 1 2 62914560 41943040"
got=$(v lvs --noheadings --units b --nosuffix -o lv_name,lv_size,devices vgdisc/data | norm)
expect_eq lvm-disc-lvs "$got" "data 16777216 $L($pe)"
got=$(v pvs --noheadings --units b --nosuffix -o pv_name,vg_name,pv_size,pv_free | norm | grep ' vgdisc ')
expect_eq lvm-disc-pvs "$got" "$L vgdisc 62914560 41943040"
expect_eq lvm-disc-lvm2-agrees \
  "$(lvm lvs --noheadings --units b --nosuffix -o lv_name,lv_size,devices vgdisc/data | norm)" \
  "data 16777216 $L($pe)"
# Activated with no device hints: /dev/vgdisc/data reads the bytes lvm2's layout holds.
check lvm-disc-activate v lvchange -ay vgdisc/data
if [ -L /dev/vgdisc/data ] && wait_for -b /dev/vgdisc/data 10; then
  expect_eq lvm-disc-reads-lvm2-bytes \
    "$(dd if=/dev/vgdisc/data bs=1M iflag=direct status=none | sha256sum)" \
    "$(sha256sum < $W/disc.data)"
else fail lvm-disc-reads-lvm2-bytes "no /dev/vgdisc/data: $(ls -l /dev/vgdisc 2>&1 | tr '\n' ' ')"; fi
check lvm-disc-deactivate v vgchange -an vgdisc
check lvm-disc-lvm2-vgchange-an lvm vgchange -an vgdisc
unset VOLMGR_LVM_DEVICESFILE

step "clean up"
v lvremove -y vga/r1 --devices $A >/dev/null
kill $DPID
gone $DPID 30 || kill -9 $DPID
for l in "${LOOPS[@]}"; do dmsetup remove_all >/dev/null 2>&1; losetup -d $l; done
exit 0
