#!/usr/bin/env bash
# tests/vm/run.sh — run hapair-prtest on real Linux SCSI devices with persistent reservations.
#
# The host kernel has no SCSI. This boots Debian's kernel in a nested qemu VM (TCG), sets up
# LIO there (fileio backstores, each seen by two initiators = two "hosts" = two I_T nexuses to
# one LUN), and runs the host-built hapair-prtest inside a chroot of the host's / (shared
# read-only over 9p). The exit code and logs come back through a second, read-write 9p share.
#
# Fabrics (HAPAIR_VM_FABRIC):
#   iscsi (default): the LIO iSCSI target (iscsi_target_mod) on 127.0.0.1:3260 in the guest, one
#     target IQN with one TPG, one explicit node ACL per initiator IQN mapping every LUN; the
#     kernel initiator (iscsi_tcp) logs in twice through open-iscsi's iscsid/iscsiadm (run in the
#     chroot, the Debian open-iscsi package on the host), once per initiator IQN (one iscsiadm
#     iface each). Fences with PREEMPT AND ABORT by default.
#   loop: two LIO tcm_loop targets (one initiator each). NOTE: PREEMPT AND ABORT deadlocks LIO
#     behind tcm_loop (Debian 6.1 and 6.12: core_tmr_lun_reset runs in tcm_loop's submission
#     work item and flush_work()s it), so with this fabric the fence defaults to plain PREEMPT;
#     HAPAIR_VM_FABRIC=loop HAPAIR_VM_FENCE=preempt-and-abort HAPAIR_VM_DEBUG=1 reproduces the
#     hang and dumps the blocked tasks.
# Either way host h sees LUN i as /dev/hapair/h$h-lun$i in the guest, which is all the
# scenarios use.
# The knbd scenario sets up no SCSI at all: one hapaird on file-backed members in the guest's
# scratch tmpfs, served to the guest kernel's own NBD client (nbd.ko through Debian's nbd-client;
# tests/vm/knbd-guest.sh, tests/vm/knbd.sh). HAPAIR_VM_FABRIC, _FENCE and _DEVKIND do not apply.
#
# usage: tests/vm/run.sh [--bin PATH]   (default: cargo build --bin hapair-prtest, debug)
# env:   HAPAIR_VM_FABRIC=iscsi|loop (default iscsi; see above)
#        HAPAIR_VM_FENCE=preempt-and-abort|preempt (default preempt-and-abort on iscsi,
#          preempt on loop)
#        HAPAIR_VM_SCENARIO=prtest|pair|knbd: hapair-prtest on one LUN (default), or two
#          hapaird daemons fencing with PR over four LUNs (tests/vm/pair-guest.sh;
#          tests/vm/pair.sh), or the kernel's NBD client on one hapaird's export, no SCSI
#          (tests/vm/knbd-guest.sh; tests/vm/knbd.sh)
#        HAPAIR_VM_CACHE (default /var/cache/hapair-vm): kernel .deb and its extraction
#        HAPAIR_VM_TIMEOUT_S (default 120): wall-clock limit for the VM
#        HAPAIR_VM_KEEP=1: keep the work dir (initramfs, console log) for debugging
#        HAPAIR_VM_KERNEL_SUITE (default bookworm-backports; "stable" = the host's sources)
#        HAPAIR_VM_DEVKIND=sd|sg: hand the test /dev/sdX (default) or their /dev/sgN
#        HAPAIR_VM_DEBUG=1: verbose kernel console, blocked-task dump after 30 s
# Needs root. Installs qemu-system-x86, busybox-static, cpio, and sg3-utils (and open-iscsi for
# the iscsi fabric) or, for knbd, nbd-client, libnbd-bin, e2fsprogs and jq through apt if missing.
# Exits 0 only if the scenario ran in the guest and passed; otherwise non-zero with the reason.
set -euo pipefail

ME="tests/vm/run.sh"
die() {
    echo "$ME: FAIL: $*" >&2
    exit 1
}
say() { echo "$ME: $*" >&2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${HAPAIR_VM_CACHE:-/var/cache/hapair-vm}
TIMEOUT_S=${HAPAIR_VM_TIMEOUT_S:-120}
SCENARIO=${HAPAIR_VM_SCENARIO:-prtest}
FABRIC=${HAPAIR_VM_FABRIC:-iscsi}
# knbd exports no SCSI: no fabric, no fence.
[ "$SCENARIO" = knbd ] && FABRIC=none FENCE=none
case "$FABRIC" in
none) [ "$SCENARIO" = knbd ] || { echo "$0: HAPAIR_VM_FABRIC must be iscsi or loop" >&2; exit 1; } ;;
# The iSCSI target submits commands from its own rx threads: PREEMPT AND ABORT works there.
iscsi) FENCE=${HAPAIR_VM_FENCE:-preempt-and-abort} ;;
# PREEMPT AND ABORT deadlocks LIO behind tcm_loop (6.1 and 6.12: core_tmr_lun_reset runs in the
# submission work item and flush_work()s it), so that fabric fences with plain PREEMPT by
# default. HAPAIR_VM_FENCE=preempt-and-abort reproduces the hang.
loop) FENCE=${HAPAIR_VM_FENCE:-preempt} ;;
*) echo "$0: HAPAIR_VM_FABRIC must be iscsi or loop" >&2; exit 1 ;;
esac
case "$FENCE" in preempt | preempt-and-abort | none) ;; *) echo "$0: HAPAIR_VM_FENCE must be preempt or preempt-and-abort" >&2; exit 1 ;; esac
DEVKIND=${HAPAIR_VM_DEVKIND:-sd}
case "$SCENARIO" in
prtest) NLUNS=1 MEM=1024 ;;
# Two aggregates of 1 data + 1 parity member: four LUNs, each seen by both "hosts".
pair) NLUNS=4 MEM=2048 ;;
# No LUNs: five 64 MiB member files and the NVRAM log in the guest's scratch tmpfs.
knbd) NLUNS=0 MEM=1536 ;;
*) echo "$0: HAPAIR_VM_SCENARIO must be prtest, pair or knbd" >&2; exit 1 ;;
esac
# HAPAIR_VM_DEBUG=1: full kernel log on the console, blocked-task dump after 30 s.
KQUIET=quiet
[ "${HAPAIR_VM_DEBUG:-0}" = 1 ] && KQUIET="loglevel=7"
case "$DEVKIND" in sd | sg) ;; *) echo "$0: HAPAIR_VM_DEVKIND must be sd or sg" >&2; exit 1 ;; esac
BIN=""
while [ $# -gt 0 ]; do
    case "$1" in
    --bin)
        [ $# -ge 2 ] || die "--bin needs a path"
        BIN=$2
        shift 2
        ;;
    -h | --help)
        sed -n '2,42p' "$0"
        exit 0
        ;;
    *) die "unknown argument $1" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "must run as root (apt, kernel extraction, 9p export of /)"
PATH=$PATH:/usr/sbin:/sbin

# ---- host packages -------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() {
    if [ $APT_UPDATED = 0 ]; then
        say "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ "$SCENARIO" = knbd ]; then
    # Run in the guest's chroot of this host's /. nbd-client's boot-time service (an init
    # script; its systemd unit is masked) is never started here.
    command -v nbd-client >/dev/null || need+=(nbd-client)
    command -v nbdinfo >/dev/null || need+=(libnbd-bin)
    { command -v mkfs.ext4 && command -v e2fsck; } >/dev/null || need+=(e2fsprogs)
    command -v jq >/dev/null || need+=(jq)
else
    command -v sg_persist >/dev/null || need+=(sg3-utils)
fi
if [ "$FABRIC" = iscsi ]; then
    # iscsid and iscsiadm run in the guest's chroot of this host's /. The package's services
    # are not started here (no systemd in a container; Docker's policy-rc.d refuses them).
    { command -v iscsiadm && command -v iscsid && [ -f /etc/iscsi/iscsid.conf ]; } >/dev/null ||
        need+=(open-iscsi)
fi
if [ ${#need[@]} -gt 0 ]; then
    apt_update_once
    say "installing ${need[*]}"
    # No packaged service may start on this host (open-iscsi's iscsid is for the guest): where
    # no policy-rc.d refuses service starts already, one does for this install only.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\n# tests/vm/run.sh: no service starts during the install\nexit 101\n' >$policy
        chmod 755 $policy
    fi
    arc=0
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || arc=$?
    [ -z "$policy" ] || rm -f "$policy"
    [ $arc = 0 ] || die "apt-get install ${need[*]} failed"
fi
BUSYBOX=/bin/busybox
file -L "$BUSYBOX" 2>/dev/null | grep -q "statically linked" ||
    die "$BUSYBOX is not the static busybox (busybox-static package)"
QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found after install"
if [ "$SCENARIO" = knbd ]; then
    SG_PERSIST=""
    command -v nbd-client >/dev/null || die "nbd-client not found after install"
    command -v nbdinfo >/dev/null || die "nbdinfo not found after installing libnbd-bin"
    command -v fio >/dev/null || say "NOTE: no fio on this host: the guest skips its fio step"
else
    SG_PERSIST=$(command -v sg_persist) || die "sg_persist not found after install"
fi
if [ "$FABRIC" = iscsi ]; then
    ISCSIADM=$(command -v iscsiadm) || die "iscsiadm not found after installing open-iscsi"
    ISCSID=$(command -v iscsid) || die "iscsid not found after installing open-iscsi"
    [ -f /etc/iscsi/iscsid.conf ] || die "/etc/iscsi/iscsid.conf missing (open-iscsi package)"
else
    ISCSIADM="" ISCSID=""
fi

# ---- the test binary -----------------------------------------------------------------------
if [ -z "$BIN" ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
    if [ "$SCENARIO" = knbd ]; then
        say "building hapaird (debug) in $CARGO_TARGET_DIR"
        (cd "$REPO" && nice -n 10 cargo build --quiet --bin hapaird) || die "cargo build failed"
        BIN=$CARGO_TARGET_DIR/debug/hapaird
    else
        say "building hapair-prtest, hapaird, takeoverctl (debug) in $CARGO_TARGET_DIR"
        (cd "$REPO" && nice -n 10 cargo build --quiet --bin hapair-prtest --bin hapaird --bin takeoverctl) ||
            die "cargo build failed"
        BIN=$CARGO_TARGET_DIR/debug/hapair-prtest
    fi
fi
BIN=$(realpath "$BIN") || die "test binary path does not resolve"
[ -x "$BIN" ] || die "test binary $BIN is not executable"
BINDIR=$(dirname "$BIN")
if [ "$SCENARIO" = pair ]; then
    for b in hapaird takeoverctl; do
        [ -x "$BINDIR/$b" ] || die "$BINDIR/$b missing (built next to $BIN)"
    done
    command -v qemu-io >/dev/null || { apt_update_once; apt-get install -y -qq qemu-utils >/dev/null || die "apt-get install qemu-utils failed"; }
    command -v python3 >/dev/null || die "python3 needed in the guest chroot (control socket client)"
fi
if [ "$SCENARIO" = knbd ]; then
    [ -x "$BINDIR/hapaird" ] || die "$BINDIR/hapaird missing (built next to $BIN)"
fi

# ---- guest kernel (cached; nothing goes to /boot) ------------------------------------------
mkdir -p "$CACHE"
# Default: bookworm-backports' kernel (6.12; it has ublk_drv, bookworm's 6.1 does not). Both
# deadlock in LIO on PREEMPT AND ABORT through tcm_loop (core_tmr_lun_reset flushes the
# submission work it runs in; seen as a blocked kworker in flush_work), not through iSCSI. The
# backports suite is read through a private apt state under $CACHE: the host's apt
# configuration is not changed.
KSUITE=${HAPAIR_VM_KERNEL_SUITE:-bookworm-backports}
APTQ=()
if [ "$KSUITE" != stable ]; then
    mkdir -p "$CACHE/apt/lists/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $KSUITE main" \
        >"$CACHE/apt/sources.list"
    APTQ=(-o Dir::Etc::SourceList="$CACHE/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::State::Lists="$CACHE/apt/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
    if ! apt-cache "${APTQ[@]}" show linux-image-amd64 >/dev/null 2>&1; then
        say "apt-get update ($KSUITE, private state in $CACHE/apt)"
        apt-get "${APTQ[@]}" update -qq >/dev/null || die "apt-get update of $KSUITE failed"
    fi
elif ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    apt_update_once
fi
KPKG=$(apt-cache "${APTQ[@]}" depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64 ($KSUITE)"
DEB=$(ls "$CACHE/${KPKG}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$DEB" ]; then
    say "downloading $KPKG into $CACHE"
    # _apt cannot write into a root-owned cache dir; download as root into a temp dir.
    tmpdl=$(mktemp -d "$CACHE/dl.XXXXXX")
    (cd "$tmpdl" && apt-get "${APTQ[@]}" download -qq "$KPKG" 2>/dev/null) ||
        { rm -rf "$tmpdl"; die "apt-get download $KPKG failed"; }
    mv "$tmpdl"/*.deb "$CACHE"/ && rm -rf "$tmpdl"
    DEB=$(ls "$CACHE/${KPKG}"_*.deb | head -n1)
fi
KROOT=$CACHE/${KPKG}.x
if [ ! -f "$KROOT/.complete" ]; then
    say "extracting $(basename "$DEB")"
    rm -rf "$KROOT"
    dpkg -x "$DEB" "$KROOT" || die "dpkg -x $DEB failed"
    KVER=$(ls "$KROOT/lib/modules" | head -n1)
    # The package's postinst would run depmod; do it here into the extraction.
    "$BUSYBOX" depmod -b "$KROOT" "$KVER" || die "depmod for $KVER failed"
    touch "$KROOT/.complete"
fi
KVER=$(ls "$KROOT/lib/modules" | head -n1)
KMOD=$KROOT/lib/modules/$KVER
VMLINUZ=$KROOT/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "no kernel image at $VMLINUZ"
[ -f "$KMOD/modules.dep" ] || die "no modules.dep in $KMOD"

# ---- work dir and cleanup ------------------------------------------------------------------
WORK=$(mktemp -d /tmp/hapair-vm.XXXXXX)
# The pair and knbd scenarios mount a tmpfs here inside the guest's view of the host's / (read-only):
# the directory has to exist on the host, and must not hold the repository or the build.
SCRATCH=/run/hapair-vm-scratch
mkdir -p "$SCRATCH"
QEMU_PID=""
cleanup() {
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ "${HAPAIR_VM_KEEP:-0}" = 1 ]; then
        say "kept work dir $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'die "interrupted"' INT TERM

# ---- initramfs -----------------------------------------------------------------------------
IR=$WORK/initramfs
mkdir -p "$IR"/{bin,sbin,proc,sys,dev,tmp,etc,mnt/host,mnt/results,var/target/pr} "$IR/lib/modules/$KVER"
cp "$BUSYBOX" "$IR/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -s busybox "$IR/bin/$a"
done
ln -s ../bin/busybox "$IR/sbin/modprobe"

# Modules and every dependency modules.dep lists (paths relative to $KMOD).
WANT=(virtio_pci 9pnet_virtio 9p)
# LIO and SCSI disks, except for knbd: the kernel's NBD client and ext4 (with crc32c for its
# metadata checksums and jbd2) instead.
if [ "$SCENARIO" = knbd ]; then
    WANT+=(nbd ext4 crc32c_generic)
else
    WANT+=(configfs target_core_mod target_core_file sd_mod sg crct10dif_generic)
fi
case "$FABRIC" in
loop) WANT+=(tcm_loop) ;;
# LIO's iSCSI target, the kernel initiator (libiscsi, scsi_transport_iscsi through modules.dep)
# and crc32c, which both ends ask the crypto API for at login even without digests.
iscsi) WANT+=(iscsi_target_mod iscsi_tcp crc32c_generic) ;;
esac
declare -A DEPS=() BYNAME=() COPIED=()
while IFS= read -r line; do
    mod=${line%%:*}
    DEPS[$mod]=${line#*:}
    name=$(basename "$mod")
    name=${name%%.ko*}
    BYNAME[${name//-/_}]=$mod
done <"$KMOD/modules.dep"
copy_mod() {
    local m=$1
    [ -n "${COPIED[$m]:-}" ] && return 0
    COPIED[$m]=1
    mkdir -p "$IR/lib/modules/$KVER/$(dirname "$m")"
    case "$m" in
    *.ko) cp "$KMOD/$m" "$IR/lib/modules/$KVER/$m" ;;
    *.ko.xz) xz -dc "$KMOD/$m" >"$IR/lib/modules/$KVER/${m%.xz}" ;;
    *.ko.zst) zstd -qdc "$KMOD/$m" >"$IR/lib/modules/$KVER/${m%.zst}" ;;
    *) die "unknown module file $m" ;;
    esac
    local d
    for d in ${DEPS[$m]}; do copy_mod "$d"; done
}
for w in "${WANT[@]}"; do
    if [ -n "${BYNAME[$w]:-}" ]; then
        copy_mod "${BYNAME[$w]}"
    elif grep -q "/$w.ko" "$KMOD/modules.builtin"; then
        : # built into the kernel
    else
        die "kernel $KVER has no module $w"
    fi
done
cp "$KMOD/modules.builtin" "$KMOD/modules.order" "$IR/lib/modules/$KVER/"
"$BUSYBOX" depmod -b "$IR" "$KVER" || die "depmod of the initramfs modules failed"

cat >"$IR/init" <<EOF
#!/bin/sh
# Generated by tests/vm/run.sh. Reports through /mnt/results: rc (exit code or "setup: why"),
# guest.log (setup steps), prtest.log (the scenario's output).
export PATH=/bin:/sbin
KVER=$KVER
BIN=$BIN
SG_PERSIST=$SG_PERSIST
WANT="${WANT[*]}"
DEVKIND=$DEVKIND
DEBUG=${HAPAIR_VM_DEBUG:-0}
FENCE=$FENCE
FABRIC=$FABRIC
ISCSIADM=$ISCSIADM
ISCSID=$ISCSID
SCENARIO=$SCENARIO
NLUNS=$NLUNS
BINDIR=$BINDIR
REPO=$REPO
SCRATCH=$SCRATCH
EOF
cat >>"$IR/init" <<'EOF'
halt() { sync; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; exit 1; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 1 > /proc/sys/kernel/sysrq
for m in virtio_pci 9pnet_virtio 9p; do
    modprobe $m || { echo "GUEST: modprobe $m failed"; halt; }
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /mnt/results ||
    { echo "GUEST: cannot mount the results share"; halt; }
R=/mnt/results
log() { echo "guest: $*" >> $R/guest.log; }
fail() { log "FAIL: $*"; echo "setup: $*" > $R/rc; halt; }
log "kernel $(cat /proc/sys/kernel/osrelease)"
for m in $WANT; do modprobe $m || fail "modprobe $m"; done
log "modules loaded: $WANT"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro hostroot /mnt/host ||
    fail "mount host root over 9p"
if [ "$SCENARIO" = knbd ]; then
    for d in dev proc sys; do
        mount -o bind /$d /mnt/host/$d || fail "bind /$d into the host chroot"
    done
    # No SCSI: one hapaird on member files in a scratch tmpfs (a directory the host made for
    # it, not /tmp: the repository or the build may live there), the kernel's nbd client on lo.
    mount -t tmpfs -o size=448m tmpfs /mnt/host$SCRATCH || fail "tmpfs on $SCRATCH of the chroot"
    ip link set lo up || fail "lo up"
    log "running tests/vm/knbd-guest.sh"
    chroot /mnt/host /bin/bash $REPO/tests/vm/knbd-guest.sh $BINDIR $SCRATCH > $R/prtest.log 2>&1
    rc=$?
    log "knbd-guest.sh exited $rc"
    umount /mnt/host$SCRATCH
    echo $rc > $R/rc
    for d in sys proc dev; do umount /mnt/host/$d; done
    halt
fi
mount -t configfs configfs /sys/kernel/config || fail "mount configfs"

# LIO: NLUNS fileio backstores, each exported to two initiators ("hosts" 1 and 2) by the
# fabric: host h sees LUN i as its own /dev/sdX, linked as /dev/hapair/h$h-lun$i.
T=/sys/kernel/config/target
mkdir -p /dev/hapair
for i in $(seq 0 $((NLUNS - 1))); do
    mkdir -p $T/core/fileio_$i/lun$i || fail "mkdir fileio backstore $i"
    echo "fd_dev_name=/lun$i.img,fd_dev_size=$((32 << 20))" > $T/core/fileio_$i/lun$i/control ||
        fail "fileio control $i"
    echo 1 > $T/core/fileio_$i/lun$i/enable || fail "enable backstore $i"
done
for d in dev proc sys; do
    mount -o bind /$d /mnt/host/$d || fail "bind /$d into the host chroot"
done
# link_dev HOST LUN SDNAME: the /dev/hapair link to the sd (or, with DEVKIND=sg, its sg node);
# LINKED says what it points to.
link_dev() {
    local h=$1 i=$2 sd=$3 node sgdev
    [ -b /dev/$sd ] || fail "host $h LUN $i: /dev/$sd is not a block device"
    node=$sd
    LINKED=/dev/$sd
    if [ "$DEVKIND" = sg ]; then
        sgdev=$(ls /sys/block/$sd/device/scsi_generic 2>/dev/null | head -n1)
        [ -n "$sgdev" ] && [ -c /dev/$sgdev ] || fail "no sg node for /dev/$sd"
        node=$sgdev
        LINKED="/dev/$sd (/dev/$sgdev)"
    fi
    ln -s /dev/$node /dev/hapair/h$h-lun$i || fail "symlink /dev/hapair/h$h-lun$i"
}
sd_list() { ls /sys/block 2>/dev/null | grep '^sd' ; }

setup_loop() {
    # Per host one tcm_loop target (one initiator) exporting all LUNs.
    local h tgt ini i before new t d
    for h in 1 2; do
        tgt=naa.5001405000000a0$h
        ini=naa.5001405000000b0$h
        mkdir -p $T/loopback/$tgt/tpgt_1 || fail "mkdir tcm_loop target $h"
        # nexus BEFORE the LUN links, or the LUNs have no I_T nexus and no disk appears.
        echo $ini > $T/loopback/$tgt/tpgt_1/nexus || fail "nexus $h"
        for i in $(seq 0 $((NLUNS - 1))); do
            mkdir -p $T/loopback/$tgt/tpgt_1/lun/lun_$i || fail "mkdir lun_$i of target $h"
            before=$(sd_list)
            ln -s $T/core/fileio_$i/lun$i $T/loopback/$tgt/tpgt_1/lun/lun_$i/hapair_lun ||
                fail "link LUN $i for target $h"
            new=""
            for t in $(seq 1 100); do
                for d in $(sd_list); do
                    echo "$before" | grep -qx "$d" || new=$d
                done
                [ -n "$new" ] && [ -b /dev/$new ] && break
                new=""
                sleep 0.1
            done
            [ -n "$new" ] || fail "no sd device appeared for LUN $i of tcm_loop target $h"
            link_dev $h $i $new
            log "host $h: target $tgt initiator $ini LUN $i -> $LINKED"
        done
    done
}

# ---- iSCSI: LIO target and open-iscsi initiator over lo -----------------------------------
IQN=iqn.2003-01.org.hapair:vm-target
PORTAL=127.0.0.1:3260
ini_iqn() { echo iqn.2003-01.org.hapair:vm-host$1; }
ISCSI_UP=0
# iadm ARGS: iscsiadm in the chroot, output to iscsi.log (and stdout).
iadm() {
    echo "# iscsiadm $*" >> $R/iscsi.log
    chroot /mnt/host $ISCSIADM "$@" > /tmp/iadm.out 2>&1
    local rc=$?
    cat /tmp/iadm.out >> $R/iscsi.log
    cat /tmp/iadm.out
    return $rc
}
setup_iscsi() {
    local h i ini tpg=$T/iscsi/$IQN/tpgt_1 t s sess n dev lun sd want got
    ip link set lo up || fail "lo up"
    # Target: one IQN, TPG 1 on the portal, the NLUNS backstores as its LUNs.
    mkdir -p $tpg || fail "mkdir iSCSI target $IQN tpgt_1"
    mkdir $tpg/np/$PORTAL || fail "iSCSI network portal $PORTAL"
    for i in $(seq 0 $((NLUNS - 1))); do
        mkdir -p $tpg/lun/lun_$i || fail "mkdir $tpg/lun/lun_$i"
        ln -s $T/core/fileio_$i/lun$i $tpg/lun/lun_$i/hapair_lun || fail "link backstore $i to lun_$i"
    done
    # Explicit ACLs only: no CHAP, no generated (demo-mode) ACLs; write protect off either way.
    echo 0 > $tpg/attrib/authentication || fail "tpg attrib authentication=0"
    echo 0 > $tpg/attrib/generate_node_acls || fail "tpg attrib generate_node_acls=0"
    echo 0 > $tpg/attrib/cache_dynamic_acls || fail "tpg attrib cache_dynamic_acls=0"
    echo 0 > $tpg/attrib/demo_mode_write_protect || fail "tpg attrib demo_mode_write_protect=0"
    for h in 1 2; do
        ini=$(ini_iqn $h)
        mkdir -p $tpg/acls/$ini || fail "ACL for $ini"
        for i in $(seq 0 $((NLUNS - 1))); do
            mkdir -p $tpg/acls/$ini/lun_$i || fail "mapped lun_$i in the ACL of $ini"
            ln -s $tpg/lun/lun_$i $tpg/acls/$ini/lun_$i/hapair_mapped ||
                fail "map lun_$i into the ACL of $ini"
        done
    done
    echo 1 > $tpg/enable || fail "enable tpgt_1 of $IQN"
    log "iSCSI target $IQN tpgt_1 on $PORTAL: $NLUNS LUNs, ACLs $(ini_iqn 1) $(ini_iqn 2), no auth"

    # open-iscsi writes /etc/iscsi (ifaces, node records) and /run/lock/iscsi: tmpfs over those
    # in the read-only chroot, seeded with the host's iscsid.conf.
    cp /mnt/host/etc/iscsi/iscsid.conf /tmp/iscsid.conf || fail "read the host's /etc/iscsi/iscsid.conf"
    mount -t tmpfs -o size=8m,mode=0755 tmpfs /mnt/host/etc/iscsi || fail "tmpfs on /etc/iscsi of the chroot"
    mount -t tmpfs -o size=8m,mode=0755 tmpfs /mnt/host/run/lock || fail "tmpfs on /run/lock of the chroot"
    ISCSI_UP=1
    # iscsid is started here, not by iscsiadm through systemctl. No NOP-Out pings: on a
    # loaded host a TCG guest can stall past their 5 s timeout and drop a healthy connection.
    sed -e 's|^iscsid.startup = .*|iscsid.startup = /bin/true|' \
        -e 's|^node.conn\[0\].timeo.noop_out_interval = .*|node.conn[0].timeo.noop_out_interval = 0|' \
        -e 's|^node.conn\[0\].timeo.noop_out_timeout = .*|node.conn[0].timeo.noop_out_timeout = 0|' \
        /tmp/iscsid.conf > /mnt/host/etc/iscsi/iscsid.conf || fail "write iscsid.conf"
    echo "InitiatorName=iqn.2003-01.org.hapair:vm-default" > /mnt/host/etc/iscsi/initiatorname.iscsi ||
        fail "write initiatorname.iscsi"
    chroot /mnt/host $ISCSID -f -n > $R/iscsid.log 2>&1 &
    ISCSID_PID=$!
    sleep 0.5
    kill -0 $ISCSID_PID 2>/dev/null || fail "iscsid exited at start: $(tail -n 5 $R/iscsid.log)"
    log "iscsid running (pid $ISCSID_PID, log iscsid.log)"
    # Two initiators: one iface per initiator IQN, both over TCP.
    for h in 1 2; do
        iadm -m iface -I hapair-h$h -o new > /dev/null || fail "iscsiadm iface new hapair-h$h: $(cat /tmp/iadm.out)"
        iadm -m iface -I hapair-h$h -o update -n iface.initiatorname -v "$(ini_iqn $h)" > /dev/null ||
            fail "iscsiadm iface hapair-h$h initiatorname: $(cat /tmp/iadm.out)"
    done
    iadm -m discovery -t sendtargets -p $PORTAL -I hapair-h1 -I hapair-h2 > /dev/null ||
        fail "iscsiadm discovery (sendtargets) on $PORTAL: $(cat /tmp/iadm.out)"
    grep -q "$IQN" /tmp/iadm.out || fail "discovery on $PORTAL did not return $IQN: $(cat /tmp/iadm.out)"
    log "discovery (sendtargets) through both ifaces: $(grep -c "$IQN" /tmp/iadm.out) node records for $IQN"
    for h in 1 2; do
        iadm -m node -T $IQN -p $PORTAL -I hapair-h$h --login > /dev/null ||
            fail "iscsiadm login as $(ini_iqn $h): $(cat /tmp/iadm.out)"
        log "host $h: logged in to $IQN at $PORTAL as $(ini_iqn $h)"
    done
    # Map (host, LUN) to the disk: session -> initiator name -> its SCSI devices H:C:T:L.
    want=$((2 * NLUNS))
    for t in $(seq 1 200); do
        got=0
        for sess in /sys/class/iscsi_session/session*; do
            for dev in $sess/device/target*/*:*:*:*; do
                [ -d $dev/block ] && got=$((got + 1))
            done
        done
        [ $got -ge $want ] && break
        sleep 0.1
    done
    [ $got -ge $want ] || fail "only $got of $want iSCSI disks appeared within 20 s"
    for sess in /sys/class/iscsi_session/session*; do
        s=$(basename $sess)
        ini=$(cat $sess/initiatorname)
        h=""
        for n in 1 2; do [ "$ini" = "$(ini_iqn $n)" ] && h=$n; done
        [ -n "$h" ] || fail "$s has unexpected initiator name '$ini'"
        [ "$(cat $sess/targetname)" = $IQN ] || fail "$s is logged in to $(cat $sess/targetname), not $IQN"
        for dev in $sess/device/target*/*:*:*:*; do
            lun=${dev##*:}
            sd=$(ls $dev/block)
            [ -e /dev/hapair/h$h-lun$lun ] && fail "host $h LUN $lun seen twice"
            link_dev $h $lun $sd
            log "host $h: $s initiator $ini LUN $lun ($(basename $dev)) -> $LINKED"
        done
    done
    for h in 1 2; do
        for i in $(seq 0 $((NLUNS - 1))); do
            [ -e /dev/hapair/h$h-lun$i ] || fail "no disk for host $h LUN $i"
        done
    done
}
# Before poweroff: log out (the sd devices go away with their caches synced) and stop iscsid.
stop_iscsi() {
    [ $ISCSI_UP = 1 ] || return 0
    ISCSI_UP=0
    if iadm -m node --logoutall=all > /dev/null; then
        log "iSCSI sessions logged out"
    else
        log "WARNING: iscsiadm logout failed: $(cat /tmp/iadm.out)"
    fi
    if [ -n "${ISCSID_PID:-}" ]; then
        kill $ISCSID_PID 2>/dev/null
        wait $ISCSID_PID 2>/dev/null
    fi
    umount /mnt/host/etc/iscsi /mnt/host/run/lock 2>/dev/null
}

case "$FABRIC" in
loop) setup_loop ;;
iscsi) setup_iscsi ;;
*) fail "unknown fabric $FABRIC" ;;
esac
# LUN 0 of host 1 and of host 2: hapair-prtest's node a and node b.
a=$(readlink /dev/hapair/h1-lun0) && b=$(readlink /dev/hapair/h2-lun0) || fail "no /dev/hapair/h[12]-lun0"
set -- "${a##*/}" "${b##*/}"
if [ "$DEBUG" = 1 ]; then
    # Dump blocked tasks and CPU backtraces to the console if the run is stuck.
    (sleep 30; echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger) &
fi
if [ "$SCENARIO" = pair ]; then
    # Scratch space for configs, NVRAM files and sockets: a tmpfs over a directory the host
    # made for it (not /tmp: the repository or the build may live there).
    mount -t tmpfs -o size=256m tmpfs /mnt/host$SCRATCH || fail "tmpfs on $SCRATCH of the chroot"
    ip link set lo up || fail "lo up"
    log "running tests/vm/pair-guest.sh (fence $FENCE)"
    chroot /mnt/host /bin/bash $REPO/tests/vm/pair-guest.sh $BINDIR $FENCE $SCRATCH > $R/prtest.log 2>&1
    rc=$?
    log "pair-guest.sh exited $rc"
    umount /mnt/host$SCRATCH
else
    log "running $BIN --node-a /dev/$1 --node-b /dev/$2 --fence $FENCE"
    chroot /mnt/host $BIN --node-a /dev/$1 --node-b /dev/$2 --sg-persist $SG_PERSIST --fence $FENCE \
        > $R/prtest.log 2>&1
    rc=$?
    log "hapair-prtest exited $rc"
fi
stop_iscsi
echo $rc > $R/rc
for d in sys proc dev; do umount /mnt/host/$d; done
halt
EOF
chmod +x "$IR/init"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 >"$WORK/initrd.gz") ||
    die "building the initramfs failed"

# ---- boot ----------------------------------------------------------------------------------
RES=$WORK/results
mkdir -p "$RES"
if [ "$SCENARIO" = knbd ]; then
    say "booting $KVER under qemu TCG (timeout ${TIMEOUT_S}s), scenario knbd (no SCSI)"
else
    say "booting $KVER under qemu TCG (timeout ${TIMEOUT_S}s), fabric: $FABRIC, fence action: $FENCE"
fi
if [ "$FABRIC" = loop ]; then
    if [ "$FENCE" = preempt ]; then
        say "NOTE: fencing with PREEMPT, not PREEMPT AND ABORT (LIO/tcm_loop deadlock)"
    else
        say "NOTE: PREEMPT AND ABORT through tcm_loop deadlocks LIO: expect a time-out"
    fi
fi
boot_vm() {
    start=$(date +%s)
    nice -n 10 timeout --kill-after=10 "$TIMEOUT_S" "$QEMU" \
        -accel tcg -smp 2 -m $MEM -net none -nographic -no-reboot \
        -kernel "$VMLINUZ" -initrd "$WORK/initrd.gz" \
        -append "console=ttyS0 $KQUIET panic=-1" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -virtfs local,path="$RES",mount_tag=results,security_model=none \
        </dev/null >"$WORK/console.log" 2>&1 &
    QEMU_PID=$!
    qrc=0
    wait "$QEMU_PID" || qrc=$?
    QEMU_PID=""
}
boot_vm
# The guest kernel under TCG very rarely panics while booting, before our init runs (seen
# once: a fault in sched_clock_cpu at 1.7 s). That is no result about hapair: boot once more,
# and say so. A panic after the init started is a failure like any other.
if [ ! -f "$RES/guest.log" ] && [ ! -f "$RES/rc" ] && grep -q "Kernel panic" "$WORK/console.log"; then
    say "WARNING: the guest kernel panicked while booting, before the test began (console below); booting again"
    tail -n 15 "$WORK/console.log" >&2
    boot_vm
fi
say "VM ran $(($(date +%s) - start))s (qemu exit $qrc)"

[ -f "$RES/guest.log" ] && sed 's/^/  /' "$RES/guest.log" >&2
if [ -f "$RES/prtest.log" ]; then
    echo "---- scenario $SCENARIO: guest output ----"
    cat "$RES/prtest.log"
    echo "------------------------------"
fi
show_console() {
    local f
    for f in iscsi.log iscsid.log; do
        [ -s "$RES/$f" ] || continue
        echo "---- guest $f (last 30 lines) ----" >&2
        tail -n 30 "$RES/$f" >&2
    done
    echo "---- VM console (last 40 lines) ----" >&2
    tail -n 40 "$WORK/console.log" >&2
}
[ "$qrc" = 124 ] || [ "$qrc" = 137 ] && { show_console; die "VM timed out after ${TIMEOUT_S}s"; }
[ -f "$RES/rc" ] || { show_console; die "guest reported no result (qemu exit $qrc)"; }
rc=$(cat "$RES/rc")
case "$rc" in
0) if [ "$SCENARIO" = knbd ]; then
    say "PASS: scenario knbd (the kernel's NBD client on hapaird) passed in the VM"
else
    say "PASS: scenario $SCENARIO passed on LIO ($FABRIC fabric, $FENCE) in the VM"
fi ;;
setup:*) show_console; die "guest $rc" ;;
*) show_console; die "scenario $SCENARIO failed in the VM with exit code $rc" ;;
esac
