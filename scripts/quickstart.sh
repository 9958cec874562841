#!/usr/bin/env bash
# The main job on a built-in default: three file-backed extents in a local directory, striped
# by a device-mapper table, served by the volmgr daemon (as /dev/ublkbN where the kernel has
# ublk, over NBD otherwise), then formatted, mounted, filled, checked and verified.
#
#   bash scripts/quickstart.sh            (data in ./demo; DEMO_DIR=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
bash scripts/setup.sh >/dev/null
VOLMGR="$ROOT/target/debug/volmgr"
DEMO=$(realpath -m "${DEMO_DIR:-$ROOT/demo}")
STATE="$DEMO/state"
PORT=${DEMO_PORT:-10809}
say() { printf '\n== %s\n' "$*"; }

cleanup() {
  set +e
  mountpoint -q "$DEMO/mnt" && umount "$DEMO/mnt"
  [ -n "${LOOP:-}" ] && losetup -d "$LOOP"
  [ -n "${QSD:-}" ] && kill "$QSD" && wait "$QSD" 2>/dev/null
  [ -S "$STATE/control.sock" ] && "$VOLMGR" dev remove demo --force --state-dir "$STATE" >/dev/null 2>&1
  [ -n "${DAEMON:-}" ] && kill -TERM "$DAEMON" && wait "$DAEMON" 2>/dev/null
}
trap cleanup EXIT

say "extents: three 256 MiB sparse files in $DEMO"
mkdir -p "$DEMO/mnt" "$STATE"
for i in 0 1 2; do truncate -s 256M "$DEMO/leg$i.img"; done
cat > "$DEMO/volume.table" <<EOF
# 768 MiB volume striped over three files in 64 KiB chunks (dm-stripe layout)
0 1572864 striped 3 128 $DEMO/leg0.img 0 $DEMO/leg1.img 0 $DEMO/leg2.img 0
EOF
"$VOLMGR" table check "$DEMO/volume.table"

say "daemon (state in $STATE)"
rm -f "$STATE/devices.json"
"$VOLMGR" daemon --state-dir "$STATE" 2>"$DEMO/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$STATE/control.sock" ] && break; sleep 0.1; done

if [ -e /dev/ublk-control ]; then
  DEV=$("$VOLMGR" dev create demo --table "$DEMO/volume.table" --state-dir "$STATE")
else
  echo "(this kernel has no ublk: exporting over NBD on 127.0.0.1:$PORT)"
  URI=$("$VOLMGR" dev create demo --table "$DEMO/volume.table" --nbd "127.0.0.1:$PORT" --state-dir "$STATE")
  echo "$URI"
  nbdinfo "$URI" | sed -n '1,12p'
  # No nbd kernel client here either: qemu-storage-daemon's FUSE export + a loop device.
  : > "$DEMO/fuse.img"
  qemu-storage-daemon --blockdev "driver=nbd,node-name=n0,discard=unmap,server.type=inet,server.host=127.0.0.1,server.port=$PORT,export=demo" \
    --export "type=fuse,id=e0,node-name=n0,mountpoint=$DEMO/fuse.img,writable=on" 2>"$DEMO/qsd.log" &
  QSD=$!
  for _ in $(seq 100); do [ "$(stat -c %s "$DEMO/fuse.img")" -gt 0 ] && break; sleep 0.1; done
  LOOP=$(losetup -f --show "$DEMO/fuse.img")
  DEV=$LOOP
fi
"$VOLMGR" dev list --state-dir "$STATE"

say "mkfs.ext4 + mount $DEV"
mkfs.ext4 -F -q "$DEV"
mount "$DEV" "$DEMO/mnt"
cp -r /usr/share/doc/bash /usr/share/doc/coreutils "$DEMO/mnt/" 2>/dev/null || true
head -c 64M /dev/urandom > "$DEMO/mnt/random.bin"
( cd "$DEMO/mnt" && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum ) > "$DEMO/sums"
df -h "$DEMO/mnt" | tail -1
umount "$DEMO/mnt"

say "e2fsck -fn"
e2fsck -fn "$DEV"

say "remount and verify $(wc -l < "$DEMO/sums") files"
mount "$DEV" "$DEMO/mnt"
( cd "$DEMO/mnt" && sha256sum --quiet -c "$DEMO/sums" ) && echo "all checksums match"
umount "$DEMO/mnt"
"$VOLMGR" dev list --state-dir "$STATE"
"$VOLMGR" dev status demo --state-dir "$STATE"

say "where the data went (bytes allocated per extent)"
du -h --apparent-size "$DEMO"/leg*.img | sed 's/^/apparent /'
du -h "$DEMO"/leg*.img | sed 's/^/allocated /'
echo
echo "quickstart: OK"
