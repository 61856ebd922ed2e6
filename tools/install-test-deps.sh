#!/usr/bin/env bash
# Install the system packages the tests and benchmarks drive (real clients, real devices).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "install-test-deps: needs root (apt-get, loop devices, namespaces)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# open-iscsi (iscsid, iscsiadm) and nbd-client are only run inside the nested VM (tests/vm/run.sh,
# tests/vm/knbd.sh), never on this host: their packaged services must not start here (nbd-client's
# is an init script registered with update-rc.d; its systemd unit is masked). Containers usually
# carry a policy-rc.d that refuses service starts; where there is none, one is put in place for
# this install only.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# tools/install-test-deps.sh: no service starts during the install\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  trap 'rm -f "$POLICY"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  fio libnbd-bin nbdkit qemu-utils sg3-utils iproute2 util-linux e2fsprogs kmod \
  qemu-system-x86 busybox-static cpio xz-utils zstd systemd open-iscsi nbd-client jq \
  >/dev/null
for t in fio nbdinfo nbdcopy nbdkit qemu-img qemu-io losetup sg_persist ip mkfs.ext4 systemd-analyze \
  iscsiadm iscsid nbd-client jq; do
  command -v "$t" >/dev/null || { echo "install-test-deps: $t missing after install" >&2; exit 1; }
done
echo "install-test-deps: ok"
