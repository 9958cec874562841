#!/bin/bash
# ublk-all.sh - every ublk guest check in one boot (saves a boot per script in CI).
# Usage: ublk-all.sh UBLK_SERVE_BINARY
# vm-modules: ublk_drv ext4 xfs dm-mod loop
D=$(dirname "$0")
rc=0
bash "$D/ublk-basic.sh" "$@" || rc=1
bash "$D/ublk-tables.sh" "$@" || rc=1
bash "$D/ublk-recovery.sh" "$@" || rc=1
exit $rc
