#!/bin/bash
# all.sh - every guest check script in one boot (tests/vm/run-all.sh runs it): the harness
# smoke test, the ublk server's own checks (ublk-serve), then the volume daemon's (volmgr).
# Usage: all.sh UBLK_SERVE_BINARY VOLMGR_BINARY [SCRIPT...]
#   SCRIPT: run only these (names like daemon.sh); default: all of them.
# vm-modules: ublk_drv ext4 xfs dm-mod loop
D=$(dirname "$0")
SERVE=$1 VOLMGR=$2
shift 2
SCRIPTS=${*:-smoke.sh ublk-basic.sh ublk-tables.sh ublk-recovery.sh daemon.sh daemon-recovery.sh daemon-grow.sh}
rc=0
for s in $SCRIPTS; do
  echo "===== $s (uptime $(cut -d' ' -f1 /proc/uptime)s)"
  case $s in
    ublk-*) bash "$D/$s" "$SERVE" || rc=1 ;;
    daemon*) bash "$D/$s" "$VOLMGR" || rc=1 ;;
    *) bash "$D/$s" || rc=1 ;;
  esac
done
echo "===== all done (uptime $(cut -d' ' -f1 /proc/uptime)s)"
exit $rc
