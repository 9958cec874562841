# daemon-lib.sh - helpers for the guest scripts that drive the real `volmgr daemon` (source it
# after lib.sh). Needs VOLMGR (the binary) and VOLMGR_STATE_DIR (exported: every volmgr verb
# reads it).

# vm DEV-ARGS...: `volmgr dev ...` against our daemon.
vm() { "$VOLMGR" dev "$@"; }

# daemon_start LOGFILE: starts `volmgr daemon` in the background (DPID) and waits until its
# control socket answers. Returns 1 if it died or never became ready.
daemon_start() {
  local log=$1
  rm -f "$VOLMGR_STATE_DIR/control.sock"
  "$VOLMGR" daemon --state-dir "$VOLMGR_STATE_DIR" >>"$log" 2>&1 &
  DPID=$!
  for _ in $(seq 1 600); do
    if [ -S "$VOLMGR_STATE_DIR/control.sock" ] && vm list >/dev/null 2>&1; then return 0; fi
    kill -0 $DPID 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}


# dev_path NAME: the device's /dev/ublkbN from `dev list --json`.
dev_path() { vm list --json | jq -r --arg n "$1" '.[] | select(.name == $n) | .path'; }

# make_tree DIR SUMS: writes a small tree of random files and records their checksums.
make_tree() {
  local d=$1 sums=$2 i j
  for i in 1 2 3; do
    mkdir -p "$d/dir$i/sub"
    for j in 1 2 3 4; do
      head -c $(( (i * 37 + j * 101) * 1024 )) /dev/urandom > "$d/dir$i/f$j"
      head -c $(( j * 3000 + 17 )) /dev/urandom > "$d/dir$i/sub/g$j"
    done
  done
  head -c 8M /dev/urandom > "$d/big"
  (cd "$d" && find . -type f | sort | xargs sha256sum) > "$sums"
}

# fs_roundtrip PREFIX DEV MNT: mkfs.ext4, mount, file tree, umount, e2fsck -fn, remount and
# verify; one check per step. Leaves the device unmounted.
fs_roundtrip() {
  local p=$1 dev=$2 m=$3 sums=/tmp/$1.sums
  mkdir -p "$m"
  check "$p-mkfs-ext4" mkfs.ext4 -F -q "$dev" || return 1
  check "$p-mount" mount -t ext4 "$dev" "$m" || return 1
  check "$p-write-tree" make_tree "$m" "$sums"
  check "$p-umount" umount "$m" || return 1
  check "$p-e2fsck-clean" e2fsck_clean "$dev"
  echo 3 > /proc/sys/vm/drop_caches
  if check "$p-remount" mount -t ext4 -o ro "$dev" "$m"; then
    check "$p-verify-tree" bash -c "cd $m && sha256sum --quiet -c $sums"
    umount "$m"
  fi
}

# stuck_report PID LOG: what a process that does not exit is doing (threads' kernel stacks),
# and the tail of its log.
stuck_report() {
  local t
  for t in /proc/$1/task/*; do
    echo "  thread $(basename $t) $(cat $t/comm 2>/dev/null): wchan $(cat $t/wchan 2>/dev/null)"
    sed 's/^/      /' $t/stack 2>/dev/null | head -n 12
  done
  tail -n 20 "$2" | sed 's/^/  daemon: /'
  grep -H . /sys/block/ublkb*/inflight 2>/dev/null | sed 's/^/  /'
}
