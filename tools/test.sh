#!/usr/bin/env bash
# The test command from README: installs what the tests need, then runs every test.
# Privileged tests (loop devices, network namespaces, the nested VM) need root; they fail loudly
# without it rather than skip.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-test-deps.sh
export RUST_BACKTRACE=1
cargo build --all-targets   # the benches must keep compiling; they are run by hand (bench/)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
rc=0
cargo test --lib --bins --tests --no-fail-fast -- --test-threads=2 2>&1 | tee "$out" || rc=$?
passed=$(grep -E '^test result:' "$out" | awk '{s += $4} END {print s + 0}')
failed=$(grep -E '^test result:' "$out" | awk '{s += $6} END {print s + 0}')
if [ "$rc" -ne 0 ]; then
  echo "tests: $passed passed, $failed failed"
  exit "$rc"
fi
# Real SCSI-3 persistent reservations: a nested VM with LIO over iSCSI, fencing with PREEMPT AND
# ABORT (tests/vm/run.sh says what it does; about 10 s of VM time).
vm_passed=0
vm_failed=0
if tests/vm/run.sh; then vm_passed=$((vm_passed + 1)); else vm_failed=$((vm_failed + 1)); fi
# The same scenario over LIO's loopback fabric (tcm_loop), fencing with PREEMPT: tcm_loop
# deadlocks LIO on PREEMPT AND ABORT (tests/vm/README.md). About 10 s of VM time.
if HAPAIR_VM_FABRIC=loop tests/vm/run.sh; then vm_passed=$((vm_passed + 1)); else vm_failed=$((vm_failed + 1)); fi
# Two hapaird daemons fencing with PR on four LUNs in the same VM (70-150 s under TCG, depending on the load).
if tests/vm/pair.sh; then vm_passed=$((vm_passed + 1)); else vm_failed=$((vm_failed + 1)); fi
# The Linux kernel's own NBD client (nbd.ko via nbd-client) on one hapaird's export in the same
# VM, no SCSI: raw I/O, ext4 across a restart and a SIGKILL, fio verify (50-110 s under TCG, depending on the load).
if tests/vm/knbd.sh; then vm_passed=$((vm_passed + 1)); else vm_failed=$((vm_failed + 1)); fi
echo "tests: $((passed + vm_passed)) passed, $((failed + vm_failed)) failed"
[ "$vm_failed" -eq 0 ]
