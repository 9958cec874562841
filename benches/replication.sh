#!/usr/bin/env bash
# Benchmark (not a test): replication throughput beside nbdcopy of the same bytes.
#
# Two daemons on this host (loopback), each with a thin pool on sparse files; a thin volume of
# VOL_GIB GiB on A with CHANGE_MIB MiB of random data written into it (the change: nothing
# else is mapped). Rows, in one run:
#   - `volmgr repl` (plain TCP, --insecure) shipping that change as its first interval, timed
#     from `repl primary` to the secondary's first complete snapshot (its state file);
#   - the same over TLS;
#   - nbdcopy of the same bytes from A's volume export to an export of a thin volume on B
#     (only the changed range is copied: the same bytes over the same loopback);
#   - then the lag (the primary's `lag_ms`) under a steady WRITER_RATE fio writer on A's
#     exported volume, interval 1 s, TLS, sampled for LAG_SECS.
# Ratio = replication rate / nbdcopy rate. The host's other load moves every figure.
#
#   sudo bash benches/replication.sh
#   CHANGE_MIB=1024 VOL_GIB=64 sudo bash benches/replication.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CHANGE_MIB=${CHANGE_MIB:-1024}
VOL_GIB=${VOL_GIB:-64}
WRITER_RATE=${WRITER_RATE:-50m}
LAG_SECS=${LAG_SECS:-20}
BIN=${VOLMGR:-target/debug/volmgr}
[ -x "$BIN" ] || cargo build -p volmgr
[ "$(id -u)" = 0 ] || { echo "replication bench: needs root (daemons)" >&2; exit 1; }
W=$(mktemp -d /var/tmp/replbench.XXXXXX)
# Rows run in command substitutions (subshells): daemons' pids go to a file, not an array.
cleanup() {
  [ -f "$W/pids" ] && while read -r p; do kill "$p" 2>/dev/null || true; done <"$W/pids"
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
VOL_SECT=$((VOL_GIB * 2097152))
DATA_MIB=$((CHANGE_MIB * 2 + 256))

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_daemon() { # name
  mkdir -p "$W/$1"
  # Not on our stdout: a row's $(...) would wait for the daemon to exit.
  VOLMGR_STATE_DIR="$W/$1" "$BIN" daemon --no-ublk >"$W/$1.log" 2>&1 &
  echo $! >>"$W/pids"
  for _ in $(seq 200); do [ -S "$W/$1/control.sock" ] && break; sleep 0.05; done
  sleep 0.1
  truncate -s 64M "$W/$1-meta.img"
  truncate -s "${DATA_MIB}M" "$W/$1-data.img"
  echo "0 $((DATA_MIB * 2048)) thin-pool $W/$1-meta.img $W/$1-data.img 128 0" >"$W/$1-pool.table"
  vm "$1" dev create pool --table "$W/$1-pool.table" --internal >/dev/null
}
vm() { local d=$1; shift; VOLMGR_STATE_DIR="$W/$d" "$BIN" "$@"; }
thin_dev() { # daemon name id port [sectors]
  echo "0 ${5:-$VOL_SECT} thin /dev/volmgr/pool $3" >"$W/$1-$2.table"
  vm "$1" dev create "$2" --table "$W/$1-$2.table" --nbd "127.0.0.1:$4" >/dev/null
}

# The change, once: random bytes written into A's volume.
head -c "$((CHANGE_MIB << 20))" /dev/urandom >"$W/change.bin"
certs() {
  local d=$W/certs; mkdir -p "$d"; cd "$d"
  local ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
  openssl req -x509 $ec -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=ca 2>/dev/null
  openssl req $ec -keyout server-key.pem -out s.csr -subj /CN=127.0.0.1 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >sext
  openssl x509 -req -in s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem -days 2 -extfile sext 2>/dev/null
  openssl req $ec -keyout client-key.pem -out c.csr -subj /CN=primary 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >cext
  openssl x509 -req -in c.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out client-cert.pem -days 2 -extfile cext 2>/dev/null
  chmod 600 server-key.pem client-key.pem
  cd - >/dev/null
}
certs

# One row: fresh daemons, the change written, then replicated. Prints seconds.
repl_row() { # tls|insecure  tag
  local a=a$2 b=b$2 p; p=$(port)
  start_daemon "$a"; start_daemon "$b"
  vm "$a" dev message pool create_thin 1 >/dev/null
  local np; np=$(port)
  thin_dev "$a" vol 1 "$np"
  nbdcopy --destination-is-zero "$W/change.bin" "nbd://127.0.0.1:$np/vol"
  vm "$a" dev remove vol >/dev/null
  local link=(--insecure)
  [ "$1" = tls ] && link=(--tls-dir "$W/certs")
  vm "$b" repl secondary --volume v --pool pool --thin 1 --size "${VOL_GIB}G" --listen "127.0.0.1:$p" "${link[@]}" >/dev/null
  local t0; t0=$(date +%s.%N)
  vm "$a" repl primary --volume v --pool pool --thin 1 --size "${VOL_GIB}G" --peer "127.0.0.1:$p" --interval 1h "${link[@]}" >/dev/null
  # Done when the secondary's state file names the snapshot: written (and fsynced) once the
  # snapshot is complete, just before the ACK. Polled every 10 ms without starting a volmgr.
  until grep -qs '"snapshot": [1-9]' "$W/$b/replication/v.state"; do sleep 0.01; done
  local t1; t1=$(date +%s.%N)
  vm "$b" repl status v --json | grep -q '"last_synced_snapshot": [1-9]' \
    || { echo "the state file is ahead of the secondary's status" >&2; exit 1; }
  local shipped; shipped=$(vm "$a" repl status v --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["bytes_shipped"])')
  [ "$shipped" -ge $((CHANGE_MIB << 20)) ] || { echo "shipped only $shipped bytes" >&2; exit 1; }
  vm "$a" repl stop v >/dev/null; vm "$b" repl stop v >/dev/null
  python3 -c "print($t1 - $t0)"
}

# nbdcopy of the same bytes between the two daemons' thin volumes.
nbd_row() {
  start_daemon an; start_daemon bn
  vm an dev message pool create_thin 1 >/dev/null
  vm bn dev message pool create_thin 1 >/dev/null
  local pa pb; pa=$(port); pb=$(port)
  # Devices over exactly the changed range of each volume: the same bytes as the
  # replication ships, no holes to read.
  thin_dev an vol 1 "$pa" $((CHANGE_MIB * 2048)); thin_dev bn vol 1 "$pb" $((CHANGE_MIB * 2048))
  nbdcopy --destination-is-zero "$W/change.bin" "nbd://127.0.0.1:$pa/vol"
  local t0; t0=$(date +%s.%N)
  nbdcopy --destination-is-zero "nbd://127.0.0.1:$pa/vol" "nbd://127.0.0.1:$pb/vol"
  local t1; t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}

# Lag under a steady writer: fio writes WRITER_RATE into A's exported volume (TLS, 1 s
# interval) for LAG_SECS; `lag_ms` of the primary's status is sampled every 0.5 s. Prints
# "mean max samples shipped_MBps".
lag_row() {
  local a=aL b=bL p np; p=$(port); np=$(port)
  start_daemon "$a"; start_daemon "$b"
  vm "$a" dev message pool create_thin 1 >/dev/null
  thin_dev "$a" vol 1 "$np"
  local link=(--tls-dir "$W/certs")
  vm "$b" repl secondary --volume v --pool pool --thin 1 --size "${VOL_GIB}G" --listen "127.0.0.1:$p" "${link[@]}" >/dev/null
  vm "$a" repl primary --volume v --pool pool --thin 1 --size "${VOL_GIB}G" --peer "127.0.0.1:$p" --interval 1s "${link[@]}" >/dev/null
  until vm "$b" repl status v --json | grep -q '"last_synced_snapshot": [1-9]'; do sleep 0.1; done
  fio --name=steady --ioengine=nbd --uri="nbd://127.0.0.1:$np/vol" --rw=randwrite --bs=256k \
    --size="$((DATA_MIB / 4))m" --rate="$WRITER_RATE" --time_based --runtime=$((LAG_SECS + 4)) \
    --output="$W/fio-lag.txt" >/dev/null 2>&1 &
  local fio_pid=$!
  sleep 3
  local s0; s0=$(vm "$a" repl status v --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["bytes_shipped"])')
  : >"$W/lag.txt"
  for _ in $(seq $((LAG_SECS * 2))); do
    vm "$a" repl status v --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["lag_ms"])' >>"$W/lag.txt"
    sleep 0.5
  done
  local s1; s1=$(vm "$a" repl status v --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["bytes_shipped"])')
  wait "$fio_pid" || { echo "fio failed: $(cat "$W/fio-lag.txt")" >&2; exit 1; }
  python3 - "$W/lag.txt" "$s0" "$s1" "$LAG_SECS" <<'PY'
import sys
lags = [int(x) for x in open(sys.argv[1]).read().split()]
shipped = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4]) / 1e6
print(f"{sum(lags) / len(lags) / 1000:.2f} {max(lags) / 1000:.2f} {len(lags)} {shipped:.1f}")
PY
}

r_plain=$(repl_row insecure 1)
r_tls=$(repl_row tls 2)
n=$(nbd_row)
python3 - "$CHANGE_MIB" "$VOL_GIB" "$r_plain" "$r_tls" "$n" <<'PY'
import sys
mib, gib = int(sys.argv[1]), int(sys.argv[2])
plain, tls, nbd = map(float, sys.argv[3:])
rate = lambda s: mib / s
print(f"{mib} MiB changed in a {gib} GiB thin volume, loopback, two daemons\n")
print("| row | seconds | MiB/s | x nbdcopy |")
print("| --- | ---: | ---: | ---: |")
for name, s in [("volmgr repl, plain TCP", plain), ("volmgr repl, TLS", tls), ("nbdcopy, NBD export to NBD export", nbd)]:
    print(f"| {name} | {s:.2f} | {rate(s):.0f} | {nbd / s:.2f} |")
PY
read -r lag_mean lag_max lag_n lag_mbps <<<"$(lag_row)"
echo
echo "Lag under a steady writer (fio --rate=$WRITER_RATE, randwrite 256k into the primary's volume, TLS,"
echo "interval 1 s), $lag_n samples over $LAG_SECS s: mean $lag_mean s, max $lag_max s; shipped $lag_mbps MB/s"
