#!/usr/bin/env bash
# Benchmark (not a test): a linear table over one tgtd LUN (1 GiB of random data in /dev/shm),
# exported by `volmgr serve` over NBD and driven by fio's nbd engine, against `iscsi-perf`
# (libiscsi's own load generator) reading the same LUN directly, in the same run. Rows: 4k
# random read at depth 16, 1M sequential read at depth 4. Prints IOPS / MB/s and the ratio
# ours/direct per row, for each of ROUNDS rounds (the two sides alternate).
#
#   bash benches/iscsi-extent.sh
#   RUNTIME=10 ROUNDS=3 bash benches/iscsi-extent.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNTIME=${RUNTIME:-8}
ROUNDS=${ROUNDS:-2}
W=$(mktemp -d /dev/shm/iscsibench.XXXXXX)
LOG=$(mktemp -d /tmp/iscsibench-log.XXXXXX)
IQN=iqn.2026-12.org.volmgr.bench:lun
PORT=${PORT:-13290}
NBDPORT=${NBDPORT:-10921}
CTL=${CTL:-13290}
SERVE_PID=
TGTD_PID=
adm() { timeout 20 tgtadm -C "$CTL" --lld iscsi "$@"; }
cleanup() {
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null || true
  if [ -n "$TGTD_PID" ]; then
    # tgtd ignores SIGTERM while targets exist: delete them, go offline, delete the system.
    adm --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
    adm --mode sys --op update --name State --value offline >/dev/null 2>&1 || true
    timeout 20 tgtadm -C "$CTL" --op delete --mode system >/dev/null 2>&1 || true
    for _ in $(seq 50); do kill -0 "$TGTD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$TGTD_PID" 2>/dev/null || true
  fi
  wait 2>/dev/null || true
  rm -f "/var/run/tgtd/socket.$CTL" "/var/run/tgtd/socket.$CTL.lock"
  rm -rf "$W"
}
trap cleanup EXIT

for t in fio tgtd tgtadm iscsi-perf nbdinfo python3; do
  command -v $t >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }
done
[ -x "${CARGO_TARGET_DIR:-target}/release/volmgr" ] || cargo build --release -p volmgr >&2
VOLMGR=$(cd "${CARGO_TARGET_DIR:-$ROOT/target}" && pwd)/release/volmgr

IMG=$W/lun.img
echo "preparing 1 GiB of random data in $IMG" >&2
head -c 1G /dev/urandom > "$IMG"

tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT" 2>"$LOG/tgtd.log" >/dev/null & TGTD_PID=$!
for _ in $(seq 200); do adm --mode sys --op show >/dev/null 2>&1 && break; sleep 0.05; done
adm --mode target --op new --tid 1 --targetname "$IQN"
adm --mode logicalunit --op new --tid 1 --lun 1 --bstype rdwr -b "$IMG"
adm --mode target --op bind --tid 1 --initiator-address ALL
LUN="iscsi://127.0.0.1:$PORT/$IQN/1"

echo "0 2097152 linear $LUN 0" > "$W/linear.table"
"$VOLMGR" serve "$W/linear.table" --nbd "127.0.0.1:$NBDPORT" --export disk \
  2>"$LOG/serve.log" >/dev/null & SERVE_PID=$!
for _ in $(seq 200); do nbdinfo --size "nbd://127.0.0.1:$NBDPORT/disk" >/dev/null 2>&1 && break; sleep 0.05; done
nbdinfo --size "nbd://127.0.0.1:$NBDPORT/disk" >/dev/null || { cat "$LOG/serve.log" >&2; exit 1; }

ours() { # rw bs depth -> "iops mbps"
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$NBDPORT/disk" --rw="$1" --bs="$2" \
      --iodepth="$3" --size=1g --time_based --runtime="$RUNTIME" --ramp_time=1 \
      --output-format=json 2>/dev/null \
  | python3 -c 'import json,sys; s=sys.stdin.read(); d=json.loads(s[s.index("{"):])["jobs"][0]["read"]; print("%.0f %.1f"%(d["iops"], d["bw_bytes"]/1e6))'
}
direct() { # random(-r or "") blocks-of-512 depth -> "iops mbps"
  timeout -s KILL $((RUNTIME + 20)) iscsi-perf -m "$3" -b "$2" $1 -t "$RUNTIME" "$LUN" 2>&1 \
  | tr '\r' '\n' | grep -o 'iops average [0-9]* ([0-9]* MB/s) *$' | tail -1 \
  | python3 -c 'import re,sys; m=re.search(r"average (\d+) \((\d+) MB/s", sys.stdin.read()); print(m.group(1), m.group(2))'
}

# name fio-rw fio-bs iscsi-perf-random iscsi-perf-blocks depth
ROWS=("randread-4k-qd16 randread 4k -r 8 16" "seqread-1m-qd4 read 1m '' 2048 4")
printf '%-7s %-22s %12s %12s %8s\n' round "row" "ours" "direct" "ratio"
for round in $(seq "$ROUNDS"); do
  for row in "${ROWS[@]}"; do
    eval set -- $row
    name=$1 rw=$2 bs=$3 rnd=$4 blocks=$5 qd=$6
    read -r o_iops o_mb < <(ours "$rw" "$bs" "$qd")
    read -r d_iops d_mb < <(direct "$rnd" "$blocks" "$qd")
    if [ "$bs" = 1m ]; then o=$o_mb d=$d_mb unit="MB/s"; else o=$o_iops d=$d_iops unit="IOPS"; fi
    printf '%-7s %-22s %12s %12s %7.2fx\n' "$round" "$name ($unit)" "$o" "$d" \
      "$(python3 -c "print($o/$d)")"
  done
done
echo "ours: fio nbd engine -> volmgr serve (linear over $LUN) -> tgtd; direct: iscsi-perf -> tgtd"
echo "LUN file on /dev/shm, runtime ${RUNTIME}s per row, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
