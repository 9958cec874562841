#!/bin/bash
# run-all.sh - every VM check of the project (called by .ci/run): builds the ublk test server
# (ublk-serve) and volmgr, then runs tests/vm/guest/all.sh (every guest script: smoke, ublk
# server, volume daemon) on two kernels, one boot each: bookworm-backports' 6.12 (the ublk
# driver copies request data; no UPDATE_SIZE, so the online-grow check reports CHECK_SKIP
# there) and trixie-backports' 7.x (zero copy with UBLK_F_AUTO_BUF_REG, online grow).
#
# Fails on any CHECK_FAIL (or a failed boot). Last line: `vm: N passed, M failed`.
# On a host with /dev/ublk-control everything runs directly (run-vm.sh's VM_DIRECT), in one go.
# Environment: VM_KERNEL_SUITE (main boot's kernel, default bookworm-backports),
# VM_SECOND_SUITE (default trixie-backports; empty: no second boot), VM_SCRIPTS (only these
# guest scripts, e.g. "daemon.sh daemon-recovery.sh"), and run-vm.sh's knobs.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
T0=$(date +%s)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# (two commands: with --example, cargo would build only the example, not the volmgr binary)
if ! { cargo build -q -p volmgr && cargo build -q -p ublk-target --example ublk-serve; }; then
  echo "vm: ERROR: build failed"; echo "vm: 0 passed, 1 failed"; exit 1
fi
SERVE=$TARGET/debug/examples/ublk-serve
VOLMGR=$TARGET/debug/volmgr
LOGS=$(mktemp -d /tmp/vm-run-all.XXXXXX)
PASS=0 FAIL=0 SKIPS=""

# boot NAME SUITE SCRIPT...: one run-vm.sh run of guest/all.sh; adds up its verdict.
boot() {
  local name=$1 suite=$2 log=$LOGS/$1.log t=$(date +%s) line p f
  shift 2
  echo "== vm boot '$name' (kernel suite $suite): ${*:-every guest script}"
  VM_KERNEL_SUITE=$suite "$ROOT/tests/vm/run-vm.sh" "$ROOT/tests/vm/guest/all.sh" \
    "$SERVE" "$VOLMGR" "$@" 2>&1 | tee "$log"
  line=$(grep -a '^vm: [0-9]* passed, [0-9]* failed$' "$log" | tail -n1)
  if [ -z "$line" ]; then
    p=0; f=1; echo "vm: boot '$name' printed no verdict"
  else
    p=$(echo "$line" | awk '{print $2}'); f=$(echo "$line" | awk '{print $4}')
  fi
  # A requested kernel suite that did not boot is a failure, whatever else the log says.
  if [ "$direct" = 0 ] && ! grep -aq "^vm: booted kernel .* (suite $suite)\$" "$log"; then
    echo "vm: boot '$name': the requested kernel suite $suite was not run"
    f=$((f + 1))
  fi
  PASS=$((PASS + p)); FAIL=$((FAIL + f))
  echo "== vm boot '$name': $p passed, $f failed in $(( $(date +%s) - t ))s"
}

direct=0
case "${VM_DIRECT:-auto}" in 1) direct=1 ;; 0) ;; *) [ -c /dev/ublk-control ] && direct=1 ;; esac
# One VM at a time on this machine (see run-vm.sh): take the lock once for all our boots, so
# another user's VM cannot slip in between them.
if [ "$direct" = 0 ] && [ "${VM_LOCK_HELD:-0}" != 1 ]; then
  VM_LOCK=${VM_LOCK:-/var/lock/volmgr-vm.lock}
  exec 8<>"$VM_LOCK" || { echo "vm: ERROR: cannot open $VM_LOCK"; echo "vm: 0 passed, 1 failed"; exit 1; }
  if ! flock -n 8; then
    echo "vm: another VM is running ($(tr -d '\n' < "$VM_LOCK" 2>/dev/null)); waiting for $VM_LOCK"
    tw=$(date +%s); flock 8
    echo "vm: got $VM_LOCK after waiting $(( $(date +%s) - tw ))s"
  fi
  echo "pid $$ run-all.sh since $(date -u +%H:%M:%S)" > "$VM_LOCK"
  export VM_LOCK VM_LOCK_HELD=1
fi
MAIN_SUITE=${VM_KERNEL_SUITE:-bookworm-backports}
# shellcheck disable=SC2086
boot main "$MAIN_SUITE" ${VM_SCRIPTS:-}
SECOND_SUITE=${VM_SECOND_SUITE-trixie-backports}
if [ "$direct" = 1 ] && [ -n "${VM_SECOND_SUITE:-}" ]; then
  # Asked for by name, and impossible here: say so and fail rather than pass without it.
  echo "vm: kernel suite $VM_SECOND_SUITE was requested, but direct mode runs on this host's kernel only"
  FAIL=$((FAIL + 1))
fi
if [ "$direct" = 0 ] && [ -n "$SECOND_SUITE" ] && [ "$SECOND_SUITE" != "$MAIN_SUITE" ]; then
  # shellcheck disable=SC2086
  boot second "$SECOND_SUITE" ${VM_SCRIPTS:-}
fi
# Checks no kernel of this run could do.
SKIPS=$(cat "$LOGS"/*.log | grep -a '^CHECK_SKIP ' | sed 's/^CHECK_SKIP \([^:]*\):.*/\1/' | sort -u)
for s in $SKIPS; do
  grep -aq "^CHECK_OK $s" "$LOGS"/*.log || echo "vm: not run on any kernel: $s"
done
echo "vm: all boots done in $(( $(date +%s) - T0 ))s (logs: $LOGS)"
[ "$FAIL" = 0 ] && rm -rf "$LOGS"
echo "vm: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
