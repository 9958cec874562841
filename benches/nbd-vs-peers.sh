#!/usr/bin/env bash
# Benchmark (not a test): one 1 GiB file served through our NBD export (a linear table), through
# nbdkit's file plugin and through qemu-nbd, all in the same run, each driven by fio's nbd
# engine. Prints IOPS / MB/s and the ratio ours/peer per row.
#
#   bash benches/nbd-vs-peers.sh                  (file on /dev/shm: server overhead only)
#   BACKING_DIR=/var/tmp bash benches/nbd-vs-peers.sh   (file on ext4: ours uses O_DIRECT)
#   RUNTIME=10 JOBS=1 ...                          (seconds per fio row; fio jobs per row)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BACKING_DIR=${BACKING_DIR:-/dev/shm}
RUNTIME=${RUNTIME:-10}
JOBS=${JOBS:-1}
W=$(mktemp -d "$BACKING_DIR/nbdbench.XXXXXX")
LOG=$(mktemp -d /tmp/nbdbench-log.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

for t in fio nbdkit qemu-nbd nbdinfo; do command -v $t >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }; done
[ -x target/release/volmgr ] || cargo build --release -p volmgr >&2
VOLMGR=$ROOT/target/release/volmgr

IMG=$W/disk.img
echo "preparing 1 GiB of random data in $IMG" >&2
head -c 1G /dev/urandom > "$IMG"
echo "0 2097152 linear $IMG 0" > "$W/linear.table"

wait_port() { for _ in $(seq 200); do nbdinfo --size "nbd://127.0.0.1:$1/$2" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "server on $1 did not come up" >&2; return 1; }

"$VOLMGR" serve "$W/linear.table" --nbd 127.0.0.1:10901 --export disk 2>"$LOG/ours.log" >/dev/null & PIDS+=($!)
nbdkit -f -i 127.0.0.1 -p 10902 -e disk file "$IMG" 2>"$LOG/nbdkit.log" & PIDS+=($!)
qemu-nbd -f raw -t -b 127.0.0.1 -p 10903 -x disk -e 16 --cache=writeback "$IMG" 2>"$LOG/qemu-nbd.log" & PIDS+=($!)
wait_port 10901 disk; wait_port 10902 disk; wait_port 10903 disk

# name rw bs iodepth
ROWS=("randread-4k-qd16 randread 4k 16" "randwrite-4k-qd16 randwrite 4k 16" "seqread-1m-qd4 read 1m 4")

measure() { # port rw bs depth -> "iops mbps"
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$1/disk" --rw="$2" --bs="$3" --iodepth="$4" \
      --numjobs="$JOBS" --size=1g --time_based --runtime="$RUNTIME" --ramp_time=1 --group_reporting \
      --output-format=json 2>/dev/null \
  | python3 -c 'import json,sys; s=sys.stdin.read(); d=json.loads(s[s.index("{"):])["jobs"][0]; k="read" if d["read"]["io_bytes"]>0 else "write"; print("%.0f %.1f"%(d[k]["iops"], d[k]["bw_bytes"]/1e6))'
}

printf '%-20s %12s %12s %12s %9s %9s\n' "row (fio nbd engine)" "ours" "nbdkit" "qemu-nbd" "/nbdkit" "/qemu-nbd"
for row in "${ROWS[@]}"; do
  set -- $row
  name=$1 rw=$2 bs=$3 qd=$4
  read -r o_iops o_mb < <(measure 10901 "$rw" "$bs" "$qd")
  read -r k_iops k_mb < <(measure 10902 "$rw" "$bs" "$qd")
  read -r q_iops q_mb < <(measure 10903 "$rw" "$bs" "$qd")
  if [ "$bs" = 1m ]; then o=$o_mb k=$k_mb q=$q_mb unit="MB/s"; else o=$o_iops k=$k_iops q=$q_iops unit="IOPS"; fi
  printf '%-20s %12s %12s %12s %8.2fx %8.2fx\n' "$name ($unit)" "$o" "$k" "$q" \
    "$(python3 -c "print($o/$k)")" "$(python3 -c "print($o/$q)")"
done
echo "backing file on $BACKING_DIR ($(stat -f -c %T "$BACKING_DIR")), runtime ${RUNTIME}s per row, $JOBS job(s), $(nproc) cores"
