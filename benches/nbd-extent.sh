#!/usr/bin/env bash
# Benchmark (not a test): the NBD client extent. A linear table over one NBD extent, exported
# by us over NBD, against fio's nbd engine talking to the same server directly, in the same
# run; the servers are `nbdkit memory` and our own export of a file in /dev/shm. Then the
# same table with connections=4 (multi-conn) against connections=1 for 1M reads.
#
#   bash benches/nbd-extent.sh            RUNTIME=10 (seconds per fio row)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNTIME=${RUNTIME:-10}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
W=$(mktemp -d /dev/shm/nbdext.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

for t in fio nbdkit nbdinfo nbdcopy; do command -v $t >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }; done
[ -x "$TARGET/release/volmgr" ] || cargo build --release -p volmgr >&2
VOLMGR=$TARGET/release/volmgr

wait_port() { for _ in $(seq 200); do nbdinfo --size "nbd://127.0.0.1:$1/$2" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "server on $1 did not come up" >&2; return 1; }

head -c 1G /dev/urandom > "$W/disk.img"
# Peer 1: nbdkit memory (filled with the same random bytes). Peer 2: our own export of a file.
nbdkit -f -i 127.0.0.1 -p 10911 memory 1G 2>"$W/nbdkit.log" & PIDS+=($!)
wait_port 10911 ""
nbdcopy "$W/disk.img" nbd://127.0.0.1:10911/
echo "0 2097152 linear $W/disk.img 0" > "$W/file.table"
"$VOLMGR" serve "$W/file.table" --nbd 127.0.0.1:10912 --export disk 2>"$W/ours-file.log" >/dev/null & PIDS+=($!)
wait_port 10912 disk

serve_over() { # server-uri port export-name [options]
  echo "0 2097152 linear $1$4 0" > "$W/$3.table"
  "$VOLMGR" serve "$W/$3.table" --nbd "127.0.0.1:$2" --export "$3" 2>"$W/$3.log" >/dev/null & PIDS+=($!)
  wait_port "$2" "$3"
}
serve_over nbd://127.0.0.1:10911/ 10921 overkit ""
serve_over nbd://127.0.0.1:10911/ 10922 overkit4 "?connections=4"
serve_over nbd://127.0.0.1:10912/disk 10923 overours ""

measure() { # uri rw bs depth -> "iops mbps"
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
      --size=1g --time_based --runtime="$RUNTIME" --ramp_time=1 --group_reporting \
      --output-format=json 2>/dev/null \
  | python3 -c 'import json,sys; s=sys.stdin.read(); d=json.loads(s[s.index("{"):])["jobs"][0]; k="read" if d["read"]["io_bytes"]>0 else "write"; print("%.0f %.1f"%(d[k]["iops"], d[k]["bw_bytes"]/1e6))'
}

ROWS=("randread-4k-qd16 randread 4k 16" "randwrite-4k-qd16 randwrite 4k 16" "read-1m-qd4 read 1m 4" "write-1m-qd4 write 1m 4")
printf '%-34s %12s %12s %8s\n' "row (fio nbd engine)" "through us" "direct" "ratio"
for peer in "nbdkit-memory nbd://127.0.0.1:10911/ nbd://127.0.0.1:10921/overkit" \
            "our-export nbd://127.0.0.1:10912/disk nbd://127.0.0.1:10923/overours"; do
  set -- $peer
  pname=$1 direct=$2 via=$3
  for row in "${ROWS[@]}"; do
    set -- $row
    read -r v_iops v_mb < <(measure "$via" "$2" "$3" "$4")
    read -r d_iops d_mb < <(measure "$direct" "$2" "$3" "$4")
    if [ "$3" = 1m ]; then v=$v_mb d=$d_mb unit="MB/s"; else v=$v_iops d=$d_iops unit="IOPS"; fi
    printf '%-34s %12s %12s %7.2fx\n' "$pname $1 ($unit)" "$v" "$d" "$(python3 -c "print($v/$d)")"
  done
done
read -r _ one < <(measure nbd://127.0.0.1:10921/overkit read 1m 16)
read -r _ four < <(measure nbd://127.0.0.1:10922/overkit4 read 1m 16)
printf '%-34s %12s %12s %7.2fx\n' "multi-conn read-1m-qd16 (MB/s)" "$four (4)" "$one (1)" "$(python3 -c "print($four/$one)")"
echo "runtime ${RUNTIME}s per row, $(nproc) cores; the 'through us' side is a linear table over an NBD extent, exported by 'volmgr serve'"
