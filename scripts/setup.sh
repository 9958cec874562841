#!/usr/bin/env bash
# Installs every host package the project's build, tests and benchmarks use, then builds.
# Idempotent: apt runs only when something is missing.
set -euo pipefail

# qemu-utils: a fresh machine may carry 10.0 from backports, which conflicts with bookworm's
# qemu-system-x86 7.2; asking for the bookworm versions (with --allow-downgrades) resolves it.
PKGS=(qemu-system-x86 qemu-utils qemu-block-extra nbdkit libnbd-bin fio libclang-dev clang
      e2fsprogs xfsprogs busybox-static dmsetup zstd xz-utils cpio kmod bc tgt libiscsi-bin
      libiscsi-dev util-linux lvm2 thin-provisioning-tools iproute2 nftables
      ceph-mon ceph-osd ceph-common librados-dev librbd-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# qemu-system-x86 without a matching qemu-utils leaves qemu-img/qemu-nbd/qemu-io missing.
for t in qemu-img qemu-nbd qemu-io qemu-storage-daemon qemu-system-x86_64; do
  command -v "$t" >/dev/null 2>&1 || missing+=("(tool $t)")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing packages (missing: ${missing[*]})"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --allow-downgrades \
    qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm \
    nbdkit libnbd-bin fio libclang-dev clang e2fsprogs xfsprogs busybox-static dmsetup zstd \
    xz-utils cpio kmod bc tgt libiscsi-bin libiscsi-dev util-linux lvm2 thin-provisioning-tools \
    iproute2 nftables ceph-mon ceph-osd ceph-common librados-dev librbd-dev
fi
for t in qemu-img qemu-nbd qemu-io qemu-storage-daemon qemu-system-x86_64 nbdkit nbdinfo nbdcopy fio; do
  command -v "$t" >/dev/null 2>&1 || { echo "setup: FAILED: $t is still missing" >&2; exit 1; }
done
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
cargo build --workspace --all-targets
