#!/bin/bash
# run-vm.sh - run a guest test script against a real ublk-capable Linux kernel.
#
# Usage: tests/vm/run-vm.sh GUEST_SCRIPT [ARGS...]
#
# Our hosts' kernel has no ublk, no device-mapper and no nbd client, so the script boots
# Debian bookworm-backports' 6.12 kernel (or VM_KERNEL_SUITE's) under QEMU (TCG: /dev/kvm here
# cannot boot a Linux guest) with a busybox initramfs, shares the host's / read-only over virtio-9p, chroots into
# it and runs GUEST_SCRIPT there: host binaries (ours, mkfs, fio, dmsetup) run unchanged.
# When /dev/ublk-control exists on the host (a real admin machine) the script runs directly
# on the host instead (VM_DIRECT=1 forces that, VM_DIRECT=0 forbids it).
#
# Guest scripts print one line per check: `CHECK_OK name` or `CHECK_FAIL name: why`
# (tests/vm/guest/lib.sh has helpers), or `CHECK_SKIP name: why` for a check this kernel
# cannot do (listed as "not run", never counted as passed). The run fails (exit 1) if qemu cannot run, if any
# CHECK_FAIL line appears, if the script exits non-zero, or if it never reports completion.
# The last line is `vm: N passed, M failed`.
#
# Kernel modules: the initramfs holds ublk_drv, loop, nbd, dm-mod, dm-thin-pool, dm-raid,
# raid456, dm-flakey, dm-delay, ext4, xfs (+ dependencies). A script names the ones to load
# at boot in a header line `# vm-modules: ublk_drv ext4`; others load on demand with lib.sh's
# `load_modules` (`modprobe -d /run/vm` in the guest). Loading costs ~0.5-2.5 s each under TCG.
#
# Environment:
#   VM_CACHE    cache for the kernel and initramfs   (default /var/cache/volmgr-vm)
#   VM_RESULTS  writable dir shared with the guest   (default: a new dir under /tmp, removed
#               after a passing run unless VM_KEEP=1)
#               the guest sees it at the same path; scripts find it in $VM_RESULTS
#   VM_MEM      guest RAM (default 3G)      VM_SMP  guest CPUs (default: host CPUs, max 4)
#   VM_TIMEOUT  seconds for one boot (default 900)
#   VM_ACCEL    QEMU accelerator (default tcg,thread=multi)
#   VM_CPU      QEMU CPU model (default max). Benchmarks may pass max,-erms: TCG emulates
#               `rep movsb` a byte per step, which the kernel uses for every copy to or from
#               user memory when the CPU has ERMS (see BENCHMARKS.md)
#   VM_PASS_ENV space-separated names of host variables to pass to the guest script
#   VM_MODULES  extra modules to load at boot (space or comma separated)
#   VM_DIRECT   1: run on this host; 0: always boot the VM; unset: autodetect
#   VM_KERNEL_SUITE  Debian suite the kernel comes from (default bookworm-backports: 6.12;
#               trixie-backports gives 7.x, which has ublk's UPDATE_SIZE, Linux >= 6.16)
#   VM_SHARE    extra host directories (colon-separated) to show the guest read-only at the same
#               path. The guest's /tmp and /run are fresh tmpfs, so a checkout or a cargo target
#               dir under /tmp (a CI clone) would be invisible: this repository and
#               $CARGO_TARGET_DIR are added automatically when they live there.
#   VM_LOCK     lock file serializing VM boots on this machine (default /var/lock/volmgr-vm.lock):
#               one TCG guest at a time on our 2 cores; a second run waits and says so
#               (VM_LOCK_HELD=1: the caller already holds it, for several boots in a row)
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
RESULTS_OWNED=0
if [ -n "${VM_RESULTS:-}" ]; then
  mkdir -p "$VM_RESULTS"; VM_RESULTS=$(readlink -f "$VM_RESULTS")
else
  VM_RESULTS=$(mktemp -d /tmp/vm-results.XXXXXX)
  RESULTS_OWNED=1
fi
mkdir -p "$VM_CACHE"

# Decide where the script runs.
MODE=vm
case "${VM_DIRECT:-auto}" in
  1) MODE=direct ;;
  0) MODE=vm ;;
  *) [ -c /dev/ublk-control ] && MODE=direct ;;
esac

# The guest mounts fresh tmpfs on /tmp and /run, hiding the host's: directories the guest needs
# from there (this checkout, the cargo target dir, VM_SHARE) are shared read-only over 9p at the
# same path.
SHARES=()
if [ "$MODE" = vm ]; then
  REPO=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
  for d in $(echo "${VM_SHARE:-}" | tr ':' ' ') "$REPO" "${CARGO_TARGET_DIR:-}"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    d=$(readlink -f "$d")
    case "$d" in
      /tmp/*|/run/*)
        case " ${SHARES[*]-} " in *" $d "*) ;; *) SHARES+=("$d") ;; esac ;;
    esac
  done
fi
SHARE_ARGS=(); SHARE_LIST=""
for i in "${!SHARES[@]}"; do
  SHARE_ARGS+=(-virtfs "local,path=${SHARES[$i]},mount_tag=share$i,security_model=none,readonly=on,multidevs=remap")
  SHARE_LIST="$SHARE_LIST${SHARE_LIST:+,}${SHARES[$i]}"
done

# A guest script kept under /tmp or /run outside the shared directories is copied (with a
# lib.sh next to it) into the shared results dir.
if [ "$MODE" = vm ]; then
  shared=0
  for d in "${SHARES[@]}"; do case "$GUEST" in "$d"/*) shared=1 ;; esac; done
  [ "$shared" = 1 ] || case "$GUEST" in
    /tmp/*|/run/*)
      mkdir -p "$VM_RESULTS/guest-src"
      cp "$GUEST" "$VM_RESULTS/guest-src/"
      [ -f "$(dirname "$GUEST")/lib.sh" ] && cp "$(dirname "$GUEST")/lib.sh" "$VM_RESULTS/guest-src/"
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
  # Where `modprobe -d` finds the guest kernel's modules (lib.sh's load_modules uses it).
  [ "$MODE" = vm ] && echo 'export VM_MODROOT=/run/vm'
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
  # Checks this kernel cannot do (never counted as passed).
  grep -a '^CHECK_SKIP ' "$logf" | sed 's/^CHECK_SKIP /vm: not run: /' || true
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
  echo "vm: ran on this host's kernel $(uname -r) (direct mode: no suite)"
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

# ---- 2. kernel: linux-image-amd64 of $VM_KERNEL_SUITE through a private apt config -------
# bookworm-backports ships one linux-image-6.12.*.deb with /boot and /lib/modules; trixie and
# later split the kernel into linux-image (meta), linux-binary and linux-modules packages that
# install under /usr/lib/modules/KV (vmlinuz and config included). Both unpack with dpkg -x.
SUITE=${VM_KERNEL_SUITE:-bookworm-backports}
KV=$(cat "$VM_CACHE/suite-$SUITE.kv" 2>/dev/null || true)
if [ -z "$KV" ] && [ "$SUITE" = bookworm-backports ]; then
  # A cache filled before the suite became configurable.
  KDEB=$(ls "$VM_CACHE"/linux-image-6.12.*+bpo-amd64_*_amd64.deb "$VM_CACHE"/linux-image-6.12.*+deb12-amd64_*_amd64.deb 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$KDEB" ] && KV=$(basename "$KDEB" | sed -E 's/^linux-image-([^_]+)_.*/\1/')
fi
if [ -z "$KV" ] || ! ls "$VM_CACHE"/linux-*-"$KV"_*_amd64.deb >/dev/null 2>&1; then
  log "fetching the $SUITE kernel into $VM_CACHE"
  A="$VM_CACHE/apt-$SUITE"
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial"
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
  echo "deb $MIRROR $SUITE main" > "$A/sources.list"
  APTO=(-o Dir::Etc::sourcelist="$A/sources.list" -o Dir::Etc::sourceparts=/nonexistent
        -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
  apt-get "${APTO[@]}" update >"$VM_CACHE/apt-$SUITE.log" 2>&1 || die "$SUITE index update failed (see $VM_CACHE/apt-$SUITE.log)"
  # The newest linux-image-amd64 of the suite names the versioned image package.
  KPKG=$(apt-cache "${APTO[@]}" depends linux-image-amd64 2>/dev/null \
         | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$KPKG" ] || die "no linux-image package in $SUITE"
  KV=${KPKG#linux-image-}
  # Split packaging: the image package only depends on the binary and modules packages.
  PKGS="$KPKG $(apt-cache "${APTO[@]}" depends "$KPKG" 2>/dev/null \
         | awk -v kv="$KV" '$1 == "Depends:" && ($2 == "linux-binary-" kv || $2 == "linux-modules-" kv || $2 == "linux-base-" kv) {print $2}' | sort -u | tr '\n' ' ')"
  # shellcheck disable=SC2086
  (cd "$VM_CACHE" && apt-get "${APTO[@]}" download $PKGS >>"$VM_CACHE/apt-$SUITE.log" 2>&1) \
    || die "download of $PKGS failed (see $VM_CACHE/apt-$SUITE.log)"
  echo "$KV" > "$VM_CACHE/suite-$SUITE.kv"
fi
KX="$VM_CACHE/kernel-$KV"
if [ ! -f "$KX/.complete" ]; then
  log "unpacking the $KV kernel"
  rm -rf "$KX"
  for d in "$VM_CACHE"/linux-*-"$KV"_*_amd64.deb; do dpkg -x "$d" "$KX"; done
  # Merged-/usr packages: give them the classic paths the rest of this script uses.
  [ -e "$KX/lib" ] || ln -s usr/lib "$KX/lib"
  mkdir -p "$KX/boot"
  for f in vmlinuz config; do
    [ -e "$KX/boot/$f-$KV" ] || [ ! -e "$KX/lib/modules/$KV/$f" ] || ln -s "../lib/modules/$KV/$f" "$KX/boot/$f-$KV"
  done
  [ -e "$KX/boot/vmlinuz-$KV" ] || die "no vmlinuz in the $KV packages"
  depmod -b "$KX" "$KV"; touch "$KX/.complete"
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
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
R=$(arg vm_results); MEMT=$(arg vm_tmp)
# Only what the harness itself needs, plus the script's declared modules (vm_modules=a,b);
# the rest is loaded on demand: raid456 alone costs seconds of RAID-6 benchmarking under TCG.
for m in crc32c_generic 9pnet_virtio 9p $(arg vm_modules | tr , ' '); do
  grep -q "^$(echo $m | tr - _) " /proc/modules && continue
  # (kernels >= 6.14 have no crc32c_generic: crc32c is a library there)
  modprobe $m 2>/dev/null || [ $m = crc32c_generic ] || echo "VM_INIT: modprobe $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /host \
  || { echo "VM_INIT: 9p mount of the host root failed"; poweroff -f; }
mount -t devtmpfs dev /host/dev; mount -t proc proc /host/proc; mount -t sysfs sys /host/sys
# devtmpfs lacks the links bash's process substitution and many tools expect.
ln -sf /proc/self/fd /dev/fd; ln -sf fd/0 /dev/stdin; ln -sf fd/1 /dev/stdout; ln -sf fd/2 /dev/stderr
mkdir -p /dev/shm /dev/pts; mount -t tmpfs shm /dev/shm; mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=$MEMT tmp /host/tmp; mount -t tmpfs run /host/run
mount -t tmpfs root /host/root 2>/dev/null
# The guest kernel's modules, for `modprobe -d /run/vm NAME` inside the chroot (the host's
# read-only / may not even have /lib/modules).
mkdir -p /host/run/vm/lib/modules/$(uname -r) \
  && mount -o bind /lib/modules/$(uname -r) /host/run/vm/lib/modules/$(uname -r) \
  || echo "VM_INIT: cannot expose the guest's modules in the chroot"
i=0
for d in $(arg vm_share | tr , ' '); do
  mkdir -p /host$d 2>/dev/null
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose share$i /host$d \
    || echo "VM_INIT: 9p mount of $d failed"
  i=$((i+1))
done
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
  for m in $MODS; do
    if grep -qE "/$m\.ko(\.xz)?:" "$DEP"; then
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
  cp "$KX/lib/modules/$KV"/modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KV/"
  depmod -b "$R" "$KV"
  printf '%s\n' "$INIT" > "$R/init"; chmod +x "$R/init"
  (cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"
  rm -f "$VM_CACHE"/initrd-"$KV"-*.gz   # older builds of the init script or module list
  mv "$INITRD.tmp" "$INITRD"; rm -rf "$R"
fi
flock -u 9
log "kernel $KV, initramfs $(basename "$INITRD") ready"

# ---- 4. boot, retrying a guest that dies before the script starts ---------------------
# Multi-threaded TCG occasionally oopses early in boot (a cross-vCPU code-patching race).
# Modules to load at boot: the script's `# vm-modules: a b c` header line, plus VM_MODULES.
MODLIST=$( { sed -n 's/^# *vm-modules: *//p' "$GUEST" | head -n1; echo "${VM_MODULES:-}"; } \
  | tr ' \n' ',,' | tr -s , | sed 's/^,//; s/,$//')
MEMT=$(awk -v m="$VM_MEM" 'BEGIN{u=toupper(substr(m,length(m))); n=m+0;
  if(u=="G")n*=1024; printf "%dm", n/2}')
CONSOLE="$VM_RESULTS/console.log"
# One VM at a time on this machine: two TCG guests on 2 cores would both crawl (and distort
# each other's timings). Wait for the lock, and say so.
# A caller that runs several boots in a row (run-all.sh) takes the lock once for all of them
# and sets VM_LOCK_HELD=1.
VM_LOCK=${VM_LOCK:-/var/lock/volmgr-vm.lock}
if [ "${VM_LOCK_HELD:-0}" != 1 ]; then
  exec 8<>"$VM_LOCK" || die "cannot open the VM lock $VM_LOCK"
  if ! flock -n 8; then
    log "another VM is running ($(tr -d '\n' < "$VM_LOCK" 2>/dev/null)); waiting for $VM_LOCK"
    tw=$(date +%s)
    flock 8
    log "got $VM_LOCK after waiting $(( $(date +%s) - tw ))s"
  fi
  echo "pid $$ $(basename "$GUEST") since $(date -u +%H:%M:%S)" > "$VM_LOCK"
fi
rc=1
for attempt in 1 2 3; do
  log "booting ($VM_ACCEL, ${VM_MEM} RAM, $VM_SMP CPUs), attempt $attempt"
  set +e
  timeout --foreground -k 10 "$VM_TIMEOUT" qemu-system-x86_64 -accel "$VM_ACCEL" -cpu "${VM_CPU:-max}" \
    -m "$VM_MEM" -smp "$VM_SMP" -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$KX/boot/vmlinuz-$KV" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 loglevel=5 vm_results=$VM_RESULTS vm_tmp=$MEMT vm_modules=$MODLIST vm_share=$SHARE_LIST" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    "${SHARE_ARGS[@]}" \
    -virtfs local,path="$VM_RESULTS",mount_tag=results,security_model=none,multidevs=remap \
    </dev/null 2>&1 | stdbuf -oL tr -d '\r' | tee "$CONSOLE.$attempt" \
    | sed -u 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g' | grep --line-buffered -av '^VM_GUEST_START\|^VM_INIT uptime'
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
if [ "${VM_LOCK_HELD:-0}" != 1 ]; then : > "$VM_LOCK"; flock -u 8; exec 8>&-; fi
grep -aq '^VM_GUEST_START' "$CONSOLE" || die "guest did not start in 3 boots (qemu rc=$rc, see $CONSOLE)"
extra=0
[ "$rc" = 0 ] || extra=1
# No `quiet`: loglevel=5 lets KERN_WARNING through, so a WARN_ON splat reaches the console
# and fails the boot like an oops does.
SPLAT='(Kernel panic|BUG:|kernel BUG|Oops|WARNING:|general protection fault|UBSAN:|KASAN:|INFO: task .* blocked for more than|watchdog: BUG: soft lockup)'
if grep -aqE "^\[ *[0-9.]+\] $SPLAT" "$CONSOLE"; then
  echo "vm: kernel oops/panic/warning in the guest:"
  grep -aE "^\[ *[0-9.]+\] $SPLAT" "$CONSOLE" | head -n 5 | sed 's/^/vm:   /'
  extra=$((extra + 1))
fi
# The kernel that booted must be the one this suite resolved to (never a stale cache's).
BOOTED=$(grep -a '^VM_INIT uptime' "$CONSOLE" | head -n1 | sed -n 's/.*kernel=\([^ ]*\).*/\1/p')
if [ "$BOOTED" = "$KV" ]; then
  echo "vm: booted kernel $KV (suite $SUITE)"
else
  echo "vm: the guest booted kernel '$BOOTED', not $KV of suite $SUITE"
  extra=$((extra + 1))
fi
if verdict "$CONSOLE" "$extra"; then
  # A results dir we made ourselves is only worth keeping when something failed.
  [ -z "${VM_KEEP:-}" ] && [ "$RESULTS_OWNED" = 1 ] && rm -rf "$VM_RESULTS"
  exit 0
fi
exit 1
