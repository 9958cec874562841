#!/bin/bash
# all.sh - every guest check script in one boot (tests/vm/run-all.sh runs it): the harness
# smoke test, the ublk server's own checks (ublk-serve), then the volume daemon's (volmgr).
# Usage: all.sh UBLK_SERVE_BINARY VOLMGR_BINARY [SCRIPT...]
#   SCRIPT: run only these (names like daemon.sh); default: all of them.
# vm-modules: ublk_drv ext4 xfs dm-mod loop
D=$(dirname "$0")
SERVE=$1 VOLMGR=$2
shift 2
SCRIPTS=${*:-smoke.sh ublk-basic.sh ublk-tables.sh ublk-recovery.sh daemon.sh daemon-recovery.sh daemon-grow.sh daemon-remote.sh lvm.sh}
# Each script declares how many checks it runs (`# vm-checks: N`, CHECK_SKIP lines count):
# a script that stops early, or silently skips a block, fails here instead of passing with
# fewer checks.
rc=0
OUT=$(mktemp)
for s in $SCRIPTS; do
  echo "===== $s (uptime $(cut -d' ' -f1 /proc/uptime)s)"
  case $s in
    ublk-*) bash "$D/$s" "$SERVE" 2>&1 | tee "$OUT" ;;
    daemon*|lvm*) bash "$D/$s" "$VOLMGR" 2>&1 | tee "$OUT" ;;
    *) bash "$D/$s" 2>&1 | tee "$OUT" ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  declared=$(sed -n 's/^# *vm-checks: *\([0-9][0-9]*\).*/\1/p' "$D/$s" | head -n1)
  # `# vm-checks-below-X.Y: M`: a script whose checks depend on the kernel declares both.
  below=$(sed -n 's/^# *vm-checks-below-\([0-9]*\.[0-9]*\): *\([0-9][0-9]*\).*/\1 \2/p' "$D/$s" | head -n1)
  if [ -n "$below" ]; then
    kv=$(uname -r); kmaj=${kv%%.*}; kr=${kv#*.}; kmin=${kr%%[!0-9]*}
    want=${below% *}; wmaj=${want%.*}; wmin=${want#*.}
    if [ "$kmaj" -lt "$wmaj" ] || { [ "$kmaj" -eq "$wmaj" ] && [ "$kmin" -lt "$wmin" ]; }; then
      declared=${below#* }
    fi
  fi
  ran=$(grep -acE '^CHECK_(OK|FAIL|SKIP) ' "$OUT")
  if [ -z "$declared" ]; then
    echo "CHECK_FAIL vm-checks-$s: the script has no '# vm-checks: N' header"; rc=1
  elif [ "$ran" != "$declared" ]; then
    echo "CHECK_FAIL vm-checks-$s: ran $ran checks, the script declares $declared"; rc=1
  fi
done
rm -f "$OUT"
echo "===== all done (uptime $(cut -d' ' -f1 /proc/uptime)s)"
exit $rc
