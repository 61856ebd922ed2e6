#!/usr/bin/env bash
# tests/vm/pair.sh — two hapaird daemons fencing each other with SCSI-3 persistent
# reservations on real (LIO) SCSI devices in the nested VM: tests/vm/run.sh's setup with four
# LUNs seen by two initiators, running tests/vm/pair-guest.sh. Same options and environment as
# run.sh (HAPAIR_VM_FENCE defaults to preempt: PREEMPT AND ABORT deadlocks LIO behind tcm_loop).
exec env HAPAIR_VM_SCENARIO=pair HAPAIR_VM_TIMEOUT_S=${HAPAIR_VM_TIMEOUT_S:-300} \
    "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
