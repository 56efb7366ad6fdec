#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps look unreachable to shellcheck
# pairfs benchmark suite: every figure is measured side by side with its baseline in the same run.
#
#   bench/run.sh            full run (a few minutes): bench/results.json + bench/RESULTS.md
#   bench/run.sh --quick    tiny sizes, well under a minute: only checks that everything still runs
#                           (writes bench/results-quick.json, not committed)
#
# Options:
#   --quick                 tiny sizes
#   --only a,b,...          run only these sections: seq rand meta split update bgcopy latency rss pgbench
#   --keep                  keep the work directory (still unmounted)
#   --no-build              do not run cargo build --release (use the existing binary)
#   --out FILE              JSON output file
# Environment:
#   PAIRFS_BIN              use this binary instead of building target/release/pairfs
#   BENCH_DIR               parent of the work directory (default /work/bench-tmp); must be on the
#                           real disk, not tmpfs (the raw and native baselines go there too)
#   TMPFS_DIR               a tmpfs directory for the metadata baseline (default /dev/shm)
#   PAIRFS_MOUNT_OPTS       extra arguments for the main mount, e.g. "-o writeback_cache"
#
# Needs root (drop_caches, FUSE allow_other), fio, rsync, python3, getfattr/setfattr, fallocate.
# See bench/README.md for what each figure means.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
helpers="$here/helpers.py"
cmdline=$(echo "${PAIRFS_MOUNT_OPTS:+PAIRFS_MOUNT_OPTS='$PAIRFS_MOUNT_OPTS' }bench/run.sh $*" | sed "s/ *$//")

mode=full keep=0 build=1 only="" out=""
while [ $# -gt 0 ]; do
    case $1 in
        --quick) mode=quick ;;
        --keep) keep=1 ;;
        --no-build) build=0 ;;
        --only) only=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- sizes (MiB unless noted)
if [ "$mode" = full ]; then
    VOL_SIZE=20G
    SEQ_MB=1024  SEQ_REPS=3
    RAND_MB=1024 RAND_RT=5s RAND_REPS=3
    META_N=10000
    SPLIT_REPS=7
    SPLIT_WRITTEN_MB=1024 SPLIT_FALLOC_MB=8192 SPLIT_DIR_N=10000
    UPD_MB=4096
    BG_MB=1024
    LAT_MB=256 LAT_RT=3s
    RSS_PAIRS=1000
    PG_SCALE=5 PG_CLIENTS=4 PG_T=20
else
    VOL_SIZE=4G
    SEQ_MB=32    SEQ_REPS=1
    RAND_MB=64   RAND_RT=500ms RAND_REPS=1
    META_N=500
    SPLIT_REPS=3
    SPLIT_WRITTEN_MB=32 SPLIT_FALLOC_MB=64 SPLIT_DIR_N=200
    UPD_MB=64
    BG_MB=64
    LAT_MB=32 LAT_RT=500ms
    RSS_PAIRS=20
    PG_SCALE=1 PG_CLIENTS=2 PG_T=3
fi
TRACK=65536
[ -n "$out" ] || { [ "$mode" = full ] && out=$here/results.json || out=$here/results-quick.json; }

want() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

# ---------------------------------------------------------------- checks
[ "$(id -u)" -eq 0 ] || die "must run as root (drop_caches, FUSE mounts)"
for c in fio rsync python3 setfattr getfattr fallocate fusermount3; do
    command -v "$c" >/dev/null || die "$c not found (apt-get install -y fio rsync attr util-linux fuse3)"
done

if [ -n "${PAIRFS_BIN:-}" ]; then
    src_bin=$PAIRFS_BIN
else
    if [ "$build" = 1 ]; then
        log "cargo build --release"
        (cd "$root" && cargo build --release --quiet \
            && cargo build --release --quiet --example memfs --example passthrough_floor) \
            || die "build failed"
    fi
    src_bin=${CARGO_TARGET_DIR:-$root/target}/release/pairfs
fi
[ -x "$src_bin" ] || die "no pairfs binary at $src_bin"
# The FUSE floor (examples/memfs.rs: an in-memory FUSE file system mounted as pairfs mounts,
# doing no work): the meta and seq sections also run on it, to show what FUSE allows here.
memfs_src=${MEMFS_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/examples/memfs}
# The data-path floor (examples/passthrough_floor.rs: one file served by pread/pwrite of a
# backing file on the same disk, mounted as pairfs mounts): the rand section also runs on it.
ptfloor_src=${PTFLOOR_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/examples/passthrough_floor}

# The real interpreter, once: a pyenv shim costs ~200 ms per call and we call it often.
PY=$(python3 -c 'import sys; print(sys.executable)')

parent=${BENCH_DIR:-/work/bench-tmp}
mkdir -p "$parent"
[ "$(stat -f -c %T "$parent")" != tmpfs ] || die "$parent is on tmpfs; set BENCH_DIR to a directory on the real disk"
WORK=$(mktemp -d "$parent/run.XXXXXX")
WORK=$(cd "$WORK" && pwd -P)
SHM=$(mktemp -d "${TMPFS_DIR:-/dev/shm}/pairfs-bench.XXXXXX")
[ "$(stat -f -c %T "$SHM")" = tmpfs ] || log "WARNING: $SHM is not tmpfs"

# A private copy of the binary: others may rebuild target/ while we run.
PF=$WORK/pairfs
cp "$src_bin" "$PF"
MEMFS=""
if [ -x "$memfs_src" ]; then
    cp "$memfs_src" "$WORK/memfs"
else
    log "no memfs binary at $memfs_src (cargo build --release --example memfs): FUSE floor rows skipped"
fi
MEMMNT=$WORK/memfsmnt
PTFLOOR=""
if [ -x "$ptfloor_src" ]; then
    cp "$ptfloor_src" "$WORK/ptfloor"
else
    log "no passthrough_floor binary at $ptfloor_src (cargo build --release --example passthrough_floor): rand floor rows skipped"
fi
PTMNT=$WORK/ptfloormnt
VOL=$WORK/vol.img MNT=$WORK/mnt CMNT=$WORK/copy
NAT=$WORK/native
RSSVOL=$WORK/rss.img RSSMNT=$WORK/rssmnt
mkdir -p "$MNT" "$CMNT" "$NAT" "$RSSMNT" "$WORK/fio"
RES=$WORK/results.tsv
: >"$RES"

is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }
# Our daemons only: the command line holds our unique work directory.
daemon_pid() { pgrep -f "^$PF mount $1 " | head -1; }

unmount_one() {
    local m=$1
    is_mounted "$m" || return 0
    timeout 60 "$PF" umount "$m" >/dev/null 2>&1 || true
    if is_mounted "$m"; then
        log "WARNING: pairfs umount $m failed; lazy unmount"
        fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    fi
}

cleanup() {
    local rc=$?
    set +e
    for m in "$CMNT" "$MNT" "$RSSMNT"; do unmount_one "$m"; done
    if is_mounted "$MEMMNT"; then fusermount3 -u "$MEMMNT" 2>/dev/null || umount -l "$MEMMNT"; fi
    if is_mounted "$PTMNT"; then fusermount3 -u "$PTMNT" 2>/dev/null || umount -l "$PTMNT"; fi
    # Any daemon of ours still alive (e.g. after a lazy unmount): stop it by pid.
    for p in $(pgrep -f "^$PF mount " 2>/dev/null); do
        log "WARNING: daemon $p still running after unmount; sending SIGTERM"
        kill "$p" 2>/dev/null
    done
    sleep 0.2
    if [ "$keep" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    rm -rf "$SHM"
    rmdir "$parent" 2>/dev/null   # only if empty (no other run, nothing kept)
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mount_main() {
    # shellcheck disable=SC2086  # PAIRFS_MOUNT_OPTS is a list of words, e.g. "-o writeback_cache"
    "$PF" mount "$VOL" "$MNT" --copy-mount "$CMNT" --daemon ${PAIRFS_MOUNT_OPTS:-} 2>>"$WORK/daemon.log" || die "mount failed (see $WORK/daemon.log)"
    is_mounted "$MNT" || die "not mounted after pairfs mount --daemon"
}

# mount_memfs: the FUSE floor at $MEMMNT (sets MEMFS to it), if its binary is there.
mount_memfs() {
    [ -x "$WORK/memfs" ] || return 0
    is_mounted "$MEMMNT" && { MEMFS=$MEMMNT; return 0; }
    mkdir -p "$MEMMNT"
    "$WORK/memfs" "$MEMMNT" 4 2>>"$WORK/memfs.log" &
    local i
    for i in $(seq 50); do is_mounted "$MEMMNT" && break; sleep 0.1; done
    if is_mounted "$MEMMNT"; then MEMFS=$MEMMNT; else log "WARNING: memfs did not mount"; fi
}

# mount_ptfloor BACKING: the passthrough floor serving BACKING at $PTMNT/data (sets PTFLOOR),
# with pairfs' default number of worker threads.
mount_ptfloor() {
    [ -x "$WORK/ptfloor" ] || return 0
    mkdir -p "$PTMNT"
    "$WORK/ptfloor" "$1" "$PTMNT" 4 2>>"$WORK/ptfloor.log" &
    local i
    for i in $(seq 50); do is_mounted "$PTMNT" && break; sleep 0.1; done
    if is_mounted "$PTMNT"; then PTFLOOR=$PTMNT/data; else log "WARNING: passthrough_floor did not mount"; fi
}

# ---------------------------------------------------------------- small tools
# rec SECTION METRIC PAIRFS BASELINE_NAME BASELINE_VALUE UNIT BETTER NOTE
rec() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "${8:-}" >>"$RES"
    log "  $2: pairfs=$3${4:+  $4=$5} $6${8:+  ($8)}"
}
# jget JSON KEY: a (possibly dotted) key of a JSON object.
jget() { "$PY" -c 'import json,sys
v=json.loads(sys.argv[1])
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$1" "$2"; }
calc() { "$PY" -c "import statistics as st; print($1)"; }
median() { "$PY" -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
now() { echo "$EPOCHREALTIME"; }
since() { calc "$EPOCHREALTIME - $1"; }
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
H() { "$PY" "$helpers" "$@"; }

# fio_run NAME FIO_ARGS... -> summary JSON on stdout
fio_run() {
    local name=$1; shift
    local j=$WORK/fio/$name.json
    fio --name="$name" --ioengine=psync --iodepth=1 --numjobs=1 --fallocate=none \
        --output-format=json --output="$j" "$@" >/dev/null 2>>"$WORK/fio/$name.err" \
        || die "fio $name failed: $(cat "$WORK/fio/$name.err")"
    H fio "$j"
}
# mkfile PATH MIB: a file of random data, written sequentially and fsync'd.
mkfile() {
    rm -f "$1"
    fio_run "mk-$(basename "$1")" --filename="$1" --rw=write --bs=1m --size="${2}m" --end_fsync=1 >/dev/null
}
statef() { getfattr --only-values -n user.pairfs.state "$1" 2>/dev/null; }
state_word() { statef "$1" | awk '{print $1}'; }

# ---------------------------------------------------------------- system description
sysinfo() {
    local disk_dev
    disk_dev=$(df --output=source "$parent" | tail -1)
    "$PY" - "$mode" "$cmdline" "$disk_dev" "$root" "$src_bin" <<'EOF' >"$WORK/system.json"
import json, os, platform, subprocess, sys, datetime
mode, cmd, dev, root, binary = sys.argv[1:6]
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return ""
mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
cpu = sh("awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo")
base = os.path.basename(dev)
rot = sh(f"cat /sys/block/{base}/queue/rotational 2>/dev/null")
model = sh(f"cat /sys/block/{base}/device/model 2>/dev/null") or sh(f"lsblk -dno MODEL {dev} 2>/dev/null")
fstype = sh(f"df --output=fstype {os.path.dirname(root)} | tail -1")
size = sh(f"lsblk -dno SIZE {dev} 2>/dev/null")
print(json.dumps({
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "mode": mode, "command": cmd,
    "host": platform.node(), "nproc": os.cpu_count(), "memory": mem, "cpu": cpu,
    "kernel": platform.release(),
    "disk": f"{dev} ({fstype}, {size or '?'}{', model ' + model if model else ''}"
            f"{', rotational' if rot == '1' else ', non-rotational' if rot == '0' else ''})",
    "git": sh(f"git -C {root} rev-parse --short HEAD") + (" (dirty)" if sh(f"git -C {root} status --porcelain -- src") else ""),
    "pairfs": sh(f"{binary} --version"),
    "fio": sh("fio --version"), "rsync": sh("rsync --version | head -1"),
    "loadavg_at_start": " ".join(open("/proc/loadavg").read().split()[:3]),
}, indent=1))
EOF
}

# ================================================================ sections

sec_seq() {
    log "sequential 1 MiB blocks, ${SEQ_MB} MiB, $SEQ_REPS rep(s): mount vs raw file in the image's directory"
    local -A v=()
    local rep t f r
    for rep in $(seq "$SEQ_REPS"); do
        for t in pairfs raw; do
            if [ "$t" = pairfs ]; then f=$MNT/seq.dat; else f=$WORK/raw-seq.dat; fi
            rm -f "$f"; sync
            r=$(fio_run "seqw-$t-$rep" --filename="$f" --rw=write --bs=1m --size="${SEQ_MB}m")
            v[$t.w]+="$(jget "$r" MBps) "
            sync; rm -f "$f"; sync
            r=$(fio_run "seqwf-$t-$rep" --filename="$f" --rw=write --bs=1m --size="${SEQ_MB}m" --end_fsync=1)
            v[$t.wf]+="$(jget "$r" MBps) "
            dropcaches
            r=$(fio_run "seqr-$t-$rep" --filename="$f" --rw=read --bs=1m --size="${SEQ_MB}m")
            v[$t.r]+="$(jget "$r" MBps) "
            rm -f "$f"
        done
    done
    local sz="${SEQ_MB} MiB"
    mount_memfs
    if [ -n "$MEMFS" ]; then
        for rep in $(seq "$SEQ_REPS"); do
            f=$MEMFS/seq.dat
            r=$(fio_run "seqw-memfs-$rep" --filename="$f" --rw=write --bs=1m --size="${SEQ_MB}m" --end_fsync=1)
            v[memfs.w]+="$(jget "$r" MBps) "
            rm -f "$f"
        done
        # shellcheck disable=SC2086
        rec seq "write $sz + fsync" "$(median ${v[pairfs.wf]})" "FUSE floor (memfs)" "$(median ${v[memfs.w]})" MB/s higher "memfs keeps the bytes in RAM"
        # shellcheck disable=SC2086
        rec seq "FUSE floor: memfs write $sz" "$(median ${v[memfs.w]})" "raw file + fsync" "$(median ${v[raw.wf]})" MB/s higher "no pairfs: the best a FUSE write path reaches here"
    fi
    # shellcheck disable=SC2086
    rec seq "write $sz, no fsync" "$(median ${v[pairfs.w]})" "raw file" "$(median ${v[raw.w]})" MB/s higher "median of $SEQ_REPS"
    # shellcheck disable=SC2086
    rec seq "write $sz + fsync" "$(median ${v[pairfs.wf]})" "raw file" "$(median ${v[raw.wf]})" MB/s higher "median of $SEQ_REPS"
    # shellcheck disable=SC2086
    rec seq "read $sz (cold cache)" "$(median ${v[pairfs.r]})" "raw file" "$(median ${v[raw.r]})" MB/s higher "median of $SEQ_REPS"
}

sec_rand() {
    log "4 KiB random I/O, O_DIRECT, QD1 (psync) and QD16 (libaio), ${RAND_MB} MiB file, ${RAND_RT} each, $RAND_REPS rep(s): mount vs native dir vs passthrough FUSE floor"
    local -A v=()
    local t f r rep k
    local ts=(pairfs native)
    for t in pairfs native; do
        if [ "$t" = pairfs ]; then f=$MNT/rand.dat; else f=$NAT/rand.dat; fi
        mkfile "$f" "$RAND_MB"
    done
    # The floor's backing file lives on the disk beside the native one (not in a FUSE mount).
    if [ -x "$WORK/ptfloor" ]; then
        mkfile "$WORK/ptfloor-back.dat" "$RAND_MB"
        mount_ptfloor "$WORK/ptfloor-back.dat"
        [ -z "$PTFLOOR" ] || ts+=(floor)
    fi
    # Alternate pairfs, native and the floor so that a burst of load elsewhere hits each.
    for rep in $(seq "$RAND_REPS"); do
        for t in "${ts[@]}"; do
            case $t in pairfs) f=$MNT/rand.dat ;; native) f=$NAT/rand.dat ;; floor) f=$PTFLOOR ;; esac
            dropcaches
            r=$(fio_run "rr-$t-$rep" --filename="$f" --rw=randread --bs=4k --direct=1 --size="${RAND_MB}m" --runtime="$RAND_RT" --time_based)
            for k in iops p50_us p99_us; do v[$t.rr.$k]+="$(jget "$r" $k) "; done
            r=$(fio_run "rw-$t-$rep" --filename="$f" --rw=randwrite --bs=4k --direct=1 --size="${RAND_MB}m" --runtime="$RAND_RT" --time_based)
            for k in iops p50_us p99_us; do v[$t.rw.$k]+="$(jget "$r" $k) "; done
            # QD16: libaio (the later --ioengine/--iodepth override fio_run's psync QD1).
            dropcaches
            r=$(fio_run "rr16-$t-$rep" --filename="$f" --rw=randread --bs=4k --direct=1 --size="${RAND_MB}m" --runtime="$RAND_RT" --time_based --ioengine=libaio --iodepth=16)
            for k in iops p50_us p99_us; do v[$t.rr16.$k]+="$(jget "$r" $k) "; done
            r=$(fio_run "rw16-$t-$rep" --filename="$f" --rw=randwrite --bs=4k --direct=1 --size="${RAND_MB}m" --runtime="$RAND_RT" --time_based --ioengine=libaio --iodepth=16)
            for k in iops p50_us p99_us; do v[$t.rw16.$k]+="$(jget "$r" $k) "; done
        done
    done
    rm -f "$MNT/rand.dat" "$NAT/rand.dat"
    if [ -n "$PTFLOOR" ]; then
        fusermount3 -u "$PTMNT" 2>/dev/null || umount -l "$PTMNT"
        PTFLOOR=""
        rm -f "$WORK/ptfloor-back.dat"
    fi
    local name
    local qd
    for k in rr rw rr16 rw16; do
        case $k in rr*) name="randread" ;; *) name="randwrite" ;; esac
        case $k in *16) qd=16; name="$name QD16" ;; *) qd=1 ;; esac
        # shellcheck disable=SC2086
        {
        rec rand "4K $name IOPS" "$(median ${v[pairfs.$k.iops]})" "native dir" "$(median ${v[native.$k.iops]})" IOPS higher "O_DIRECT QD$qd, median of $RAND_REPS"
        rec rand "4K $name p50" "$(median ${v[pairfs.$k.p50_us]})" "native dir" "$(median ${v[native.$k.p50_us]})" us lower
        rec rand "4K $name p99" "$(median ${v[pairfs.$k.p99_us]})" "native dir" "$(median ${v[native.$k.p99_us]})" us lower
        }
        [ -n "${v[floor.$k.iops]:-}" ] || continue
        # shellcheck disable=SC2086
        {
        rec rand "4K $name IOPS" "$(median ${v[pairfs.$k.iops]})" "FUSE floor (passthrough)" "$(median ${v[floor.$k.iops]})" IOPS higher "O_DIRECT QD$qd"
        rec rand "FUSE floor: passthrough 4K $name IOPS" "$(median ${v[floor.$k.iops]})" "native dir" "$(median ${v[native.$k.iops]})" IOPS higher "no pairfs: pread/pwrite of a file of the same disk"
        rec rand "FUSE floor: passthrough 4K $name p50" "$(median ${v[floor.$k.p50_us]})" "native dir" "$(median ${v[native.$k.p50_us]})" us lower
        }
    done
}

sec_meta() {
    log "metadata: $META_N files of 1 KiB: create, stat, readdir, rename, unlink: mount vs native vs tmpfs"
    local p n t
    p=$(H meta "$MNT/meta" "$META_N")
    n=$(H meta "$NAT/meta" "$META_N")
    t=$(H meta "$SHM/meta" "$META_N")
    local m=""
    mount_memfs
    [ -z "$MEMFS" ] || m=$(H meta "$MEMFS/meta" "$META_N")
    local op
    for op in create stat readdir rename unlink; do
        rec meta "$op $META_N files" "$(jget "$p" "$op.ops_per_s")" "native dir" "$(jget "$n" "$op.ops_per_s")" ops/s higher
        rec meta "$op $META_N files" "$(jget "$p" "$op.ops_per_s")" "tmpfs" "$(jget "$t" "$op.ops_per_s")" ops/s higher
        if [ -n "$m" ]; then
            rec meta "$op $META_N files" "$(jget "$p" "$op.ops_per_s")" "FUSE floor (memfs)" "$(jget "$m" "$op.ops_per_s")" ops/s higher
            rec meta "FUSE floor: memfs $op $META_N files" "$(jget "$m" "$op.ops_per_s")" "native dir" "$(jget "$n" "$op.ops_per_s")" ops/s higher "no pairfs: the best a FUSE file system reaches here"
        fi
    done
}

# mkdir_files DIR N: N files of 1 KiB
mkdir_files() {
    "$PY" - "$1" "$2" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
for i in range(n):
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(b"y" * 1024)
EOF
}

sec_split() {
    log "split latency (setxattr alone, median of $SPLIT_REPS; release between) vs cp of the same file"
    local d=$MNT/split
    mkdir -p "$d"
    mkfile "$d/w1m" 1
    mkfile "$d/w$SPLIT_WRITTEN_MB" "$SPLIT_WRITTEN_MB"
    truncate -s 1G "$d/sp1g"
    truncate -s 8G "$d/sp8g"
    truncate -s 64G "$d/sp64g"
    fallocate -l "${SPLIT_FALLOC_MB}M" "$d/fa$SPLIT_FALLOC_MB"
    mkdir_files "$d/dir" "$SPLIT_DIR_N"
    sync
    local items=(
        "w1m|1 MiB written"
        "w$SPLIT_WRITTEN_MB|${SPLIT_WRITTEN_MB} MiB written"
        "sp1g|1 GiB sparse"
        "sp8g|8 GiB sparse"
        "fa$SPLIT_FALLOC_MB|${SPLIT_FALLOC_MB} MiB fallocated"
        "sp64g|64 GiB sparse"
        "dir|dir of $SPLIT_DIR_N files"
    )
    local it name label r ms cps first=""
    for it in "${items[@]}"; do
        name=${it%%|*} label=${it#*|}
        r=$(H split-latency "$d/$name" "$SPLIT_REPS") || die "split of $d/$name failed"
        ms=$(jget "$r" median_ms)
        [ -n "$first" ] || first=$ms
        # The naive backup: cp to a native directory, cold cache.
        dropcaches
        local t0; t0=$(now)
        if [ "$name" = dir ]; then cp -a "$d/$name" "$NAT/cpdst"; else cp "$d/$name" "$NAT/cpdst"; fi
        cps=$(since "$t0")
        rm -rf "$NAT/cpdst"
        rec split "split $label" "$ms" "cp to native dir" "$(calc "$cps * 1000")" ms lower \
            "max $(printf %.2f "$(jget "$r" max_ms)") ms, $(jget "$r" frozen_tracks) tracks, release $(printf %.2f "$(jget "$r" release_median_ms)") ms"
        case $name in
            sp64g | fa* | dir) rec split "split $label / split 1 MiB" "$ms" "split 1 MiB" "$first" ms lower "flatness: 1.0 = flat" ;;
        esac
    done
    # cp --reflink (the cheap naive backup where the filesystem has it).
    local note=""
    if cp --reflink=always "$d/w1m" "$d/w1m.reflink" 2>/dev/null; then note+="pairfs: yes; "; else note+="pairfs: unsupported; "; fi
    cp "$d/w1m" "$NAT/w1m" && if cp --reflink=always "$NAT/w1m" "$NAT/w1m.reflink" 2>/dev/null; then note+="native: yes"; else note+="native: unsupported"; fi
    rec split "cp --reflink=always 1 MiB" "" "" "" "" "" "$note"
    rm -rf "$d" "$NAT"/w1m*
}

sec_update() {
    log "update after changing 0.1%, 1%, 10% of a ${UPD_MB} MiB file's tracks vs rsync --inplace --no-whole-file"
    local f=$MNT/upd dst=$NAT/upd.copy r
    mkfile "$f" "$UPD_MB"
    cp "$f" "$dst"
    dropcaches
    r=$(H split-wait "$f") || die "split of $f failed"
    rec update "initial split+copy of ${UPD_MB} MiB" "$(jget "$r" seconds)" "" "" s lower "$(jget "$r" last_copied) tracks copied"
    local frac pct seed=1 m k up ups rs rsb t0 out
    for frac in 0.001 0.01 0.1; do
        pct=$(calc "'%g%%' % ($frac*100)")
        m=$(H modify "$f" "$frac" "$TRACK" "$seed"); seed=$((seed + 1))
        k=$(jget "$m" tracks_changed)
        dropcaches
        up=$(H update-wait "$f") || die "update of $f failed"
        ups=$(jget "$up" seconds)
        dropcaches
        t0=$(now)
        out=$(rsync --inplace --no-whole-file --stats "$f" "$dst") || die "rsync failed"
        rs=$(since "$t0")
        rsb=$(awk -F': ' '/^Literal data/ {gsub(/[^0-9]/, "", $2); print $2}' <<<"$out")
        rec update "update $pct ($k tracks) time" "$(calc "$ups*1000")" "rsync --inplace" "$(calc "$rs*1000")" ms lower
        rec update "update $pct tracks copied" "$(jget "$up" last_copied)" "tracks changed" "$k" tracks lower "1.0 = proportional"
        rec update "update $pct bytes copied" "$(calc "$(jget "$up" last_copied)*$TRACK/1048576")" "rsync literal data" "$(calc "${rsb:-0}/1048576")" MiB lower
    done
    # The frozen copy (as of the last update) must equal the rsync'd second copy.
    local ok=ok
    cmp -s "$CMNT/upd" "$dst" || ok=FAIL
    rec update "verify frozen copy == rsync copy" "" "" "" "" "" "$ok"
    [ "$ok" = ok ] || log "ERROR: frozen copy $CMNT/upd differs from $dst"
    rm -f "$dst"
    # keep $f for the latency section
}

sec_bgcopy() {
    log "background copy of ${BG_MB} MiB (split -> state split) vs cp+fsync of the same bytes on the native disk"
    local f=$MNT/bg src=$NAT/bg.src dst=$NAT/bg.dst r t0 cps
    mkfile "$f" "$BG_MB"
    mkfile "$src" "$BG_MB"
    dropcaches
    r=$(H split-wait "$f") || die "split of $f failed"
    dropcaches
    t0=$(now)
    cp "$src" "$dst" && sync "$dst"
    cps=$(since "$t0")
    rec bgcopy "background copy ${BG_MB} MiB" "$(calc "$BG_MB*1.048576/$(jget "$r" seconds)")" "cp+fsync native" "$(calc "$BG_MB*1.048576/$cps")" MB/s higher \
        "$(printf %.2f "$(jget "$r" seconds)") s vs $(printf %.2f "$cps") s, $(jget "$r" last_copied) tracks"
    H op "$f" release >/dev/null
    rm -f "$f" "$src" "$dst"
}

sec_latency() {
    log "4 KiB random-write latency (O_DIRECT QD1, ${LAT_RT}): idle vs during background copy / copy-on-write / after split"
    local f=$MNT/upd idle=$MNT/lat.idle
    [ -f "$f" ] || mkfile "$f" "$UPD_MB"
    mkfile "$idle" "$LAT_MB"
    [ "$(state_word "$f")" = none ] || H op "$f" release >/dev/null
    local fl=(--rw=randwrite --bs=4k --direct=1 --runtime="$LAT_RT" --time_based)
    local a1 a2 b c d sb sc
    a1=$(fio_run lat-idle-other --filename="$idle" --size="${LAT_MB}m" "${fl[@]}")
    a2=$(fio_run lat-idle-same --filename="$f" --size="${UPD_MB}m" "${fl[@]}")
    # b: another file while the background copy of $f runs
    H op "$f" split >/dev/null
    b=$(fio_run lat-bgcopy --filename="$idle" --size="${LAT_MB}m" "${fl[@]}")
    sb=$(state_word "$f")
    H wait "$f" split >/dev/null || die "$f never reached state split"
    H op "$f" release >/dev/null
    # c: the file being split itself: copy-on-write of not-yet-copied tracks
    H op "$f" split >/dev/null
    c=$(fio_run lat-cow --filename="$f" --size="${UPD_MB}m" "${fl[@]}")
    sc=$(state_word "$f")
    H wait "$f" split >/dev/null || die "$f never reached state split"
    # d: after the split: writes only set split-diff bits
    d=$(fio_run lat-after --filename="$f" --size="${UPD_MB}m" "${fl[@]}")
    local nb nc
    nb="copy still running at end: $([ "$sb" = splitting ] && echo yes || echo NO)"
    nc="copy still running at end: $([ "$sc" = splitting ] && echo yes || echo NO)"
    rec latency "p50 during bg copy (other file)" "$(jget "$b" p50_us)" "idle" "$(jget "$a1" p50_us)" us lower "$nb"
    rec latency "p99 during bg copy (other file)" "$(jget "$b" p99_us)" "idle" "$(jget "$a1" p99_us)" us lower "target <= 2x idle"
    rec latency "p50 during copy-on-write" "$(jget "$c" p50_us)" "idle, same file" "$(jget "$a2" p50_us)" us lower "$nc"
    rec latency "p99 during copy-on-write" "$(jget "$c" p99_us)" "idle, same file" "$(jget "$a2" p99_us)" us lower
    rec latency "p50 after split (split-diff only)" "$(jget "$d" p50_us)" "idle, same file" "$(jget "$a2" p50_us)" us lower
    rec latency "p99 after split (split-diff only)" "$(jget "$d" p99_us)" "idle, same file" "$(jget "$a2" p99_us)" us lower
    H op "$f" release >/dev/null
    rm -f "$f" "$idle"
}

# PostgreSQL from Debian's packages (postgresql): the newest installed server binaries.
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)

# pg_run DIR PORT [SPLIT_EVERY_S]: a fresh cluster in DIR, pgbench -i, then a TPC-B run;
# prints the tps. With SPLIT_EVERY_S, the data directory is split before the run and
# updated every SPLIT_EVERY_S seconds during it (a backup tool taking frozen copies while
# the database works: every update copies the changed tracks with copy-on-write).
pg_run() {
    local dir=$1 port=$2 every=${3:-} sock
    sock=$(mktemp -d /tmp/pairfs-pg.XXXXXX)
    chown postgres "$sock"
    chmod 755 "$WORK" "$(dirname "$dir")"   # mktemp -d made them 0700; postgres must get in
    mkdir -p "$dir"; chown postgres "$dir"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$dir/data" -A trust >"$WORK/pg-$port.init.log" 2>&1 \
        || die "initdb in $dir failed (see $WORK/pg-$port.init.log)"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -l "$sock/server.log" -w \
        -o "-p $port -k $sock -c listen_addresses= -c shared_buffers=128MB" start >/dev/null \
        || die "postgres in $dir did not start: $(tail -5 "$sock/server.log")"
    runuser -u postgres -- "$PG_BIN/pgbench" -h "$sock" -p "$port" -i -s "$PG_SCALE" -q postgres \
        >"$WORK/pg-$port.bench.log" 2>&1 || die "pgbench -i failed (see $WORK/pg-$port.bench.log)"
    local upd=""
    if [ -n "$every" ]; then
        setfattr -n user.pairfs.split "$dir/data" || die "split of $dir/data failed"
        ( while sleep "$every"; do setfattr -n user.pairfs.update "$dir/data" 2>/dev/null || true; done ) &
        upd=$!
    fi
    runuser -u postgres -- "$PG_BIN/pgbench" -h "$sock" -p "$port" -c "$PG_CLIENTS" -j 2 -T "$PG_T" postgres \
        >>"$WORK/pg-$port.bench.log" 2>&1 || die "pgbench failed (see $WORK/pg-$port.bench.log)"
    [ -z "$upd" ] || { kill "$upd"; wait "$upd" 2>/dev/null || true; }
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    [ -z "$every" ] || setfattr -n user.pairfs.release "$dir/data" 2>/dev/null || true
    rm -rf "$sock" "$dir"
    awk '/^tps = / {printf "%.0f", $3}' "$WORK/pg-$port.bench.log"
}

sec_pgbench() {
    if [ -z "$PG_BIN" ] || ! id postgres >/dev/null 2>&1; then
        log "pgbench: PostgreSQL server not installed (apt-get install postgresql), skipped"
        return
    fi
    log "PostgreSQL pgbench TPC-B, scale $PG_SCALE, $PG_CLIENTS clients, ${PG_T} s: native dir vs pairfs, and with a split updated every 2 s"
    local nat pf pfs bnd=""
    nat=$(pg_run "$NAT/pg" 55433)
    pf=$(pg_run "$MNT/pg" 55434)
    pfs=$(pg_run "$MNT/pgs" 55435 2)
    # The FUSE floor for a database: bindfs (libfuse 3, multithreaded) passing every request
    # through to a native directory, so the same disk and the same file system underneath,
    # plus nothing but FUSE's round trips.
    if command -v bindfs >/dev/null; then
        local bsrc=$NAT/bindfs-src bmnt=$WORK/bindfsmnt
        mkdir -p "$bsrc" "$bmnt"; chmod 755 "$bsrc"
        if bindfs --multithreaded "$bsrc" "$bmnt" 2>>"$WORK/bindfs.log"; then
            bnd=$(pg_run "$bmnt/pg" 55436)
            fusermount3 -u "$bmnt" || umount -l "$bmnt" || true
        else
            log "bindfs did not mount (see $WORK/bindfs.log): FUSE floor row skipped"
        fi
    else
        log "bindfs not installed (apt-get install bindfs): pgbench FUSE floor row skipped"
    fi
    rec pgbench "tps" "$pf" "native dir" "$nat" tps higher "PostgreSQL $($PG_BIN/postgres --version | awk '{print $3}'), synchronous_commit on"
    rec pgbench "tps, data dir split + updated every 2 s" "$pfs" "native dir" "$nat" tps higher "copy-on-write of each update's changed tracks"
    if [ -n "$bnd" ]; then
        rec pgbench "tps" "$pf" "FUSE floor (bindfs)" "$bnd" tps higher "bindfs passthrough to a native dir"
        rec pgbench "FUSE floor: bindfs tps" "$bnd" "native dir" "$nat" tps higher "no pairfs: a passthrough FUSE file system"
    fi
}

rss_of() { awk -v k="$2:" '$1 == k {printf "%.1f", $2/1024}' "/proc/$1/status"; }

sec_rss() {
    local pid
    pid=$(daemon_pid "$VOL")
    if [ -n "$pid" ]; then
        rec rss "daemon RSS after the run above" "$(rss_of "$pid" VmRSS)" "" "" MiB lower "peak (VmHWM) $(rss_of "$pid" VmHWM) MiB; ${VOL_SIZE} volume"
    fi
    log "daemon RSS: 1 TiB sparse volume, 64 KiB tracks, $RSS_PAIRS pairs"
    "$PF" mkfs "$RSSVOL" --size 1T --track-size 64K >/dev/null 2>&1 || die "mkfs of 1 TiB volume failed"
    "$PF" mount "$RSSVOL" "$RSSMNT" --daemon 2>>"$WORK/daemon.log" || die "mount of $RSSVOL failed"
    pid=$(daemon_pid "$RSSVOL")
    [ -n "$pid" ] || die "no daemon pid for $RSSVOL"
    local idle_rss pairs_rss tracks t0 secs
    idle_rss=$(rss_of "$pid" VmRSS)
    t0=$(now)
    tracks=$("$PY" - "$RSSMNT" "$RSS_PAIRS" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{d}/p", exist_ok=True)
data = os.urandom(65536)
for i in range(n):
    p = f"{d}/p/f{i:05d}"
    with open(p, "wb") as f:
        f.write(data)
    os.setxattr(p, "user.pairfs.split", b"")
# plus one 64 GiB sparse file (sparse: no tracks) paired
with open(f"{d}/big", "wb") as f:
    f.truncate(64 << 30)
os.setxattr(f"{d}/big", "user.pairfs.split", b"")
print(n)  # tracks in pairs: one per 64 KiB file
EOF
)
    secs=$(since "$t0")
    sleep 1.5   # let a background commit happen
    pairs_rss=$(rss_of "$pid" VmRSS)
    local target; target=$(calc "64 + ($tracks * 3 / 8) / 1048576")
    rec rss "daemon RSS, 1 TiB volume, idle" "$idle_rss" "target" "$target" MiB lower "64 MiB + 1 bit/track/bitmap"
    rec rss "daemon RSS, 1 TiB volume, $RSS_PAIRS pairs" "$pairs_rss" "target" "$target" MiB lower "peak $(rss_of "$pid" VmHWM) MiB; $RSS_PAIRS files written+split in $(printf %.1f "$secs") s"
    unmount_one "$RSSMNT"
    "$PF" mount "$RSSVOL" "$RSSMNT" --daemon 2>>"$WORK/daemon.log" || die "remount of $RSSVOL failed"
    pid=$(daemon_pid "$RSSVOL")
    local n; n=$(find "$RSSMNT/p" -type f | wc -l)
    sleep 0.5
    rec rss "daemon RSS, 1 TiB volume, after remount" "$(rss_of "$pid" VmRSS)" "target" "$target" MiB lower "$n files, pairs reloaded"
    unmount_one "$RSSMNT"
}

# ================================================================ run
sysinfo
log "work dir $WORK, binary $src_bin ($("$PF" --version)), mode $mode"
"$PF" mkfs "$VOL" --size "$VOL_SIZE" --track-size 64K >/dev/null 2>>"$WORK/daemon.log" || die "mkfs failed"
mount_main
t_start=$(now)
for s in seq rand meta split update bgcopy latency rss pgbench; do
    if want "$s"; then "sec_$s"; fi
done
unmount_one "$CMNT"; unmount_one "$MNT"
log "all sections done in $(printf %.0f "$(since "$t_start")") s"

H report "$RES" "$WORK/system.json" "$out" >"$WORK/table.txt"
echo
"$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); print("\n".join(f"{k}: {v}" for k,v in s.items()))' "$WORK/system.json"
echo
cat "$WORK/table.txt"
echo
log "JSON: $out"

if [ "$mode" = full ] && [ -z "$only" ]; then
    "$PY" - "$WORK/system.json" "$WORK/table.txt" "$here/RESULTS.md" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1])); table = open(sys.argv[2]).read()
# Keep the hand-recorded sections of other scripts (copy_view.sh, nbd.sh, scale.sh, ...),
# which follow the marker line; this script measures none of them.
MARK = "\n<!-- sections below are recorded by hand from other scripts; bench/run.sh keeps them -->\n"
try:
    old = open(sys.argv[3]).read()
    keep = old[old.index(MARK):] if MARK in old else ""
except OSError:
    keep = ""
with open(sys.argv[3], "w") as f:
    f.write("# pairfs benchmark results (latest full run)\n\n")
    f.write(f"Command: `{s['command']}` (from the repository root, as root)  \n")
    f.write(f"Date: {s['date']}  \npairfs: {s['pairfs']} at commit {s['git']}  \n")
    f.write(f"Machine: {s['nproc']} CPUs ({s['cpu']}), {s['memory']} RAM, kernel {s['kernel']}  \n")
    f.write(f"Disk: {s['disk']}  \nTools: {s['fio']}, {s['rsync']}  \n")
    f.write(f"Load average at start: {s['loadavg_at_start']} (other work on the machine makes single figures noisy)\n\n")
    f.write("`pairfs/base` is the pairfs figure divided by the baseline's; `better` says which direction is good.\n")
    f.write("All figures of one row were measured in the same run, one after the other. See README.md for method.\n\n")
    f.write(table)
    f.write(keep)
EOF
    log "wrote $here/RESULTS.md"
fi
