#!/bin/bash
# smoke.sh - the harness itself: boot, 9p, writable dirs, and every kernel module the other
# guest scripts rely on loads (timed: module loading is the biggest part of boot under TCG).
# vm-modules: ublk_drv
# vm-checks: 14
. "$(dirname "$0")/lib.sh"
step "kernel $(uname -r)"
[ -c /dev/ublk-control ] && ok ublk-control || fail ublk-control "no /dev/ublk-control"
for m in loop dm-mod dm-thin-pool dm-raid raid456 dm-flakey dm-delay nbd ext4 xfs; do
  t=$(uptime_s)
  if load_modules $m; then
    ok "modprobe-$m"; echo "  $m loaded in $(awk -v a=$t -v b=$(uptime_s) 'BEGIN{print b-a}')s"
  fi
done
echo hello > "$VM_RESULTS/smoke.txt" && ok results-writable || fail results-writable
touch /tmp/x && ok tmp-writable || fail tmp-writable
cmp <(echo a) <(echo a) && ok process-substitution || fail process-substitution
