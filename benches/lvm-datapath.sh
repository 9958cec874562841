#!/usr/bin/env bash
# Benchmark (not a test), issue 12: the data path of an activated LV against the very same table
# written by hand. A VG on two file PVs, a striped LV (-i 2 -I 64k) activated with
# `volmgr lvchange -ay --nbd` (export VG/LV), and a second device of the same daemon created
# with `volmgr dev create` from the LV's own table text (`volmgr dev table`), also over NBD.
# fio's nbd engine reads each export in turn, in the same run: 4k randread QD16 and 1M seqread
# QD4, alternating which one goes first in each round. Prints each round and the ratio
# LV / hand-written table (1.0: the same).
#
#   bash benches/lvm-datapath.sh            (PV files on /dev/shm: the daemon's cost only)
#   BACKING_DIR=/var/tmp RUNTIME=10 ROUNDS=6 bash benches/lvm-datapath.sh
# Needs fio (with its nbd engine) and nbdinfo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BACKING_DIR=${BACKING_DIR:-/dev/shm}
RUNTIME=${RUNTIME:-8}
ROUNDS=${ROUNDS:-4}
for t in fio nbdinfo python3; do
  command -v $t >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }
done
cargo build -q --release -p volmgr
W=$(mktemp -d "$BACKING_DIR/lvm-datapath.XXXXXX")
# A copy of the binary: a rebuild in the shared target dir during the run cannot swap it.
cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/volmgr" "$W/volmgr"
V=$W/volmgr
export VOLMGR_STATE_DIR=$W/state
mkdir -p "$VOLMGR_STATE_DIR"
DPID=
cleanup() {
  [ -n "$DPID" ] && { kill "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; }
  rm -rf "$W"
}
trap cleanup EXIT

# Two 640 MiB PVs of random data (a read of a hole would cost nothing), a 1 GiB striped LV.
for i in 0 1; do head -c 640M /dev/urandom > "$W/pv$i"; done
DEVS="$W/pv0,$W/pv1"
"$V" vgcreate vgbench "$W/pv0" "$W/pv1" --devices "$DEVS" >/dev/null
"$V" lvcreate -an -Zn -i 2 -I 64k -L 1g -n lv vgbench --devices "$DEVS" >/dev/null

"$V" daemon --no-ublk >"$W/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 200); do [ -S "$VOLMGR_STATE_DIR/control.sock" ] && "$V" dev list >/dev/null 2>&1 && break; sleep 0.05; done
"$V" lvchange -ay vgbench/lv --nbd 127.0.0.1:0 --devices "$DEVS" >/dev/null
LV_URI=$("$V" lvs --noheadings -o lv_dm_path vgbench/lv --devices "$DEVS" | tr -d ' ')
"$V" dev table vgbench-lv > "$W/lv.table"
HAND_URI=$("$V" dev create hand --table "$W/lv.table" --nbd 127.0.0.1:0 | tail -n1 | tr -d ' ')
# Same table text, same size: what is compared is the activation, nothing else.
cmp -s "$W/lv.table" <("$V" dev table hand) || { echo "the two tables differ" >&2; exit 1; }
for u in "$LV_URI" "$HAND_URI"; do
  case $u in nbd://*) ;; *) echo "not an NBD URI: '$u'" >&2; exit 1 ;; esac
done
[ "$(nbdinfo --size "$LV_URI")" = "$(nbdinfo --size "$HAND_URI")" ] || { echo "sizes differ" >&2; exit 1; }
echo "table ($(wc -l < "$W/lv.table") line): $(cat "$W/lv.table")"
echo "LV:   $LV_URI"
echo "hand: $HAND_URI"

measure() { # uri rw bs iodepth -> iops or MB/s (1m)
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --numjobs=1 \
      --size=1g --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json 2>/dev/null \
  | python3 -c 'import json,sys; s=sys.stdin.read(); d=json.loads(s[s.index("{"):])["jobs"][0]["read"]; print("%.0f"%d["iops"] if sys.argv[1]!="1m" else "%.0f"%(d["bw_bytes"]/1e6))' "$3"
}

# name rw bs iodepth
ROWS=("randread-4k-qd16 randread 4k 16" "seqread-1m-qd4 read 1m 4")
printf '%-22s %6s %10s %10s %8s\n' "row (fio nbd engine)" round LV hand LV/hand
for row in "${ROWS[@]}"; do
  set -- $row
  name=$1 rw=$2 bs=$3 qd=$4 unit=IOPS
  [ "$bs" = 1m ] && unit=MB/s
  lvs=() hands=()
  for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
      l=$(measure "$LV_URI" "$rw" "$bs" "$qd"); h=$(measure "$HAND_URI" "$rw" "$bs" "$qd")
    else
      h=$(measure "$HAND_URI" "$rw" "$bs" "$qd"); l=$(measure "$LV_URI" "$rw" "$bs" "$qd")
    fi
    lvs+=("$l") hands+=("$h")
    printf '%-22s %6s %10s %10s %8.2f\n' "$name ($unit)" "$r" "$l" "$h" "$(python3 -c "print($l/$h)")"
  done
  sum_l=$(IFS=+; echo "${lvs[*]}") sum_h=$(IFS=+; echo "${hands[*]}")
  printf 'BENCH %s lv %s hand %s ratio %.3f\n' "$name" \
    "$(python3 -c "print(round(($sum_l)/$ROUNDS))")" "$(python3 -c "print(round(($sum_h)/$ROUNDS))")" \
    "$(python3 -c "print(($sum_l)/($sum_h))")"
done
echo "PV files on $BACKING_DIR ($(stat -f -c %T "$BACKING_DIR")), ${RUNTIME}s per measurement," \
  "$ROUNDS rounds, $(nproc) cores, volmgr $(git rev-parse --short HEAD)"
