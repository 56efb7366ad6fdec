#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps look unreachable to shellcheck
# pairfs on NBD vs on a local image file: the same volume size, the same fio jobs through the
# pairfs mount, once with the volume and copy image as local files and once with both served by
# nbdkit's file plugin over a Unix socket (from image files in the same directory).
#
#   bench/nbd.sh [--quick] [--no-build]
#
# Figures (median of REPS runs each, through the mount):
#   seq write SEQ_MB MiB, 1 MiB blocks, fsync at the end (fio --end_fsync=1)     MB/s
#   seq read  SEQ_MB MiB after drop_caches (also drops the server's page cache)   MB/s
#   4 KiB random write / read, O_DIRECT, QD1, RAND_RT seconds over RAND_MB MiB    IOPS
# and the ratio nbd/local for each.
#
# Environment: PAIRFS_BIN (binary; default target/release/pairfs, built unless --no-build),
# BENCH_DIR (parent of the work directory, default /var/tmp; must be a real disk),
# REPS (default 3), SEQ_MB (512), RAND_MB (256), RAND_RT (8).
# Needs root, fio, nbdkit, python3, /dev/fuse.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
build=1
REPS=${REPS:-3} SEQ_MB=${SEQ_MB:-512} RAND_MB=${RAND_MB:-256} RAND_RT=${RAND_RT:-8}
while [ $# -gt 0 ]; do
    case $1 in
        --quick) REPS=1 SEQ_MB=64 RAND_MB=32 RAND_RT=2 ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
die() { echo "bench/nbd: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (drop_caches, FUSE)"
for c in fio nbdkit python3; do command -v "$c" >/dev/null || die "$c not found"; done
if [ -n "${PAIRFS_BIN:-}" ]; then
    pairfs=$PAIRFS_BIN
else
    [ "$build" = 0 ] || (cd "$root" && cargo build --release -q)
    pairfs=$root/target/release/pairfs
fi

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/pairfs-nbd-bench.XXXXXX")
nbdkit_pid=""
cleanup() {
    for m in "$work"/local/mnt "$work"/nbd/mnt; do
        if mountpoint -q "$m" 2>/dev/null; then "$pairfs" umount "$m" || umount -l "$m" || true; fi
    done
    [ -z "$nbdkit_pid" ] || kill "$nbdkit_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
size_mb=$((SEQ_MB + RAND_MB + 512))

# fio_json NAME ARGS... -> the fio JSON file
fio_json() {
    local name=$1; shift
    fio --name="$name" --ioengine=psync --iodepth=1 --numjobs=1 --fallocate=none \
        --output-format=json --output="$work/$name.json" "$@" >/dev/null
    echo "$work/$name.json"
}
# field FILE read|write bw|iops
field() {
    python3 -c 'import json,sys
j=json.load(open(sys.argv[1]))["jobs"][0][sys.argv[2]]
print(j["bw_bytes"]/1e6 if sys.argv[3]=="bw" else j["iops"])' "$1" "$2" "$3"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A R
measure() { # SETUP MOUNTPOINT
    local s=$1 m=$2 sw=() sr=() rw=() rr=() r
    for r in $(seq "$REPS"); do
        rm -f "$m/seq"
        sw+=("$(field "$(fio_json "$s-sw-$r" --filename="$m/seq" --rw=write --bs=1m --size="${SEQ_MB}m" --end_fsync=1)" write bw)")
        sync; echo 3 >/proc/sys/vm/drop_caches
        sr+=("$(field "$(fio_json "$s-sr-$r" --filename="$m/seq" --rw=read --bs=1m --size="${SEQ_MB}m")" read bw)")
    done
    rm -f "$m/seq"
    for r in $(seq "$REPS"); do
        rw+=("$(field "$(fio_json "$s-rw-$r" --filename="$m/rand" --rw=randwrite --bs=4k --direct=1 --size="${RAND_MB}m" --runtime="$RAND_RT" --time_based)" write iops)")
        rr+=("$(field "$(fio_json "$s-rr-$r" --filename="$m/rand" --rw=randread --bs=4k --direct=1 --size="${RAND_MB}m" --runtime="$RAND_RT" --time_based)" read iops)")
    done
    R[$s,sw]=$(median "${sw[@]}") R[$s,sr]=$(median "${sr[@]}")
    R[$s,rw]=$(median "${rw[@]}") R[$s,rr]=$(median "${rr[@]}")
}

echo "bench/nbd: $(date -u '+%F %H:%M UTC'), $("$pairfs" --version), $(nbdkit --version), $(fio --version)"
echo "bench/nbd: REPS=$REPS SEQ_MB=$SEQ_MB RAND_MB=$RAND_MB RAND_RT=$RAND_RT, volume ${size_mb} MiB, in $work"

# Local image files.
mkdir -p "$work/local/mnt"
"$pairfs" mkfs "$work/local/vol.img" --size "${size_mb}M" >/dev/null
"$pairfs" mount "$work/local/vol.img" "$work/local/mnt" --daemon
measure local "$work/local/mnt"
"$pairfs" umount "$work/local/mnt"

# The same through nbdkit's file plugin over a Unix socket (one server, two exports would
# need the exportname filter: two servers are simpler).
mkdir -p "$work/nbd/mnt"
truncate -s "${size_mb}M" "$work/nbd/vol.img" "$work/nbd/copy.img"
nbdkit -f -U "$work/nbd/v.sock" file "$work/nbd/vol.img" & nbdkit_pid=$!
nbdkit -f -U "$work/nbd/c.sock" file "$work/nbd/copy.img" & nbdkit_pid="$nbdkit_pid $!"
for _ in $(seq 100); do [ -S "$work/nbd/v.sock" ] && [ -S "$work/nbd/c.sock" ] && break; sleep 0.05; done
vol="nbd+unix:///?socket=$work/nbd/v.sock" copy="nbd+unix:///?socket=$work/nbd/c.sock"
"$pairfs" mkfs "$vol" --meta "$work/nbd/vol.meta" --copy "$copy" >/dev/null
"$pairfs" mount "$vol" --meta "$work/nbd/vol.meta" --copy "$copy" "$work/nbd/mnt" --daemon
measure nbd "$work/nbd/mnt"
"$pairfs" umount "$work/nbd/mnt"
# shellcheck disable=SC2086
kill $nbdkit_pid; wait 2>/dev/null || true; nbdkit_pid=""

printf '\n%-46s %8s %10s %10s %8s\n' "figure (through the pairfs mount)" unit local nbd nbd/local
row() {
    printf '%-46s %8s %10.0f %10.0f %7.2fx\n' "$1" "$2" "${R[local,$3]}" "${R[nbd,$3]}" \
        "$(python3 -c "print(${R[nbd,$3]}/${R[local,$3]})")"
}
row "seq write ${SEQ_MB} MiB + fsync" MB/s sw
row "seq read ${SEQ_MB} MiB (cold cache)" MB/s sr
row "4 KiB random write (O_DIRECT, QD1)" IOPS rw
row "4 KiB random read (O_DIRECT, QD1)" IOPS rr
