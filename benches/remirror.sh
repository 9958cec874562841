#!/usr/bin/env bash
# Benchmark (not a test), issue 15: a storage host dies under a 3-way mirror; how long until
# the daemon's monitor starts re-mirroring onto the spare host, how fast the rebuild runs over
# NBD (without and with client load), and the longest client I/O stall, beside `nbdcopy` of
# the same bytes between two of the same NBD servers.
#
# Four "hosts" are nbdkit file exports on 127.0.0.1 (files in /dev/shm), PVs tagged host:hN;
# the LV is raid1 -m2 on three of them; the daemon runs with --raid-fault-policy allocate
# --monitor-interval 1. The PV URIs carry reconnect-delay=2 (the time a dead leg may stall
# I/O before the raid fails it) and timeout=5.
#
#   bash benches/remirror.sh                 (1 GiB LV)
#   SIZE_MB=512 ROUNDS=3 bash benches/remirror.sh
#   VOLMGR=/path/to/volmgr bash benches/remirror.sh   (an already built binary)
# Needs nbdkit, nbdcopy, fio (nbd engine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SIZE_MB=${SIZE_MB:-1024}
for t in nbdkit nbdcopy fio python3; do
  command -v $t >/dev/null || { echo "missing $t: run scripts/setup.sh" >&2; exit 1; }
done
[ -n "${VOLMGR:-}" ] || cargo build -q --release -p volmgr
W=$(mktemp -d /dev/shm/remirror.XXXXXX)
cp "${VOLMGR:-${CARGO_TARGET_DIR:-$ROOT/target}/release/volmgr}" "$W/volmgr"
V=$W/volmgr
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

head -c "${SIZE_MB}M" /dev/urandom > "$W/data.bin"

# nbdcopy of the same bytes between two nbdkit servers: the transport's own rate. Measured
# again right before each rebuild (into a fresh file, as the spare's is), since tmpfs page
# allocation and the machine's other load move it by 3x between minutes.
nbdcopy_rate() { # dir -> MB/s
  local p1 p2 a b t0 t1
  p1=$(free_port); p2=$(free_port)
  truncate -s "${SIZE_MB}M" "$1/c2"
  cp "$W/data.bin" "$1/c1"
  nbdkit -f -i 127.0.0.1 -p "$p1" file "$1/c1" & a=$!; PIDS+=($a)
  nbdkit -f -i 127.0.0.1 -p "$p2" file "$1/c2" & b=$!; PIDS+=($b)
  sleep 0.5
  t0=$(now); nbdcopy "nbd://127.0.0.1:$p1/" "nbd://127.0.0.1:$p2/"; t1=$(now)
  kill "$a" "$b"; wait "$a" "$b" 2>/dev/null || true
  rm -f "$1/c1" "$1/c2"
  python3 -c "print(round($SIZE_MB/($t1-$t0),1))"
}

run() { # load(0|1)
  local load=$1 S=$W/run$1 URIS=() PORTS=() HP=()
  mkdir -p "$S/state"
  echo "# devices" > "$S/devices"
  export VOLMGR_STATE_DIR=$S/state VOLMGR_LVM_DEVICESFILE=$S/devices
  for i in 0 1 2 3; do
    truncate -s $((SIZE_MB + 64))M "$S/host$i"
    local p; p=$(free_port)
    nbdkit -f -i 127.0.0.1 -p "$p" file "$S/host$i" & HP+=($!); PIDS+=($!)
    PORTS+=("$p")
    URIS+=("nbd://127.0.0.1:$p/disk?reconnect-delay=2&timeout=5&connect-timeout=2")
  done
  sleep 0.5
  exec 3>&2 2>>"$S/warnings"
  "$V" pvcreate "${URIS[@]}" >/dev/null
  "$V" vgcreate vgb "${URIS[@]}" >/dev/null
  for i in 0 1 2 3; do "$V" pvchange --addtag "host:h$i" "${URIS[$i]}" >/dev/null; done
  "$V" lvcreate --type raid1 -m 2 -L "${SIZE_MB}M" -n r vgb "${URIS[0]}" "${URIS[1]}" "${URIS[2]}" >/dev/null
  "$V" daemon --no-ublk --raid-fault-policy allocate --monitor-interval 1 >"$S/daemon.log" 2>&1 &
  local dpid=$!; PIDS+=($dpid)
  for _ in $(seq 200); do [ -S "$S/state/control.sock" ] && "$V" dev list >/dev/null 2>&1 && break; sleep 0.05; done
  "$V" lvchange -ay vgb/r --nbd 127.0.0.1:0 >/dev/null
  local uri; uri=$("$V" lvs --noheadings -o lv_dm_path vgb/r | tr -d ' ')
  # Wait for the initial resync, then fill the LV.
  until [ "$("$V" lvs --noheadings -o copy_percent vgb/r | tr -d ' ')" = "100.00" ]; do sleep 0.5; done
  nbdcopy "$W/data.bin" "$uri"
  # The reference, without client load, just before.
  local nbdcopy; nbdcopy=$(nbdcopy_rate "$S")
  local fpid=
  # A client writer throughout (load), or one small write that meets the dead leg.
  if [ "$load" = 1 ]; then
    fio --name=load --ioengine=nbd --uri="$uri" --rw=randrw --bs=4k --iodepth=8 \
      --time_based --runtime=600 --output-format=json --output="$S/fio.json" >/dev/null 2>&1 &
    fpid=$!; PIDS+=($fpid)
    sleep 2
  fi
  local t_kill; t_kill=$(now)
  kill "${HP[1]}"
  if [ "$load" = 0 ]; then
    fio --name=poke --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --size=4M --iodepth=1 \
      --output-format=json --output="$S/fio.json" >/dev/null 2>&1
  fi
  local t_start= t_done=
  # Polled through the daemon's status (`lvs` would scan every PV over NBD each time, taking
  # CPU from the rebuild it measures); the spare's use is checked with lvs once at the end.
  for _ in $(seq 1200); do
    if [ -z "$t_start" ] && grep -q 'rebuilding image' "$S/daemon.log"; then t_start=$(now); fi
    if [ -n "$t_start" ] && "$V" dev status vgb-r | grep -q ' AAA .* idle'; then
      t_done=$(now); break
    fi
    sleep 0.1
  done
  [ -n "$t_done" ] || { echo "no re-mirror; daemon log:" >&3; cat "$S/daemon.log" >&3; exit 1; }
  "$V" lvs -a --noheadings -o devices vgb | grep -q ":${PORTS[3]}/" \
    || { echo "the spare holds no image; daemon log:" >&3; cat "$S/daemon.log" >&3; exit 1; }
  if [ -n "$fpid" ]; then kill -INT "$fpid" 2>/dev/null || true; wait "$fpid" 2>/dev/null || true; fi
  local stall
  stall=$(python3 -c "
import json,sys
try:
    t=open('$S/fio.json').read()
    j=json.loads(t[t.index('{'):])
    m=max(j['jobs'][0][d]['clat_ns']['max'] for d in ('read','write'))
    print(round(m/1e9,2))
except Exception as e:
    print('n/a')")
  local start rate
  start=$(python3 -c "print(round($t_start-$t_kill,2))")
  rate=$(python3 -c "print(round($SIZE_MB/($t_done-$t_start),1))")
  echo "load=$load: host killed -> rebuild started ${start}s; rebuild ${SIZE_MB} MiB at $rate MB/s ($(python3 -c "print(round($rate/$nbdcopy,2))")x nbdcopy at $nbdcopy MB/s just before); longest client I/O ${stall}s"
  "$V" lvchange -an vgb/r >/dev/null
  kill "$dpid"; wait "$dpid" 2>/dev/null || true
  exec 2>&3 3>&-
}
for round in $(seq "${ROUNDS:-1}"); do
  rm -rf "$W/run0" "$W/run1"
  run 0
  run 1
done
