# lib.sh - helpers for guest scripts run by tests/vm/run-vm.sh (source it).
#
# Every check prints exactly one line: `CHECK_OK name` or `CHECK_FAIL name: why`; run-vm.sh
# counts them. Checks never abort the script: later checks still run and report.

ok()   { echo "CHECK_OK $1"; }
fail() { echo "CHECK_FAIL $1: ${2:-failed}"; }
# check NAME CMD...: runs CMD (output shown), OK if it exits 0.
check() {
  local name=$1; shift
  local out rc
  out=$("$@" 2>&1); rc=$?
  [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/  | /' | tail -n 40
  if [ $rc = 0 ]; then ok "$name"; else fail "$name" "exit $rc: $*"; fi
  return $rc
}
# expect_eq NAME GOT WANT
expect_eq() {
  if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "got '$2', want '$3'"; fi
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# kernel_at_least MAJOR MINOR: whether the running kernel is at least MAJOR.MINOR.
kernel_at_least() {
  local v; v=$(uname -r)
  local ma=${v%%.*} rest=${v#*.}; local mi=${rest%%[!0-9]*}
  [ "$ma" -gt "$1" ] || { [ "$ma" -eq "$1" ] && [ "$mi" -ge "$2" ]; }
}
step() { echo "----- $* (uptime $(uptime_s)s)"; }
# wait_for PATH-TEST SECONDS: waits until `test $1` holds.
wait_for() {
  local t=0
  while ! test "$1" "$2"; do
    sleep 0.1; t=$((t + 1)); [ $t -ge $(( $3 * 10 )) ] && return 1
  done
}
# load_modules NAME...: loads kernel modules (the guest kernel's, in the VM); one check each
# only on failure, so scripts can call it freely.
load_modules() {
  local m rc=0
  for m in "$@"; do
    grep -q "^$(echo "$m" | tr - _) " /proc/modules && continue
    if ! modprobe ${VM_MODROOT:+-d "$VM_MODROOT"} "$m"; then
      fail "modprobe-$m" "cannot load kernel module $m"; rc=1
    fi
  done
  return $rc
}
# e2fsck_clean DEV: `e2fsck -fn` that also fails on what -n lets through with exit 0: a
# device still in use (mounted elsewhere, e.g. in a server's mount namespace) or counts to fix.
e2fsck_clean() {
  local out rc
  out=$(e2fsck -fn "$1" 2>&1); rc=$?
  printf '%s\n' "$out"
  [ $rc = 0 ] || return $rc
  ! printf '%s\n' "$out" | grep -qiE 'in use|Fix\?|count wrong|recovery'
}

# serve_bg OUT ERR CMD...: runs CMD in the background (stdout to OUT, stderr to ERR), PID in
# SPID; succeeds once CMD has printed its first line (a device path) into DEV, fails if CMD
# exits first or prints nothing for 90 s.
serve_bg() {
  local out=$1 err=$2; shift 2
  : > "$out"
  "$@" > "$out" 2> "$err" &
  SPID=$!
  DEV=""
  for _ in $(seq 1 900); do
    DEV=$(head -n1 "$out")
    [ -n "$DEV" ] && return 0
    kill -0 $SPID 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# gone PID SECONDS: waits for a process to exit.
gone() {
  for _ in $(seq 1 $(( $2 * 10 ))); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  return 1
}
