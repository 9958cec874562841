#!/usr/bin/env bash
# Benchmark (not a test): the multipath target, round-robin over two NBD paths to one export,
# against the same target with one path, both exported by `volmgr serve` over NBD and driven
# by fio's nbd engine, in the same run. Rows: 1M sequential read and 4k random read, both at
# depth 32; prints MB/s or IOPS and the ratio two paths / one path, for each of ROUNDS rounds
# (the two sides alternate). Two settings:
# - links: the storage host is a network namespace reached over two veth links (two networks,
#   as in VastSky and tests/tests/vastsky_e2e.rs), each shaped to LINK_RATE (tc tbf, both
#   directions); nbdkit serves the same file on both links. A path is a link, so this is what
#   multipath is for: two links carry twice what one does. Needs root, ip and tc.
# - loopback: two nbdkit processes on 127.0.0.1, unshaped: every byte costs only CPU, which
#   the servers, our daemon and fio share on this host, so a second path adds no capacity.
# Then the failover stall (loopback): 4k random read at depth 32 over two paths while one
# server is killed; prints fio's completion latency max and p99.9, and whether fio saw an
# error, with the NBD timeouts in use (they bound the stall: a request on the dead path waits
# for the extent's reconnect-delay, then fails over).
#
#   bash benches/multipath.sh
#   RUNTIME=10 ROUNDS=3 LINK_RATE=2gbit VOLMGR=/path/to/release/volmgr bash benches/multipath.sh
#   SETTINGS=loopback bash benches/multipath.sh      (only the unshaped rows)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNTIME=${RUNTIME:-8}
ROUNDS=${ROUNDS:-2}
QD=${QD:-32}
W=$(mktemp -d /dev/shm/mpbench.XXXXXX)
LOG=$(mktemp -d /tmp/mpbench-log.XXXXXX)
PA=${PA:-10931}
PB=${PB:-10932}
NBDPORT=${NBDPORT:-10933}
# The extents' timeouts: what bounds the failover stall.
OPTS=${OPTS:-"?timeout=2&reconnect-delay=1&connect-timeout=1"}
SETTINGS=${SETTINGS:-"links loopback"}
LINK_RATE=${LINK_RATE:-1gbit}
NS=mpbench$$
PIDS=()
SERVE_PID=
cleanup() {
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

for t in fio nbdkit nbdinfo python3; do
  command -v $t >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }
done
if [ -z "${VOLMGR:-}" ]; then
  [ -x "${CARGO_TARGET_DIR:-target}/release/volmgr" ] || cargo build --release -p volmgr >&2
  VOLMGR=$(cd "${CARGO_TARGET_DIR:-$ROOT/target}" && pwd)/release/volmgr
fi

IMG=$W/lun.img
echo "preparing 1 GiB of random data in $IMG" >&2
head -c 1G /dev/urandom > "$IMG"

wait_nbd() { # uri log
  for _ in $(seq 200); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  cat "$2" >&2; return 1
}
nbdkit_on() { # addr port [netns] -> pid in PIDS
  local run=()
  [ -n "${3:-}" ] && run=(ip netns exec "$3")
  "${run[@]}" nbdkit -f -i "$1" -p "$2" file "file=$IMG" 2>>"$LOG/nbdkit-$2.log" >/dev/null &
  PIDS+=($!)
  wait_nbd "nbd://$1:$2/" "$LOG/nbdkit-$2.log"
}
tables() { # addrA portA addrB portB: two.table and one.table
  local ua="nbd://$1:$2/$OPTS" ub="nbd://$3:$4/$OPTS"
  echo "0 2097152 multipath 0 0 1 1 round-robin 0 2 1 $ua 1 $ub 1" > "$W/two.table"
  echo "0 2097152 multipath 0 0 1 1 round-robin 0 1 1 $ua 1" > "$W/one.table"
}
# The storage host: namespace $NS, link k (1, 2) is 10.233.k.1 (ours) - 10.233.k.2 (the
# host's), shaped to LINK_RATE each way (burst sized for a 250 Hz timer at that rate).
links_up() {
  for t in ip tc; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 1; }; done
  [ "$(id -u)" = 0 ] || { echo "the links setting needs root (SETTINGS=loopback runs without)" >&2; exit 1; }
  ip netns add "$NS"
  ip -n "$NS" link set lo up
  for k in 1 2; do
    ip link add "mpb${k}h$$" type veth peer name "mpb${k}n" netns "$NS"
    ip addr add "10.233.$k.1/24" dev "mpb${k}h$$"
    ip link set "mpb${k}h$$" up
    ip -n "$NS" addr add "10.233.$k.2/24" dev "mpb${k}n"
    ip -n "$NS" link set "mpb${k}n" up
    tc qdisc add dev "mpb${k}h$$" root tbf rate "$LINK_RATE" burst 2mb latency 50ms
    ip netns exec "$NS" tc qdisc add dev "mpb${k}n" root tbf rate "$LINK_RATE" burst 2mb latency 50ms
  done
}

serve() { # table
  [ -n "$SERVE_PID" ] && { kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; }
  RUST_LOG=${RUST_LOG:-warn} "$VOLMGR" serve "$1" --nbd "127.0.0.1:$NBDPORT" --export disk \
    2>>"$LOG/serve.log" >/dev/null & SERVE_PID=$!
  wait_nbd "nbd://127.0.0.1:$NBDPORT/disk" "$LOG/serve.log"
}
fio_json() { # rw bs runtime -> json on stdout
  fio --name=b --ioengine=nbd --uri="nbd://127.0.0.1:$NBDPORT/disk" --rw="$1" --bs="$2" \
      --iodepth="$QD" --size=1g --time_based --runtime="$3" --ramp_time=1 \
      --output-format=json 2>"$LOG/fio.err" || true
}
rate() { # rw bs -> "iops mbps"
  fio_json "$1" "$2" "$RUNTIME" \
  | python3 -c 'import json,sys; s=sys.stdin.read(); d=json.loads(s[s.index("{"):])["jobs"][0]["read"]; print("%.0f %.1f"%(d["iops"], d["bw_bytes"]/1e6))'
}

ROWS=("seqread-1m-qd$QD read 1m" "randread-4k-qd$QD randread 4k")
rounds() { # setting
  for round in $(seq "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
      set -- $row
      name=$1 rw=$2 bs=$3
      serve "$W/two.table"; read -r t_iops t_mb < <(rate "$rw" "$bs")
      serve "$W/one.table"; read -r o_iops o_mb < <(rate "$rw" "$bs")
      if [ "$bs" = 1m ]; then t=$t_mb o=$o_mb unit="MB/s"; else t=$t_iops o=$o_iops unit="IOPS"; fi
      printf '%-9s %-7s %-24s %12s %12s %7.2fx\n' "$setting" "$round" "$name ($unit)" "$t" "$o" \
        "$(python3 -c "print($t/$o)")"
    done
  done
}
printf '%-9s %-7s %-24s %12s %12s %8s\n' setting round "row" "two paths" "one path" "ratio"
for setting in $SETTINGS; do
  case $setting in
    links)
      links_up
      nbdkit_on 10.233.1.2 "$PA" "$NS"
      nbdkit_on 10.233.2.2 "$PA" "$NS"
      tables 10.233.1.2 "$PA" 10.233.2.2 "$PA"
      rounds
      [ -n "$SERVE_PID" ] && { kill "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=; }
      for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
      wait 2>/dev/null || true
      PIDS=()
      ip netns del "$NS"
      ;;
    loopback)
      nbdkit_on 127.0.0.1 "$PA"
      nbdkit_on 127.0.0.1 "$PB"
      tables 127.0.0.1 "$PA" 127.0.0.1 "$PB"
      rounds
      ;;
    *) echo "unknown setting '$setting' (links, loopback)" >&2; exit 1 ;;
  esac
done
echo "links: each path its own veth link to the storage host's namespace, tbf $LINK_RATE each way"

# Failover: kill the first server 3 s into a 10 s random read over both paths (after 1 s ramp),
# on loopback.
case " $SETTINGS " in *" loopback "*) ;; *) exit 0 ;; esac
serve "$W/two.table"
fio_json randread 4k 10 > "$LOG/failover.json" & FIO=$!
sleep 4
kill -9 "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true
wait "$FIO" || true
python3 - "$LOG/failover.json" "$QD" <<'EOF'
import json, sys
s = open(sys.argv[1]).read()
j = json.loads(s[s.index("{"):])["jobs"][0]
r = j["read"]
c = r["clat_ns"]
p = c.get("percentile", {})
print("failover (4k randread qd%s, one of two servers killed): error=%d, %.0f IOPS, "
      "clat max %.0f ms, p99.9 %.1f ms, p99 %.1f ms"
      % (sys.argv[2], j["error"], r["iops"], c["max"] / 1e6,
         p.get("99.900000", 0) / 1e6, p.get("99.000000", 0) / 1e6))
EOF
echo "timeouts: $OPTS (extent), checker interval 5 s (default)"
grep -h 'path .* failed' "$LOG/serve.log" | tail -2 || true
echo "two paths: multipath round-robin (repeat_count 1) over two nbdkit file servers of one file;"
echo "one path: the same target with one of them. fio nbd engine -> volmgr serve -> nbdkit."
echo "file on /dev/shm, runtime ${RUNTIME}s per row, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
