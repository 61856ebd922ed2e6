#!/usr/bin/env bash
# tests/vm/knbd.sh — the Linux kernel's own NBD client (nbd.ko, configured through Debian's
# nbd-client) against hapaird's NBD export, in tests/vm/run.sh's nested VM, without any SCSI:
# one hapaird serving a 4+1 RAID-4 aggregate of file-backed members (tmpfs in the guest),
# raw O_DIRECT I/O, ext4 across a graceful daemon restart and a SIGKILL (NVRAM log replay),
# fio with crc32c verify. Runs tests/vm/knbd-guest.sh in the guest. Same environment as run.sh
# (HAPAIR_VM_KEEP, HAPAIR_VM_DEBUG, HAPAIR_VM_TIMEOUT_S, ...; the fabric options do not apply).
exec env HAPAIR_VM_SCENARIO=knbd HAPAIR_VM_TIMEOUT_S=${HAPAIR_VM_TIMEOUT_S:-300} \
    "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
