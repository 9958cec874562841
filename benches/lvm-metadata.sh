#!/usr/bin/env bash
# Metadata operations of the volume manager against lvm2 on the same PVs (issue 12):
# `lvcreate` of N LVs one command at a time, `lvs` of the VG with N LVs, `lvremove` of the N LVs
# one command at a time. lvm2 runs with `--driverloaded n` (this host has no device-mapper; it
# writes the same metadata), both with `-an -Zn`-equivalents so only metadata is written. Each
# tool gets the same three loop devices (PVs with 16 MiB metadata areas: N=1000 LVs of text is
# about 400 KiB, past what the default area holds in its ring), one after the other.
#
#   bash benches/lvm-metadata.sh          (N=1000 by default; LVS_RUNS=5)
# Prints `BENCH op tool seconds` lines and a ratio table (lvm2 time / volmgr time: above 1.0
# means volmgr is faster). Needs root (losetup) and lvm2.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
LVS_RUNS=${LVS_RUNS:-5}
cargo build -q --release -p volmgr
V=$(pwd)/target/release/volmgr
W=$(mktemp -d /tmp/lvm-bench.XXXXXX)
LOOPS=()
cleanup() {
  for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
for i in 0 1 2; do
  truncate -s 3G "$W/d$i"
  LOOPS+=("$(losetup -f --show "$W/d$i")")
done
DEVS=$(IFS=,; echo "${LOOPS[*]}")
filter=""
for l in "${LOOPS[@]}"; do filter="$filter\"a|^$l\$|\", "; done
mkdir -p "$W/etc"
cat > "$W/etc/lvm.conf" <<EOF
devices { filter = [ $filter "r|.*|" ] global_filter = [ $filter "r|.*|" ] use_devicesfile = 0
  obtain_device_list_from_udev = 0 hints = "none" scan = [ "/dev" ] }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
EOF
export LVM_SYSTEM_DIR=$W/etc LVM_SUPPRESS_FD_WARNINGS=1
wipe() { for l in "${LOOPS[@]}"; do dd if=/dev/zero of="$l" bs=1M count=20 status=none; done; }
now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

declare -A T
run_tool() { # TOOL CREATE REMOVE LVS
  local tool=$1 t0 t1 i
  t0=$(now)
  for i in $(seq 1 "$N"); do eval "$2" >/dev/null 2>&1 || { echo "$tool lvcreate $i failed"; eval "$2"; exit 1; }; done
  t1=$(now); T[$tool,lvcreate]=$(secs "$t0" "$t1")
  t0=$(now)
  for _ in $(seq 1 "$LVS_RUNS"); do eval "$4" >/dev/null 2>&1; done
  t1=$(now); T[$tool,lvs]=$(echo "($t1 - $t0) / $LVS_RUNS" | bc -l)
  [ "$(eval "$4" 2>/dev/null | wc -l)" -ge "$N" ] || { echo "$tool lvs lists fewer than $N LVs"; exit 1; }
  t0=$(now)
  for i in $(seq 1 "$N"); do eval "$3" >/dev/null 2>&1 || { echo "$tool lvremove $i failed"; exit 1; }; done
  t1=$(now); T[$tool,lvremove]=$(secs "$t0" "$t1")
  for op in lvcreate lvs lvremove; do echo "BENCH $op $tool ${T[$tool,$op]}"; done
}

echo "== lvm2 $(lvm version | sed -n 's/ *LVM version: *//p'), N=$N"
wipe
lvm pvcreate -q --metadatasize 16m "${LOOPS[@]}" >/dev/null
lvm vgcreate -q bench "${LOOPS[@]}" >/dev/null
run_tool lvm2 \
  'lvm lvcreate -q --driverloaded n -an -Zn -l 1 -n lv$i bench' \
  'lvm lvremove -q -y --driverloaded n bench/lv$i' \
  'lvm lvs --noheadings bench'

echo "== volmgr ($(git rev-parse --short HEAD)), N=$N"
wipe
"$V" pvcreate --metadatasize 16m "${LOOPS[@]}" --devices "$DEVS" >/dev/null
"$V" vgcreate bench "${LOOPS[@]}" --devices "$DEVS" >/dev/null
run_tool volmgr \
  '"$V" lvcreate -an -Zn -l 1 -n lv$i bench --devices "$DEVS"' \
  '"$V" lvremove bench/lv$i --devices "$DEVS"' \
  '"$V" lvs --noheadings bench --devices "$DEVS"'

echo
printf '%-10s %12s %12s %14s\n' op lvm2_s volmgr_s "lvm2/volmgr"
for op in lvcreate lvs lvremove; do
  printf '%-10s %12.3f %12.3f %14.2f\n' "$op" "${T[lvm2,$op]}" "${T[volmgr,$op]}" \
    "$(echo "${T[lvm2,$op]} / ${T[volmgr,$op]}" | bc -l)"
done
