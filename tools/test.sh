#!/usr/bin/env bash
# The test command from README: installs what the tests need, then runs every test.
# Privileged tests (loop devices, network namespaces, the nested VM) need root; they fail loudly
# without it rather than skip.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-test-deps.sh
export RUST_BACKTRACE=1
cargo build --all-targets   # the benches must keep compiling; they are run by hand (bench/)
cargo test --lib --bins --tests --no-fail-fast -- --test-threads=2
# Real SCSI-3 persistent reservations: a nested VM with LIO (tests/vm/run.sh says what it does).
tests/vm/run.sh
# Two hapaird daemons fencing with PR on four LUNs in the same VM (about 2.5 min under TCG).
tests/vm/pair.sh
echo "tools/test.sh: all tests passed"
