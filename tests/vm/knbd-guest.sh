#!/bin/bash
# tests/vm/knbd-guest.sh BINDIR SCRATCH — runs INSIDE the VM (chroot of the host's /), started by
# tests/vm/run.sh with HAPAIR_VM_SCENARIO=knbd (see tests/vm/knbd.sh).
#
# The Linux kernel's own NBD client (nbd.ko, configured by Debian's nbd-client over netlink)
# against one hapaird node: a 4+1 RAID-4 aggregate of five 64 MiB files in the scratch tmpfs,
# NVRAM log there too, export aggr0 on 127.0.0.1:10809. Shows and checks:
#   - /dev/nbd0's size equals the aggregate's size (hapaird's log) and what the export
#     advertises (nbdinfo); logical block size 4096, volatile write cache (FLUSH) advertised;
#   - O_DIRECT writes of random data at several offsets (stripe-aligned and not; 4 KiB to 1 MiB
#     per write, and one 8 MiB write with the queue's max_sectors_kb raised to its 32 MiB
#     hardware limit: the kernel never learns the server's maximum request, which hapaird
#     then serves in pieces) read back identical;
#   - ext4 on /dev/nbd0: files written, fsync'd, synced (syncfs,
#     which reports writeback errors), unmounted; the device disconnected
#     (nbd-client -d); hapaird stopped gracefully (SIGTERM) and started again; reconnected with
#     two connections (-C 2, NBD_FLAG_CAN_MULTI_CONN); e2fsck clean; every file and raw region
#     reads back identical;
#   - fio (libaio, O_DIRECT, iodepth 8, 4k/64k/1m random writes, crc32c verify) on raw regions;
#   - data written and flushed (fsync) just before hapaird is killed with SIGKILL (no final
#     consistency point) is recovered by the NVRAM log replay at the next start;
#   - reconnected with block size 512: sub-4 KiB O_DIRECT writes at 512-byte offsets (served
#     by hapaird as read-modify-writes of the covering 4 KiB blocks) read back as written.
# Exit 0 only if all held; on failure, hapaird's log and the kernel's log (dmesg) are shown.
set -uo pipefail
BINDIR=$1
HAPAIRD=$BINDIR/hapaird
W=${2:-/tmp}/knbd
PORT=10809
NAME=aggr0
DEV=/dev/nbd0
NBDDEV=${DEV#/dev/}
MNT=$W/mnt
MIB=$((1 << 20))
mkdir -p "$W" "$MNT"
cd "$W" || exit 1
HPID=""
MOUNTED=0
T0=$SECONDS

say() { echo "$*"; }
ok() { echo "   ok: $*"; }
step() { echo; echo "== [$((SECONDS - T0))s] $*"; }
nocolor() { sed 's/\x1b\[[0-9;]*m//g'; }
cleanup() {
    [ $MOUNTED = 1 ] && { umount -n "$MNT" 2>/dev/null; MOUNTED=0; }
    nbd-client -c $DEV >/dev/null 2>&1 && nbd-client -d $DEV >/dev/null 2>&1
    if [ -n "$HPID" ]; then
        kill -TERM "$HPID" 2>/dev/null
        wait "$HPID" 2>/dev/null
        HPID=""
    fi
}
fail() {
    echo
    echo "FAIL: $*"
    echo "---- hapaird.log (last 60 lines)"
    tail -n 60 "$W/hapaird.log" 2>/dev/null | nocolor
    echo "---- dmesg (last 40 lines)"
    dmesg 2>/dev/null | tail -n 40
    cleanup
    exit 1
}
trap 'fail "interrupted"' INT TERM

for t in nbd-client nbdinfo mkfs.ext4 e2fsck blockdev sha256sum dd ss jq; do
    command -v $t >/dev/null || fail "$t not found in the chroot"
done
[ -x "$HAPAIRD" ] || fail "$HAPAIRD missing"
[ -b $DEV ] || fail "$DEV is not a block device (nbd module not loaded?)"

# ---- hapaird ---------------------------------------------------------------------------------
members=()
for i in 0 1 2 3 4; do
    truncate -s 64M "$W/m$i.img" || fail "create member file m$i.img"
    members+=("\"$W/m$i.img\"")
done
cat > "$W/k.toml" <<EOF
node = "k"
[io]
workers = 4
arena_mib = 16
[[aggregate]]
name = "$NAME"
home = "k"
data = [${members[0]}, ${members[1]}, ${members[2]}, ${members[3]}]
parity = ${members[4]}
chunk_kib = 64
nvram = "$W/$NAME.nvlog"
nvram_mib = 16
cp_interval_ms = 60000
[[export]]
name = "$NAME"
aggregate = "$NAME"
listen = "127.0.0.1:$PORT"
EOF

NSTART=0
start_hapaird() {
    NSTART=$((NSTART + 1))
    echo "---- start $NSTART" >> "$W/hapaird.log"
    RUST_LOG=info "$HAPAIRD" run --config "$W/k.toml" >> "$W/hapaird.log" 2>&1 &
    HPID=$!
    local end=$((SECONDS + 60))
    until [ "$(grep -c 'serving' "$W/hapaird.log")" -ge $NSTART ]; do
        kill -0 $HPID 2>/dev/null || { HPID=""; fail "hapaird exited at start"; }
        [ $SECONDS -lt $end ] || fail "hapaird not serving after 60 s"
        sleep 0.2
    done
    ok "hapaird running (pid $HPID), serving nbd://127.0.0.1:$PORT/$NAME"
}
# The last start's replay summary.
replay_line() { nocolor < "$W/hapaird.log" | grep 'replay:' | tail -n 1 | sed 's/.*replay: //'; }
stop_hapaird() { # SIGNAL: its exit status in RC
    kill -"$1" "$HPID" || fail "kill -$1 hapaird"
    { wait "$HPID"; } 2>/dev/null # no "Killed" notice from bash
    RC=$?
    HPID=""
}

# ---- the kernel client -----------------------------------------------------------------------
connect() { # CONNECTIONS [BLOCK_SIZE, default 4096]
    local out bs=${2:-4096}
    out=$(nbd-client 127.0.0.1 $PORT $DEV -N $NAME -b "$bs" -C "$1" 2>&1) ||
        fail "nbd-client 127.0.0.1 $PORT $DEV -N $NAME -b $bs -C $1: $out"
    echo "$out" | sed 's/^/   nbd-client: /'
    local end=$((SECONDS + 20))
    until [ "$(cat /sys/block/$NBDDEV/size)" != 0 ]; do
        [ $SECONDS -lt $end ] || fail "$DEV still has size 0 after nbd-client connected"
        sleep 0.1
    done
    nbd-client -c $DEV >/dev/null || fail "nbd-client -c $DEV: not connected"
    ok "$DEV connected with $1 connection(s), block size $bs"
}
disconnect() {
    local out
    out=$(nbd-client -d $DEV 2>&1) || fail "nbd-client -d $DEV: $out"
    local end=$((SECONDS + 20))
    while nbd-client -c $DEV >/dev/null 2>&1 || [ "$(cat /sys/block/$NBDDEV/size)" != 0 ]; do
        [ $SECONDS -lt $end ] || fail "$DEV still connected 20 s after nbd-client -d"
        sleep 0.1
    done
    ok "$DEV disconnected (nbd-client -d)"
}
check_device() { # CONNECTIONS [BLOCK_SIZE, default 4096]
    local sectors bytes lbs wc conns bs=${2:-4096}
    sectors=$(cat /sys/block/$NBDDEV/size)
    bytes=$(blockdev --getsize64 $DEV) || fail "blockdev --getsize64 $DEV"
    [ "$bytes" = $((sectors * 512)) ] || fail "blockdev says $bytes bytes, sysfs $sectors sectors"
    [ "$bytes" = "$SIZE" ] || fail "$DEV has $bytes bytes, the export has $SIZE"
    lbs=$(blockdev --getss $DEV)
    [ "$lbs" = "$bs" ] || fail "$DEV logical block size $lbs, not $bs"
    wc=$(cat /sys/block/$NBDDEV/queue/write_cache)
    [ "$wc" = "write back" ] || fail "$DEV write_cache '$wc': the kernel will not send FLUSH"
    # The kernel's sockets to the export (ss shows them with no process).
    conns=$(ss -Htn state established dst 127.0.0.1:$PORT | wc -l)
    [ "$conns" = "$1" ] || fail "$conns TCP connections to the export, want $1"
    ok "$DEV: $bytes bytes (= export size), logical block $lbs, write cache '$wc'," \
        "discard max $(cat /sys/block/$NBDDEV/queue/discard_max_bytes)," \
        "write zeroes max $(cat /sys/block/$NBDDEV/queue/write_zeroes_max_bytes)," \
        "max request $(cat /sys/block/$NBDDEV/queue/max_sectors_kb) KiB, $conns TCP connection(s)"
}

# ---- raw regions (behind the filesystem) -----------------------------------------------------
# FS_MIB of ext4 at the start; raw regions after it: offset MiB, length MiB, KiB into the MiB,
# dd's block size in KiB (one request each: O_DIRECT). Stripes are 256 KiB.
FS_MIB=128
RAW=("132 1 4 4" "145 2 0 64" "150 1 256 1024" "216 8 0 8192")
raw_write() { # I: random data into region I, checksum kept
    local off len k bs
    read -r off len k bs <<< "${RAW[$1]}"
    head -c $((len * MIB)) /dev/urandom > "$W/raw$1.bin" || fail "random data"
    dd if="$W/raw$1.bin" of=$DEV bs=$((bs * 1024)) seek=$((off * MIB + k * 1024)) \
        oflag=direct,seek_bytes conv=notrunc status=none 2>&1 ||
        fail "dd oflag=direct bs=${bs}k write of region $1"
    sha256sum < "$W/raw$1.bin" | cut -d' ' -f1 > "$W/raw$1.sum"
    rm -f "$W/raw$1.bin"
    ok "wrote ${len} MiB of random data at ${off} MiB + ${k} KiB, O_DIRECT, ${bs} KiB per write"
}
raw_verify() { # I WHEN
    local off len k bs got
    read -r off len k bs <<< "${RAW[$1]}"
    got=$(dd if=$DEV bs=256k skip=$((off * MIB + k * 1024)) count=$((len * MIB)) \
        iflag=direct,skip_bytes,count_bytes status=none | sha256sum | cut -d' ' -f1)
    [ "$got" = "$(cat "$W/raw$1.sum")" ] ||
        fail "region $1 (${len} MiB at ${off} MiB + ${k} KiB) differs $2"
    ok "${len} MiB at ${off} MiB + ${k} KiB reads back identical $2 (O_DIRECT)"
}

# ---- files on ext4 ---------------------------------------------------------------------------
mount_fs() {
    mount -n -t ext4 $DEV "$MNT" || fail "mount ext4 from $DEV"
    MOUNTED=1
}
umount_fs() {
    umount -n "$MNT" || fail "umount $MNT"
    MOUNTED=0
}
FILES="a.bin:1 b.bin:3 c.bin:8 dir/d.bin:2" # name:MiB
write_files() {
    local f name mib
    mkdir -p "$MNT/dir"
    for f in $FILES; do
        name=${f%%:*}
        mib=${f##*:}
        head -c $((mib * MIB)) /dev/urandom > "$MNT/$name" || fail "write $name"
    done
    # One written with fsync (FLUSH from the filesystem's journal commit), the rest by sync.
    dd if=/dev/urandom of="$MNT/e.bin" bs=64k count=16 conv=fsync status=none || fail "dd conv=fsync e.bin"
    (cd "$MNT" && find . -type f -name '*.bin' | sort | xargs sha256sum) > "$W/files.sum" ||
        fail "checksum the files"
    # syncfs (sync -f) reports writeback errors; plain sync(2) does not.
    sync -f "$MNT" || fail "sync -f $MNT: writeback failed"
    ok "$(wc -l < "$W/files.sum") files ($(du -sh "$MNT" | cut -f1)) written on ext4, fsync'd and synced"
}
verify_files() { # WHEN
    local out
    out=$(cd "$MNT" && sha256sum -c --quiet "$W/files.sum" 2>&1) || fail "files differ $1: $out"
    ok "$(wc -l < "$W/files.sum") files read back identical $1"
}

# ---- the scenario ----------------------------------------------------------------------------
step "versions"
say "   kernel $(uname -r), $(nbd-client -V 2>&1 | head -n1), $(fio --version 2>/dev/null || echo 'no fio')"

step "format and start hapaird: 4+1 RAID-4 over five 64 MiB files, NVRAM log in the scratch tmpfs"
"$HAPAIRD" format --config "$W/k.toml" > "$W/format.log" 2>&1 || { cat "$W/format.log"; fail "hapaird format"; }
sed 's/^/   /' "$W/format.log" | nocolor | grep -v '^ *$' | tail -n 2
start_hapaird
SIZE=$(nocolor < "$W/hapaird.log" | grep -m1 'aggregate assembled' | grep -o 'size_bytes=[0-9]*' | cut -d= -f2)
[ -n "$SIZE" ] || fail "no size_bytes in hapaird's 'aggregate assembled' log line"
adv=$(nbdinfo --size "nbd://127.0.0.1:$PORT/$NAME" 2>&1) || fail "nbdinfo --size: $adv"
[ "$adv" = "$SIZE" ] || fail "export advertises $adv bytes, hapaird's log says $SIZE"
ok "aggregate size $SIZE bytes ($((SIZE / MIB)) MiB) in hapaird's log, advertised by the export (nbdinfo)"
say "   replay: $(replay_line)"

step "connect the kernel client (nbd-client, netlink, block size 4096)"
connect 1
check_device 1

step "O_DIRECT writes of random data at several offsets, read back"
for i in 0 1 2; do raw_write $i; done
# The kernel does not know the server's maximum request (nbd-client asks for no block sizes):
# let it send requests as large as it can (32 MiB) and write 8 MiB in one.
q=/sys/block/$NBDDEV/queue
msk=$(cat $q/max_sectors_kb)
cat $q/max_hw_sectors_kb > $q/max_sectors_kb || fail "raise $q/max_sectors_kb"
say "   max_sectors_kb $msk -> $(cat $q/max_sectors_kb) (max_hw_sectors_kb)"
raw_write 3
echo "$msk" > $q/max_sectors_kb || fail "restore $q/max_sectors_kb"
for i in 0 1 2 3; do raw_verify $i "after writing"; done

step "ext4 on the first $FS_MIB MiB: write files, fsync, sync, umount"
mkfs.ext4 -F -q -b 4096 $DEV $((FS_MIB * MIB / 4096)) || fail "mkfs.ext4 $DEV"
ok "mkfs.ext4 of $FS_MIB MiB"
mount_fs
write_files
verify_files "before unmounting"
umount_fs
ok "unmounted"

step "disconnect, stop hapaird gracefully (SIGTERM), start it again"
disconnect
stop_hapaird TERM
[ "$RC" = 0 ] || fail "hapaird exited $RC on SIGTERM"
nocolor < "$W/hapaird.log" | grep -q 'closed cleanly' || fail "no 'closed cleanly' in hapaird's log"
ok "hapaird stopped: exit 0, $(nocolor < "$W/hapaird.log" | grep 'final consistency point' | tail -n1 | grep -o 'up_to_seq=[0-9]*' || echo 'no final CP line'), aggregate closed cleanly"
start_hapaird
say "   replay: $(replay_line)"

step "reconnect with two connections; e2fsck, files and raw regions read back"
connect 2
check_device 2
for i in 0 1 2 3; do raw_verify $i "after the restart"; done
e2fsck -fn $DEV > "$W/fsck.log" 2>&1 || { cat "$W/fsck.log"; fail "e2fsck -fn $DEV found problems"; }
ok "e2fsck -fn: clean ($(tail -n1 "$W/fsck.log"))"
mount_fs
verify_files "after disconnect, hapaird restart and reconnect"
umount_fs # fio refuses to write to a device with a mounted filesystem

if command -v fio >/dev/null; then
    step "fio: libaio, O_DIRECT, iodepth 8, random writes then crc32c verify, on the raw device"
    # Three jobs one after the other, each on its own region behind the raw regions above:
    # 2 MiB in 4 KiB writes (512 of them; slow under TCG), 4 MiB in 64 KiB, 8 MiB in 1 MiB.
    fio --filename=$DEV --ioengine=libaio --direct=1 --iodepth=8 --rw=randwrite \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
        --name=bs4k --bs=4k --offset=160m --size=2m \
        --name=bs64k --bs=64k --offset=176m --size=4m --stonewall \
        --name=bs1m --bs=1m --offset=192m --size=8m --stonewall \
        --output-format=json --output="$W/fio.json" > "$W/fio.err" 2>&1
    frc=$?
    [ $frc = 0 ] || { cat "$W/fio.err" "$W/fio.json"; fail "fio exited $frc"; }
    # fio may print notes before the JSON document.
    sed -n '/^{/,$p' "$W/fio.json" > "$W/fio.doc.json"
    sed '/^{/,$d' "$W/fio.json" | sed 's/^/   fio says: /'
    jobs=$(jq -r '.jobs[] | "\(.jobname) error \(.error), wrote \(.write.io_bytes) B in \(.write.total_ios) writes, verified \(.read.io_bytes) B"' \
        "$W/fio.doc.json") || { cat "$W/fio.json"; fail "fio's JSON output does not parse"; }
    echo "$jobs" | sed 's/^/   fio: /'
    # Per job: no error, its size written and the same read back by the verify pass.
    good=$(jq '{"bs4k": 2097152, "bs64k": 4194304, "bs1m": 8388608} as $want
        | [.jobs[] | select(.error == 0 and .write.io_bytes == $want[.jobname]
            and .read.io_bytes == $want[.jobname])] | length' "$W/fio.doc.json")
    [ "$good" = 3 ] || { cat "$W/fio.err"; fail "only $good of 3 fio jobs wrote and verified their size without error"; }
    ok "fio wrote and verified 4k, 64k and 1m random writes (2, 4 and 8 MiB)"
else
    step "fio not installed: skipped"
fi

step "write and fsync, disconnect, SIGKILL hapaird (no final consistency point), restart: log replay"
mount_fs
dd if=/dev/urandom of="$MNT/f.bin" bs=4k count=100 conv=fsync status=none || fail "dd conv=fsync f.bin"
(cd "$MNT" && sha256sum f.bin) >> "$W/files.sum"
umount_fs
RAW+=("210 1 12 4")
raw_write 4
blockdev --flushbufs $DEV || fail "blockdev --flushbufs $DEV"
disconnect
stop_hapaird KILL
[ "$RC" = 137 ] || fail "hapaird exited $RC, not 137, on SIGKILL"
ok "hapaird killed (exit $RC)"
start_hapaird
r=$(replay_line)
say "   replay: $r"
echo "$r" | grep -q 'replayed_records: [1-9]' || fail "nothing replayed from the NVRAM log after SIGKILL: $r"
ok "NVRAM log replayed ($(echo "$r" | grep -o 'replayed_records: [0-9]*'))"
connect 1
check_device 1
for i in 0 1 2 3 4; do raw_verify $i "after SIGKILL and replay"; done
e2fsck -fn $DEV > "$W/fsck.log" 2>&1 || { cat "$W/fsck.log"; fail "e2fsck -fn $DEV after SIGKILL found problems"; }
ok "e2fsck -fn: clean"
mount_fs
verify_files "after SIGKILL and replay"
umount_fs

step "reconnect with block size 512: sub-4 KiB O_DIRECT writes (read-modify-write in hapaird)"
# The export's minimum block is 4096, but nbd-client asks for no block sizes, so the kernel
# sends 512-byte-aligned requests of any length: hapaird reads the covering 4 KiB blocks,
# patches them and writes them back, holding off its other writes meanwhile.
disconnect
connect 1 512
check_device 1 512
# 1 MiB of random data at 224 MiB (64 KiB writes), then 24 patches of 512 B to 7.5 KiB at
# 512-byte offsets inside it (most neither starting nor ending on a 4 KiB boundary), applied
# to a local copy too; the device must read back equal to the copy.
base=$((224 * MIB))
head -c $MIB /dev/urandom > "$W/sub.bin" || fail "random data"
dd if="$W/sub.bin" of=$DEV bs=64k seek=$base oflag=direct,seek_bytes conv=notrunc status=none ||
    fail "dd 64 KiB writes at 224 MiB"
for n in $(seq 1 24); do
    off=$(( (RANDOM % 2040) * 512 ))   # up to 1 MiB - 4 KiB
    len=$(( (RANDOM % 15 + 1) * 512 )) # 512 B .. 7.5 KiB
    [ $((off + len)) -le $MIB ] || off=$((MIB - len))
    head -c $len /dev/urandom > "$W/patch.bin"
    dd if="$W/patch.bin" of=$DEV bs=$len seek=$((base + off)) oflag=direct,seek_bytes \
        conv=notrunc status=none 2>&1 || fail "dd oflag=direct write of $len B at 224 MiB + $off"
    dd if="$W/patch.bin" of="$W/sub.bin" bs=$len seek=$off oflag=seek_bytes conv=notrunc \
        status=none || fail "patch the local copy"
done
want=$(sha256sum < "$W/sub.bin" | cut -d' ' -f1)
got=$(dd if=$DEV bs=512 skip=$base count=$MIB iflag=direct,skip_bytes,count_bytes status=none |
    sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "1 MiB at 224 MiB after 24 sub-4 KiB writes differs from the local copy"
ok "24 writes of 512 B to 7.5 KiB at 512-byte offsets read back equal to the local copy (512-byte reads)"
for i in 0 1 2 3 4; do raw_verify $i "with block size 512"; done

step "clean up"
disconnect
stop_hapaird TERM
[ "$RC" = 0 ] || fail "hapaird exited $RC on SIGTERM"
ok "hapaird stopped (exit 0)"
errs=$(dmesg | grep -i nbd | grep -ci 'i/o error\|returned error\|timed out\|stuck request')
say "   kernel log, nbd lines:"
dmesg | grep -i nbd | tail -n 12 | sed 's/^/   | /'
[ "$errs" = 0 ] || fail "$errs nbd error lines in the kernel log"
ok "no nbd errors in the kernel log"
echo
echo "PASS: the kernel's NBD client on hapaird's export ($((SECONDS - T0)) s in the guest)"
exit 0
