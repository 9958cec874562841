#!/usr/bin/env bash
# Benchmark (not a test): a linear table over one RBD image, exported by `volmgr serve` over
# NBD and driven by fio's nbd engine, against fio's own rbd engine (librbd directly) on the
# same image, in the same run, on a single-node cluster this script starts (one monitor, one
# memstore OSD, auth none, everything under one temporary directory; stopped on exit). Rows:
# 4k random read and write at depth 16, 1M sequential read and write at depth 4. Prints
# IOPS / MB/s and the ratio ours/direct per row, for each of ROUNDS rounds (the two sides
# alternate).
#
#   bash benches/ceph-extent.sh
#   RUNTIME=10 ROUNDS=3 bash benches/ceph-extent.sh
#   VOLMGR=/path/to/volmgr bash benches/ceph-extent.sh   # a volmgr already built
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNTIME=${RUNTIME:-8}
ROUNDS=${ROUNDS:-2}
SIZE_MB=${SIZE_MB:-1024}
D=$(mktemp -d /tmp/cephbench.XXXXXX)
MONPORT=${MONPORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
NBDPORT=${NBDPORT:-10931}
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT

for t in fio ceph-mon ceph-osd ceph rbd monmaptool ceph-authtool nbdinfo python3; do
  command -v $t >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw rbd || { echo "this fio has no rbd engine" >&2; exit 1; }
if [ -z "${VOLMGR:-}" ]; then
  [ -x "${CARGO_TARGET_DIR:-target}/release/volmgr" ] || cargo build --release -p volmgr >&2
  VOLMGR=$(cd "${CARGO_TARGET_DIR:-$ROOT/target}" && pwd)/release/volmgr
fi

# The cluster (FACTS.md's recipe), the monitor on a free port outside the OSDs' 6800-7300.
FSID=$(python3 -c 'import uuid; print(uuid.uuid4())')
CONF=$D/ceph.conf
cat > "$CONF" <<C
[global]
fsid = $FSID
mon host = v1:127.0.0.1:$MONPORT
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd objectstore = memstore
memstore device bytes = $(( (SIZE_MB + 1024) << 20 ))
osd crush chooseleaf type = 0
run dir = $D/run
log file = $D/log/\$name.log
admin socket = $D/run/\$name.asok
[mon.a]
mon data = $D/mon
[osd.0]
osd data = $D/osd0
C
mkdir -p "$D/run" "$D/log" "$D/mon" "$D/osd0"
export CEPH_CONF=$CONF
ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --addv a "v1:127.0.0.1:$MONPORT" --fsid "$FSID" "$D/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
ceph-mon -f -i a 2>"$D/log/mon.err" & PIDS+=($!)
for _ in $(seq 150); do timeout 5 ceph mon stat >/dev/null 2>&1 && break; sleep 0.2; done
ceph osd create >/dev/null
ceph-osd -i 0 --mkfs 2>/dev/null
for try in 1 2 3; do # 16.2's OSD sometimes asks the monitor before it has the map: retry
  ceph-osd -f -i 0 2>"$D/log/osd.err" & OSD=$!
  for _ in $(seq 100); do ceph osd dump 2>/dev/null | grep -q '^osd.0 up ' && break; sleep 0.2; done
  ceph osd dump | grep -q '^osd.0 up ' && break
  kill $OSD 2>/dev/null || true
done
PIDS+=($OSD)
ceph osd pool create rbd 8 >/dev/null 2>&1
ceph osd pool application enable rbd rbd >/dev/null
# No exclusive lock: the two clients take turns on the image without passing a lock around.
rbd create --size "${SIZE_MB}M" --image-feature layering rbd/bench
echo "writing ${SIZE_MB} MiB of random data into rbd/bench" >&2
fio --name=fill --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench --rw=write \
    --bs=4m --iodepth=4 --size="${SIZE_MB}M" --refill_buffers >/dev/null

URI="rbd:rbd/bench?conf=$CONF"
echo "0 $(( SIZE_MB * 2048 )) linear $URI 0" > "$D/linear.table"
"$VOLMGR" serve "$D/linear.table" --nbd "127.0.0.1:$NBDPORT" --export disk \
  2>"$D/log/serve.log" >/dev/null & PIDS+=($!)
for _ in $(seq 200); do nbdinfo --size "nbd://127.0.0.1:$NBDPORT/disk" >/dev/null 2>&1 && break; sleep 0.05; done
nbdinfo --size "nbd://127.0.0.1:$NBDPORT/disk" >/dev/null || { cat "$D/log/serve.log" >&2; exit 1; }

run_fio() { # rw bs depth engine-args... -> "iops mbps"
  local rw=$1 bs=$2 qd=$3; shift 3
  fio --name=b "$@" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MB}M" --time_based \
      --runtime="$RUNTIME" --ramp_time=1 --output-format=json 2>/dev/null \
  | python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.0f %.1f"%(d["iops"], d["bw_bytes"]/1e6))'
}
ours() { run_fio "$@" --ioengine=nbd --uri="nbd://127.0.0.1:$NBDPORT/disk"; }
direct() { run_fio "$@" --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench; }

ROWS=("randread-4k-qd16 randread 4k 16" "randwrite-4k-qd16 randwrite 4k 16"
      "seqread-1m-qd4 read 1m 4" "seqwrite-1m-qd4 write 1m 4")
printf '%-7s %-26s %12s %12s %8s\n' round "row" "ours" "direct" "ratio"
for round in $(seq "$ROUNDS"); do
  for row in "${ROWS[@]}"; do
    set -- $row
    name=$1 rw=$2 bs=$3 qd=$4
    read -r o_iops o_mb < <(ours "$rw" "$bs" "$qd")
    read -r d_iops d_mb < <(direct "$rw" "$bs" "$qd")
    if [ "$bs" = 1m ]; then o=$o_mb d=$d_mb unit="MB/s"; else o=$o_iops d=$d_iops unit="IOPS"; fi
    printf '%-7s %-26s %12s %12s %7.2fx\n' "$round" "$name ($unit)" "$o" "$d" \
      "$(python3 -c "print($o/$d)")"
  done
done
echo "ours: fio nbd engine -> volmgr serve (linear over rbd:rbd/bench) -> librbd -> OSD;"
echo "direct: fio rbd engine -> librbd -> OSD. memstore OSD, runtime ${RUNTIME}s per row,"
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
