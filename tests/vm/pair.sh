#!/usr/bin/env bash
# tests/vm/pair.sh — two hapaird daemons fencing each other with SCSI-3 persistent
# reservations on real (LIO) SCSI devices in the nested VM: tests/vm/run.sh's setup with four
# LUNs seen by two initiators, running tests/vm/pair-guest.sh. Same options and environment as
# run.sh: by default LIO over iSCSI, fencing with PREEMPT AND ABORT; HAPAIR_VM_FABRIC=loop uses
# tcm_loop and fences with PREEMPT (PREEMPT AND ABORT deadlocks LIO behind tcm_loop).
# About 70 s of VM time under TCG on an idle host, up to 2.5 min on a busy one.
exec env HAPAIR_VM_SCENARIO=pair HAPAIR_VM_TIMEOUT_S=${HAPAIR_VM_TIMEOUT_S:-300} \
    "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
