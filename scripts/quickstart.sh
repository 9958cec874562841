#!/usr/bin/env bash
# The main job on a built-in default, LVM-shaped: three file-backed PVs in a local directory,
# one volume group, a striped LV and a thin LV with a snapshot, served by the volmgr daemon (as
# /dev/VG/LV -> /dev/ublkbN where the kernel has ublk, over NBD otherwise), then formatted,
# mounted, filled, checked and verified; `lvs` at the end. The VG is in LVM2's own on-disk
# format: `pvs`/`vgs`/`lvs` of real lvm2 read it too.
#
#   bash scripts/quickstart.sh            (data in ./demo; DEMO_DIR=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
bash scripts/setup.sh >/dev/null
VOLMGR="${CARGO_TARGET_DIR:-$ROOT/target}/debug/volmgr"
DEMO=$(realpath -m "${DEMO_DIR:-$ROOT/demo}")
STATE="$DEMO/state"
VG=demo
export VOLMGR_STATE_DIR="$STATE"
# The PVs are files: volmgr's LVM verbs find them through this devices file (as lvm2's
# devices file), never by scanning the machine's disks.
export VOLMGR_LVM_DEVICESFILE="$DEMO/lvm-devices"
export DM_DEV_DIR="$DEMO/dev"
say() { printf '\n== %s\n' "$*"; }
v() { "$VOLMGR" "$@"; }

LOOPS=() QSDS=() MNTS=()
cleanup() {
  set +e
  for m in "${MNTS[@]}"; do mountpoint -q "$m" && umount "$m"; done
  for l in "${LOOPS[@]}"; do losetup -d "$l"; done
  for q in "${QSDS[@]}"; do kill "$q"; wait "$q" 2>/dev/null; done
  [ -S "$STATE/control.sock" ] && v vgchange -an "$VG" >/dev/null 2>&1
  [ -n "${DAEMON:-}" ] && kill -TERM "$DAEMON" && wait "$DAEMON" 2>/dev/null
}
trap cleanup EXIT

# attach VG/LV: sets DEV to a local block device for an active LV: /dev/VG/LV with ublk;
# without it, the LV's NBD export through qemu-storage-daemon's FUSE export and a loop device.
attach() {
  local lv=$1 uri img host exp
  if [ -e /dev/ublk-control ]; then DEV=$(readlink -f "$DM_DEV_DIR/$lv"); return; fi
  uri=$(v lvs --noheadings -o lv_dm_path "$lv" | tr -d ' ')
  img="$DEMO/${lv//\//-}.fuse"
  : > "$img"
  host=${uri#nbd://}; exp=${host#*/}; host=${host%%/*}
  qemu-storage-daemon --blockdev "driver=nbd,node-name=n0,discard=unmap,server.type=inet,server.host=${host%:*},server.port=${host##*:},export=$exp" \
    --export "type=fuse,id=e0,node-name=n0,mountpoint=$img,writable=on" >"$img.log" 2>&1 &
  QSDS+=($!)
  for _ in $(seq 100); do [ "$(stat -c %s "$img")" -gt 0 ] && break; sleep 0.1; done
  DEV=$(losetup -f --show "$img"); LOOPS+=("$DEV")
}

# Without ublk each LV is exported over NBD on a port of its own (`lvs -o lv_dm_path` says
# which).
nbd_opt() {
  [ -e /dev/ublk-control ] || echo "--nbd 127.0.0.1:0"
}

say "PVs: three 256 MiB sparse files in $DEMO"
rm -rf "$STATE" "$DEMO/dev" "$VOLMGR_LVM_DEVICESFILE"
mkdir -p "$DEMO/mnt" "$DEMO/snap" "$STATE"
for i in 0 1 2; do rm -f "$DEMO/pv$i.img"; truncate -s 256M "$DEMO/pv$i.img"; done
v pvcreate "$DEMO"/pv0.img "$DEMO"/pv1.img "$DEMO"/pv2.img
v vgcreate "$VG" "$DEMO"/pv0.img "$DEMO"/pv1.img "$DEMO"/pv2.img
v pvs
v vgs

say "daemon (state in $STATE)"
"$VOLMGR" daemon 2>"$DEMO/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$STATE/control.sock" ] && break; sleep 0.1; done
[ -e /dev/ublk-control ] || echo "(this kernel has no ublk: each LV is exported over NBD)"

say "a striped LV over the three PVs, and a thin pool with a thin LV"
v lvcreate -i 3 -I 64k -L 384m -n striped "$VG" $(nbd_opt)
v lvcreate --type thin-pool -L 256m -n pool "$VG"
v lvcreate -V 1g --thinpool pool -n thin "$VG" $(nbd_opt)

fill() { # DEV MNT SUMS: mkfs, mount, files, checksums, umount, e2fsck
  mkfs.ext4 -F -q "$1"
  mount "$1" "$2"; MNTS+=("$2")
  cp -r /usr/share/doc/bash /usr/share/doc/coreutils "$2/" 2>/dev/null || true
  head -c 32M /dev/urandom > "$2/random.bin"
  ( cd "$2" && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum ) > "$3"
  df -h "$2" | tail -1
  umount "$2"
  e2fsck -fn "$1"
}
verify() { # DEV MNT SUMS
  mount -o ro "$1" "$2"
  ( cd "$2" && sha256sum --quiet -c "$3" ) && echo "$(wc -l < "$3") files: all checksums match"
  umount "$2"
}

say "mkfs.ext4, fill, e2fsck, verify: $VG/striped"
attach "$VG/striped"; S=$DEV
fill "$S" "$DEMO/mnt" "$DEMO/striped.sums"
verify "$S" "$DEMO/mnt" "$DEMO/striped.sums"

say "mkfs.ext4, fill, e2fsck: $VG/thin; then a snapshot, and the origin changes"
attach "$VG/thin"; T=$DEV
fill "$T" "$DEMO/mnt" "$DEMO/thin.sums"
v lvcreate -s "$VG/thin" -n snap $(nbd_opt)
mount "$T" "$DEMO/mnt"; rm -rf "$DEMO/mnt/bash"; echo changed > "$DEMO/mnt/new-file"; umount "$DEMO/mnt"
say "the snapshot still holds the files as they were"
attach "$VG/snap"; P=$DEV
e2fsck -fn "$P"
verify "$P" "$DEMO/snap" "$DEMO/thin.sums"

say "lvs"
v lvs -a -o +devices
echo
echo "quickstart: OK"
