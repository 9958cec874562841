#!/bin/bash
# run-vm.sh - run a guest test script against a real ublk-capable Linux kernel.
#
# Usage: tests/vm/run-vm.sh GUEST_SCRIPT [ARGS...]
#
# Our hosts' kernel has no ublk, no device-mapper and no nbd client, so the script boots
# Debian bookworm-backports' 6.12 kernel under QEMU (TCG: /dev/kvm here cannot boot a Linux
# guest) with a busybox initramfs, shares the host's / read-only over virtio-9p, chroots into
# it and runs GUEST_SCRIPT there: host binaries (ours, mkfs, fio, dmsetup) run unchanged.
# When /dev/ublk-control exists on the host (a real admin machine) the script runs directly
# on the host instead (VM_DIRECT=1 forces that, VM_DIRECT=0 forbids it).
#
# Guest scripts print one line per check: `CHECK_OK name` or `CHECK_FAIL name: why`
# (tests/vm/guest/lib.sh has helpers). The run fails (exit 1) if qemu cannot run, if any
# CHECK_FAIL line appears, if the script exits non-zero, or if it never reports completion.
# The last line is `vm: N passed, M failed`.
#
# Environment:
#   VM_CACHE    cache for the kernel and initramfs   (default /var/cache/volmgr-vm)
#   VM_RESULTS  writable dir shared with the guest   (default: a new dir under /tmp)
#               the guest sees it at the same path; scripts find it in $VM_RESULTS
#   VM_MEM      guest RAM (default 3G)      VM_SMP  guest CPUs (default: host CPUs, max 4)
#   VM_TIMEOUT  seconds for one boot (default 900)
#   VM_ACCEL    QEMU accelerator (default tcg,thread=multi)
#   VM_PASS_ENV space-separated names of host variables to pass to the guest script
#   VM_DIRECT   1: run on this host; 0: always boot the VM; unset: autodetect
set -euo pipefail

die() { echo "vm: ERROR: $*" >&2; echo "vm: 0 passed, 1 failed"; exit 1; }
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "vm: [$(elapsed)s] $*"; }

[ $# -ge 1 ] || die "usage: $0 GUEST_SCRIPT [ARGS...]"
GUEST=$(readlink -f "$1") || die "guest script $1 not found"
shift
[ -f "$GUEST" ] || die "guest script $GUEST not found"
[ "$(id -u)" = 0 ] || die "must run as root (qemu 9p export of /, module loading, ublk)"

VM_CACHE=${VM_CACHE:-/var/cache/volmgr-vm}
VM_MEM=${VM_MEM:-3G}
VM_SMP=${VM_SMP:-$(n=$(nproc); [ "$n" -gt 4 ] && n=4; echo "$n")}
VM_TIMEOUT=${VM_TIMEOUT:-900}
VM_ACCEL=${VM_ACCEL:-tcg,thread=multi}
if [ -n "${VM_RESULTS:-}" ]; then
  mkdir -p "$VM_RESULTS"; VM_RESULTS=$(readlink -f "$VM_RESULTS")
else
  VM_RESULTS=$(mktemp -d /tmp/vm-results.XXXXXX)
fi
mkdir -p "$VM_CACHE"

# Decide where the script runs.
MODE=vm
case "${VM_DIRECT:-auto}" in
  1) MODE=direct ;;
  0) MODE=vm ;;
  *) [ -c /dev/ublk-control ] && MODE=direct ;;
esac

# The guest mounts a fresh tmpfs on /tmp, hiding the host's /tmp: a guest script kept under
# /tmp is copied (with its directory, for helper files) into the shared results dir.
if [ "$MODE" = vm ]; then
  case "$GUEST" in
    /tmp/*|/run/*)
      mkdir -p "$VM_RESULTS/guest-src"
      cp -a "$(dirname "$GUEST")/." "$VM_RESULTS/guest-src/"
      GUEST="$VM_RESULTS/guest-src/$(basename "$GUEST")" ;;
  esac
  case "$VM_RESULTS" in
    /proc/*|/sys/*|/dev/*|/run/*) die "VM_RESULTS must not be under /proc, /sys, /dev or /run" ;;
  esac
fi

# The launcher runs inside the guest's chroot (or on the host in direct mode): it sets the
# environment, runs the guest script and reports completion with its exit code.
LAUNCH="$VM_RESULTS/.vm-launch.sh"
{
  echo '#!/bin/bash'
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  echo 'export DM_DISABLE_UDEV=1 LC_ALL=C HOME=/root'
  printf 'export VM_RESULTS=%q VM_MODE=%q\n' "$VM_RESULTS" "$MODE"
  for v in ${VM_PASS_ENV:-}; do
    [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  echo 'cd "$VM_RESULTS"'
  echo 'echo "VM_GUEST_START $(cut -d" " -f1 /proc/uptime)"'
  printf '/bin/bash %q' "$GUEST"; printf ' %q' "$@"; echo
  echo 'rc=$?'
  echo 'sync'
  echo 'echo "VM_GUEST_DONE rc=$rc uptime=$(cut -d" " -f1 /proc/uptime)"'
} > "$LAUNCH"
chmod +x "$LAUNCH"

# Counts the checks in a log, prints the summary line, and exits with the verdict.
verdict() {
  local logf=$1 extra_fail=$2 pass fail
  pass=$(grep -ac '^CHECK_OK ' "$logf" || true)
  fail=$(grep -ac '^CHECK_FAIL ' "$logf" || true)
  fail=$((fail + extra_fail))
  if ! grep -aq '^VM_GUEST_DONE rc=0 ' "$logf"; then
    if grep -aq '^VM_GUEST_DONE ' "$logf"; then
      echo "vm: guest script exited with $(grep -a '^VM_GUEST_DONE ' "$logf" | sed 's/.*rc=\([0-9]*\).*/\1/')"
    else
      echo "vm: guest script did not report completion"
    fi
    fail=$((fail + 1))
  fi
  grep -a '^CHECK_FAIL ' "$logf" | sed 's/^/vm: failed: /' || true
  log "total run time $(elapsed)s (log: $logf)"
  echo "vm: $pass passed, $fail failed"
  [ "$fail" = 0 ]
}

if [ "$MODE" = direct ]; then
  log "/dev/ublk-control present: running $(basename "$GUEST") directly on this host"
  for m in ublk_drv loop dm-mod dm-thin-pool dm-raid raid456 dm-flakey dm-delay nbd; do
    modprobe "$m" 2>/dev/null || true
  done
  set +e
  bash "$LAUNCH" 2>&1 | tee "$VM_RESULTS/console.log"
  set -e
  verdict "$VM_RESULTS/console.log" 0
  exit $?
fi

# ---- 1. host packages -------------------------------------------------------------------
need=0
for p in qemu-system-x86 busybox-static e2fsprogs xfsprogs fio dmsetup xz-utils cpio kmod; do
  dpkg -s "$p" >/dev/null 2>&1 || need=1
done
command -v qemu-system-x86_64 >/dev/null || need=1
if [ "$need" = 1 ]; then
  log "installing host packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >"$VM_CACHE/apt-update.log" 2>&1 || die "apt-get update failed (see $VM_CACHE/apt-update.log)"
  # qemu-system-x86 from bookworm would otherwise remove backports' qemu-utils: pin the
  # whole qemu set to bookworm in one transaction.
  apt-get install -y --no-install-recommends --allow-downgrades qemu-system-x86 \
    qemu-utils/bookworm qemu-block-extra/bookworm busybox-static e2fsprogs xfsprogs fio \
    dmsetup xz-utils cpio kmod >"$VM_CACHE/apt-install.log" 2>&1 \
    || die "apt-get install failed (see $VM_CACHE/apt-install.log)"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing after install"
BUSYBOX=$(command -v busybox) || die "busybox missing"

# One preparer at a time per cache (parallel runs share the kernel and initramfs).
exec 9>"$VM_CACHE/.lock"
flock 9

# ---- 2. kernel: bookworm-backports 6.12 through a private apt config ------------------
KDEB=$(ls "$VM_CACHE"/linux-image-6.12.*+bpo-amd64_*_amd64.deb "$VM_CACHE"/linux-image-6.12.*+deb12-amd64_*_amd64.deb 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$KDEB" ]; then
  log "fetching the bookworm-backports kernel into $VM_CACHE"
  A="$VM_CACHE/apt"
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial"
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
  echo "deb $MIRROR bookworm-backports main" > "$A/bpo.list"
  APTO=(-o Dir::Etc::sourcelist="$A/bpo.list" -o Dir::Etc::sourceparts=/nonexistent
        -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
  apt-get "${APTO[@]}" update >"$VM_CACHE/apt-bpo.log" 2>&1 || die "backports index update failed (see $VM_CACHE/apt-bpo.log)"
  KPKG=$(apt-cache "${APTO[@]}" depends linux-image-amd64 2>/dev/null \
         | awk '/Depends: linux-image-6\.12/{print $2; exit}')
  [ -n "$KPKG" ] || die "no linux-image-6.12 package in bookworm-backports"
  (cd "$VM_CACHE" && apt-get "${APTO[@]}" download "$KPKG" >>"$VM_CACHE/apt-bpo.log" 2>&1) \
    || die "download of $KPKG failed (see $VM_CACHE/apt-bpo.log)"
  KDEB=$(ls "$VM_CACHE"/"$KPKG"_*_amd64.deb | sort -V | tail -1)
fi
KV=$(basename "$KDEB" | sed -E 's/^linux-image-([^_]+)_.*/\1/')
KX="$VM_CACHE/kernel-$KV"
if [ ! -f "$KX/.complete" ]; then
  log "unpacking $(basename "$KDEB")"
  rm -rf "$KX"; dpkg -x "$KDEB" "$KX"; depmod -b "$KX" "$KV"; touch "$KX/.complete"
fi
grep -q '^CONFIG_BLK_DEV_UBLK=[my]' "$KX/boot/config-$KV" || die "kernel $KV has no ublk"

# ---- 3. initramfs: busybox, decompressed modules (with dependencies), /init --------------
# Modules the guest loads, in order (crc32c_generic before anything needing libcrc32c).
MODS="crc32c_generic ublk_drv loop nbd dm-mod dm-thin-pool dm-raid raid456 dm-flakey dm-delay virtio_pci virtio_blk 9pnet_virtio 9p ext4 xfs"
INIT=$(cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "VM_INIT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
for m in $(cat /modules.load); do
  grep -q "^$(echo $m | tr - _) " /proc/modules && continue
  modprobe $m 2>/dev/null || echo "VM_INIT: modprobe $m failed"
done
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
R=$(arg vm_results); MEMT=$(arg vm_tmp)
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host \
  || { echo "VM_INIT: 9p mount of the host root failed"; poweroff -f; }
mount -t devtmpfs dev /host/dev; mount -t proc proc /host/proc; mount -t sysfs sys /host/sys
mount -t tmpfs -o size=$MEMT tmp /host/tmp; mount -t tmpfs run /host/run
mount -t tmpfs root /host/root 2>/dev/null
mkdir -p /host$R 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 results /host$R \
  || { echo "VM_INIT: 9p mount of the results dir failed"; poweroff -f; }
chroot /host /bin/bash $R/.vm-launch.sh
sync; poweroff -f
EOF
)
HASH=$( { echo "$MODS"; echo "$INIT"; sha256sum "$BUSYBOX"; } | sha256sum | cut -c1-16)
INITRD="$VM_CACHE/initrd-$KV-$HASH.gz"
if [ ! -f "$INITRD" ]; then
  log "building initramfs for $KV"
  R="$VM_CACHE/initramfs-root.$$"; rm -rf "$R"
  mkdir -p "$R"/{bin,dev,proc,sys,tmp,host,lib/modules/$KV}
  cp "$BUSYBOX" "$R/bin/busybox"
  DEP="$KX/lib/modules/$KV/modules.dep"
  load=""
  for m in $MODS; do
    if grep -qE "/$m\.ko(\.xz)?:" "$DEP"; then
      load="$load $m"
      grep -E "/$m\.ko(\.xz)?:" "$DEP" | tr -d ':' | tr ' ' '\n'
    elif ! grep -qE "/$m\.ko" "$KX/lib/modules/$KV/modules.builtin"; then
      echo "vm: note: module $m is not in kernel $KV" >&2
    fi
  done | sort -u | while read -r f; do
    [ -n "$f" ] || continue
    mkdir -p "$R/lib/modules/$KV/$(dirname "$f")"
    case "$f" in
      *.xz) xz -dc "$KX/lib/modules/$KV/$f" > "$R/lib/modules/$KV/${f%.xz}" ;;
      *) cp "$KX/lib/modules/$KV/$f" "$R/lib/modules/$KV/$f" ;;
    esac
  done
  for m in $MODS; do
    grep -qE "/$m\.ko(\.xz)?:" "$DEP" && echo "$m"
  done > "$R/modules.load"
  cp "$KX/lib/modules/$KV"/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KV/"
  depmod -b "$R" "$KV"
  printf '%s\n' "$INIT" > "$R/init"; chmod +x "$R/init"
  (cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"; rm -rf "$R"
fi
flock -u 9
log "kernel $KV, initramfs $(basename "$INITRD") ready"

# ---- 4. boot, retrying a guest that dies before the script starts ---------------------
# Multi-threaded TCG occasionally oopses early in boot (a cross-vCPU code-patching race).
MEMT=$(awk -v m="$VM_MEM" 'BEGIN{u=toupper(substr(m,length(m))); n=m+0;
  if(u=="G")n*=1024; printf "%dm", n/2}')
CONSOLE="$VM_RESULTS/console.log"
rc=1
for attempt in 1 2 3; do
  log "booting ($VM_ACCEL, ${VM_MEM} RAM, $VM_SMP CPUs), attempt $attempt"
  set +e
  timeout --foreground -k 10 "$VM_TIMEOUT" qemu-system-x86_64 -accel "$VM_ACCEL" -cpu max \
    -m "$VM_MEM" -smp "$VM_SMP" -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$KX/boot/vmlinuz-$KV" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 vm_results=$VM_RESULTS vm_tmp=$MEMT" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$VM_RESULTS",mount_tag=results,security_model=none,multidevs=remap \
    </dev/null 2>&1 | tr -d '\r' | tee "$CONSOLE.$attempt" | grep -av '^VM_GUEST_START\|^VM_INIT uptime'
  rc=${PIPESTATUS[0]}
  set -e
  cp "$CONSOLE.$attempt" "$CONSOLE"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    log "qemu timed out after ${VM_TIMEOUT}s"
  elif [ "$rc" != 0 ]; then
    log "qemu exited with $rc"
  fi
  if grep -aq '^VM_GUEST_START' "$CONSOLE"; then
    log "guest script started at guest uptime $(grep -a '^VM_GUEST_START' "$CONSOLE" | cut -d' ' -f2)s"
    break
  fi
  if grep -aq '^VM_INIT uptime' "$CONSOLE"; then
    # /init ran but the script never started: a setup failure, not a flaky boot.
    grep -a '^VM_INIT:' "$CONSOLE" >&2 || true
    die "the guest reached /init but could not start the script (see $CONSOLE)"
  fi
  log "guest died before /init (kept $CONSOLE.$attempt); retrying"
done
grep -aq '^VM_GUEST_START' "$CONSOLE" || die "guest did not start in 3 boots (qemu rc=$rc, see $CONSOLE)"
extra=0
[ "$rc" = 0 ] || extra=1
grep -aqE 'Kernel panic|BUG:|Oops' "$CONSOLE" && { echo "vm: kernel oops/panic in the guest"; extra=$((extra + 1)); }
verdict "$CONSOLE" "$extra"
