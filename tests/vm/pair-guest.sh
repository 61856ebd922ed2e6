#!/bin/bash
# tests/vm/pair-guest.sh BINDIR FENCE — runs INSIDE the VM (chroot of the host's /), started by
# tests/vm/run.sh with HAPAIR_VM_SCENARIO=pair (see tests/vm/pair.sh).
#
# Two hapaird daemons, node a on initiator 1 (/dev/hapair/h1-lun*) and node b on initiator 2
# (/dev/hapair/h2-lun*), over four LIO LUNs: aggr-a = lun0 (data) + lun1 (parity), home a;
# aggr-b = lun2 + lun3, home b. Interconnect and service addresses on lo, NVRAM in the scratch
# tmpfs (third argument). Shows and checks: both serve with SCSI-3 PR fencing; sg_persist sees both keys on
# every LUN and each home node holding its own; a graceful takeover moves b's reservation to a
# and b's own path then refuses writes (reservation conflict); giveback restores it; data
# written through the export before, during and after reads back. Exit 0 only if all held.
set -uo pipefail
BINDIR=$1
FENCE=${2:-preempt}
HAPAIRD=$BINDIR/hapaird
W=${3:-/tmp}/pair
mkdir -p $W
PIDS=()
fail() {
    echo "FAIL: $*"
    for n in a b; do
        echo "---- $n.log (last 40 lines)"
        tail -n 40 $W/$n.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'
    done
    stop_all
    exit 1
}
ok() { echo "   ok: $*"; }
step() { echo; echo "== $*"; }
stop_all() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    PIDS=()
}

KA=0x6861706169720061 # node_key("a"): "hapair\0a"
KB=0x6861706169720062 # node_key("b")
dev() { echo /dev/hapair/h$1-lun$2; } # dev HOST LUN (host 1 = node a, 2 = node b)

# ---- configs ---------------------------------------------------------------------------------
echo "pair-vm-test-key-0123456789abcdef" > $W/ic.key
for node in a b; do
    partner=$([ $node = a ] && echo b || echo a)
    h=$([ $node = a ] && echo 1 || echo 2)
    cat > $W/$node.toml <<EOF
node = "$node"
[io]
workers = 2
arena_mib = 16
[pair]
partner = "$partner"
interconnect_listen = "127.0.0.1:7700"
partner_interconnect = ["127.0.0.1:7700"]
key_file = "$W/ic.key"
control_socket = "$W/$node.sock"
heartbeat_ms = 200
interconnect_timeout_ms = 3000
mailbox_timeout_ms = 6000
countdown_ms = 30000
holddown_ms = 1000
fence_preempt = "$FENCE"
EOF
    for owner in a b; do
        l0=$([ $owner = a ] && echo 0 || echo 2)
        port=$([ $owner = a ] && echo 10809 || echo 10810)
        ip=$([ $owner = a ] && echo 127.0.9.10 || echo 127.0.9.11)
        log=$([ $owner = $node ] && echo log || echo mirror)
        cat >> $W/$node.toml <<EOF
[[aggregate]]
name = "aggr-$owner"
home = "$owner"
data = ["$(dev $h $l0)"]
parity = "$(dev $h $((l0 + 1)))"
chunk_kib = 64
nvram = "$W/$node-aggr-$owner.$log"
nvram_mib = 8
cp_interval_ms = 300
[[export]]
name = "aggr-$owner"
aggregate = "aggr-$owner"
listen = "$ip:$port"
service_addrs = ["$ip/32"]
service_interface = "lo"
EOF
    done
done

# ---- helpers ---------------------------------------------------------------------------------
# ctl NODE JSON: one JSON line to the control socket, the reply line on stdout.
ctl() {
    python3 - "$W/$1.sock" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(120)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    c = s.recv(65536)
    if not c:
        break
    buf += c
print(buf.decode().strip())
PY
}
status() { ctl $1 '{"v":1,"cmd":"status"}'; }
state() { status $1 | jq -r '.status.nodes[] | select(.local) | .state'; }
wait_state() { # NODE STATE SECS
    local end=$((SECONDS + $3)) s=""
    while [ $SECONDS -lt $end ]; do
        s=$(state $1 2>/dev/null)
        [ "$s" = "$2" ] && { ok "node $1 is $2"; return 0; }
        sleep 0.5
    done
    fail "node $1 is '$s', not $2, after $3 s"
}
# keys HOST LUN: registered keys (sorted) through that host's path.
# sg_persist retried through unit attentions (LUN inventory changes, preempts, releases).
sgp() {
    local i out
    for i in 1 2 3 4 5; do
        out=$(sg_persist -n -i "$@" 2>&1) && { echo "$out"; return 0; }
        echo "$out" | grep -qi "unit attention" || break
    done
    echo "$out" >&2
    return 1
}
keys() { sgp -k -d "$(dev $1 $2)" | grep -E '^ +0x[0-9a-f]+$' | tr -d ' ' | sort | tr '\n' ' ' | sed 's/ $//'; }
holder() { sgp -r -d "$(dev $1 $2)" | grep -o 'Key=0x[0-9a-f]*' | cut -d= -f2; }
rtype() { sgp -r -d "$(dev $1 $2)" | grep -o 'type: .*' ; }
expect_pr() { # LUN WANT_KEYS WANT_HOLDER
    local k r
    k=$(keys 1 $1) || fail "sg_persist -k on $(dev 1 $1)"
    r=$(holder 1 $1)
    [ "$k" = "$2" ] || fail "LUN $1: keys '$k', want '$2'"
    [ "$r" = "$3" ] || fail "LUN $1: holder '$r', want '$3'"
    ok "LUN $1: keys $k, reserved by $r ($(rtype 1 $1))"
}
# nbd_write EXPORT_IP PORT EXPORT PATTERN OFFSET, nbd_read ... (qemu-io checks the pattern)
nbd() {
    qemu-io --image-opts "driver=nbd,server.type=inet,server.host=$1,server.port=$2,export=$3" -c "$4" 2>&1
}
nbd_write() {
    local out
    out=$(nbd $1 $2 $3 "write -P $4 $5 1M") || fail "write pattern $4 at $5 to $3: $out"
    echo "$out" | grep -q "wrote 1048576" || fail "write to $3: $out"
    ok "wrote 1 MiB of pattern $4 at $5 through export $3 ($1:$2)"
}
nbd_read() {
    local out
    out=$(nbd $1 $2 $3 "read -P $4 $5 1M") || fail "read pattern $4 at $5 from $3: $out"
    echo "$out" | grep -q "read 1048576" || fail "read back from $3: $out"
    ok "read back 1 MiB of pattern $4 at $5 through export $3: content verified"
}
# raw_rewrite HOST LUN: read block 4096 of the LUN through that host's path and write the same
# bytes back with O_DIRECT (harmless if it is accepted). Prints dd's error on refusal.
raw_rewrite() {
    local d
    d=$(dev $1 $2)
    dd if=$d of=$W/blk bs=4096 skip=4096 count=1 iflag=direct status=none || return 2
    dd if=$W/blk of=$d bs=4096 seek=4096 count=1 oflag=direct conv=notrunc status=none 2>&1
}

# ---- the scenario ----------------------------------------------------------------------------
step "format both aggregates (no reservations yet)"
for i in 0 1 2 3; do
    k=$(keys 1 $i)
    [ -z "$k" ] || fail "LUN $i already has keys: $k"
done
$HAPAIRD format --config $W/a.toml > $W/format.log 2>&1 || { cat $W/format.log; fail "hapaird format"; }
ok "formatted aggr-a (LUN 0+1) and aggr-b (LUN 2+3)"

step "start hapaird a and b"
for n in a b; do
    RUST_LOG=info $HAPAIRD run --config $W/$n.toml > $W/$n.log 2>&1 &
    PIDS+=($!)
done
wait_state a Normal 120
wait_state b Normal 120
for n in a b; do
    f=$(status $n | jq -r '.status.extra.fencing')
    echo "   node $n status: fencing: $f"
    case "$f" in "SCSI-3 PR (Write Exclusive) on 4 members"*) ;; *) fail "node $n fencing is '$f'" ;; esac
    grep -m1 "fencing: SCSI-3 PR" $W/$n.log | sed 's/\x1b\[[0-9;]*m//g; s/^/   log: /'
done
grep -q "fencing: SCSI-3 PR (Write Exclusive) on 4 members" $W/a.log || fail "startup log of a does not say PR"
for n in a b; do
    end=$((SECONDS + 60))
    # The partner Normal too: what a booting partner says of its log holds only until it
    # opens the log and copies it to us in a new session.
    until [ "$(status $n | jq -r '[.status.mirror.partner_log_mirrored, (.status.nodes[] | select(.local == false) | .state)] | @tsv')" = "$(printf 'true\tNormal')" ]; do
        [ $SECONDS -lt $end ] || fail "node $n: partner log not mirrored after 60 s"
        sleep 0.5
    done
done
ok "both nodes hold a current mirror of the partner's log"

step "sg_persist: both keys on every LUN; a holds aggr-a's LUNs, b holds aggr-b's"
for i in 0 1; do expect_pr $i "$KA $KB" $KA; done
for i in 2 3; do expect_pr $i "$KA $KB" $KB; done
sgp -s -d "$(dev 1 2)" | sed 's/^/   | /'

step "both serve: write through each export"
nbd_write 127.0.9.10 10809 aggr-a 0x11 0
nbd_write 127.0.9.11 10810 aggr-b 0x22 0
nbd_read 127.0.9.11 10810 aggr-b 0x22 0
out=$(raw_rewrite 1 2) && fail "node a's path wrote LUN 2 (held by b): $out"
ok "node a's own path to aggr-b's LUN 2 refuses a write: ${out:-?}"

step "graceful takeover of b by a (control socket)"
r=$(ctl a '{"v":1,"cmd":"takeover","of":"b","countdown_ms":30000}')
echo "   reply: $(echo "$r" | jq -c '{outcome: .outcome.result, kind: .outcome.report.kind, total_ms: .outcome.report.total_ms, phases: [.outcome.report.phases[]? | "\(.step)=\(.elapsed_ms)ms"]}' 2>/dev/null || echo "$r")"
echo "$r" | grep -q '"completed"' || fail "takeover did not complete: $r"
wait_state b TakenOver 60
wait_state a InTakeover 60

step "sg_persist after takeover: b's key preempted on aggr-b's LUNs, a holds all four"
for i in 0 1 2 3; do
    if [ $i -lt 2 ]; then expect_pr $i "$KA $KB" $KA; else expect_pr $i "$KA" $KA; fi
done
out=$(raw_rewrite 2 2)
rc=$?
[ $rc = 2 ] && fail "node b cannot even read LUN 2"
[ $rc = 0 ] && fail "node b's own path wrote LUN 2 after the takeover: NOT FENCED"
echo "$out" | grep -qi "invalid exchange" || fail "b's write failed, but not with a reservation conflict (EBADE): $out"
ok "node b's own path to its LUN 2 refuses writes: $out (EBADE = reservation conflict)"
nbd_read 127.0.9.11 10810 aggr-b 0x22 0
nbd_write 127.0.9.11 10810 aggr-b 0x33 1048576
nbd_read 127.0.9.11 10810 aggr-b 0x33 1048576

step "giveback (control socket at a)"
r=$(ctl a '{"v":1,"cmd":"giveback"}')
echo "   reply: $(echo "$r" | jq -c '{outcome: .outcome.result, total_ms: .outcome.report.total_ms}' 2>/dev/null || echo "$r")"
echo "$r" | grep -q '"completed"' || fail "giveback did not complete: $r"
wait_state b Normal 60
wait_state a Normal 60

step "sg_persist after giveback: as at the start"
for i in 0 1; do expect_pr $i "$KA $KB" $KA; done
for i in 2 3; do expect_pr $i "$KA $KB" $KB; done
out=$(raw_rewrite 1 2) && fail "node a's path wrote LUN 2 after giveback: $out"
ok "node a's path to LUN 2 refuses writes again: $out"

step "data written before, during and after the takeover reads back"
nbd_write 127.0.9.11 10810 aggr-b 0x44 2097152
nbd_read 127.0.9.11 10810 aggr-b 0x22 0
nbd_read 127.0.9.11 10810 aggr-b 0x33 1048576
nbd_read 127.0.9.11 10810 aggr-b 0x44 2097152
nbd_read 127.0.9.10 10809 aggr-a 0x11 0

step "stop both daemons"
stop_all
for n in a b; do
    grep -c "step failed" $W/$n.log | xargs -I{} echo "   node $n: {} failed steps logged"
    # Unit attentions after the preempts and releases are retried through (src/daemon/fence.rs).
    echo "   node $n: $(grep -c "unit attention" "$W/$n.log") unit attentions retried through"
    grep "unit attention" "$W/$n.log" | head -n 3 | sed 's/\x1b\[[0-9;]*m//g; s/^/   log: /'
done
echo
echo "PASS: PR fencing by two hapaird daemons on real SCSI devices"
exit 0
