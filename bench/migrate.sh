#!/usr/bin/env bash
# Online migration (`pairfs migrate`) of a volume under a running 4 KiB random writer.
#
#   bench/migrate.sh [--quick] [--no-build] [--nbd]
#
# A volume (VOL_SIZE) holds a FILE_MB MiB file of random bytes, a split directory pair with a
# few files, and the writer's 64 MiB file. Figures:
#   cp of the volume image (page cache dropped first; cp then fsync of the copy)   s, MB/s
#   migration of the volume image to a new file (or, --nbd, an nbdkit export over a
#   Unix socket) while the writer runs: `pairfs migrate --wait`                    s, MB/s
#   the writer (4 KiB pwrite + fdatasync at random offsets, QD1): p50/p99/max and
#   writes/s, idle (before) and during the migration                              ms
#   md5 of every file (main mount and frozen copy) before, after the switch and
#   after a remount with the same command line: must all match
#
# Environment: PAIRFS_BIN (default target/release/pairfs, built unless --no-build),
# BENCH_DIR (parent of the work directory, default /var/tmp; a real disk, not tmpfs),
# FILE_MB (default 1024; --quick 64), VOL_SIZE (default 2G; --quick 256M),
# IDLE_S (writer seconds before the migration, default 10; --quick 3), MIGRATE_BPS (the
# daemon's copy-rate cap PAIRFS_MIGRATE_BPS, bytes/s; default none).
# Needs root (drop_caches, FUSE), python3; nbdkit for --nbd.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
build=1 nbd=0
FILE_MB=${FILE_MB:-} VOL_SIZE=${VOL_SIZE:-} IDLE_S=${IDLE_S:-}
quick=0
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --no-build) build=0 ;;
        --nbd) nbd=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then
    FILE_MB=${FILE_MB:-64} VOL_SIZE=${VOL_SIZE:-256M} IDLE_S=${IDLE_S:-3}
else
    FILE_MB=${FILE_MB:-1024} VOL_SIZE=${VOL_SIZE:-2G} IDLE_S=${IDLE_S:-10}
fi
die() { echo "bench/migrate: $*" >&2; exit 1; }
log() { printf '[migrate %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
[ "$(id -u)" -eq 0 ] || die "must run as root (drop_caches, FUSE)"
command -v python3 >/dev/null || die "python3 not found"
[ "$nbd" = 0 ] || command -v nbdkit >/dev/null || die "nbdkit not found"
if [ -n "${PAIRFS_BIN:-}" ]; then
    pf=$PAIRFS_BIN
else
    [ "$build" = 0 ] || (cd "$root" && cargo build --release -q)
    pf=$root/target/release/pairfs
fi

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/pairfs-migrate.XXXXXX")
VOL=$W/vol.img MNT=$W/mnt CMNT=$W/copies
mkdir -p "$MNT" "$CMNT" "$W/new"
nbd_pid=""
cleanup() {
    [ -z "${writer_pid:-}" ] || kill "$writer_pid" 2>/dev/null || true
    fusermount3 -u "$CMNT" 2>/dev/null || true
    "$pf" umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    [ -z "$nbd_pid" ] || kill "$nbd_pid" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
mountit() {
    PAIRFS_MIGRATE_BPS=${MIGRATE_BPS:-0} PAIRFS_LOG_FILE=$W/daemon.log RUST_LOG=info "$pf" mount "$VOL" "$MNT" --copy-mount "$CMNT" --daemon 2>>"$W/daemon.log" \
        || die "mount failed: $(tail -5 "$W/daemon.log")"
}
sums() { (cd "$MNT" && find . -type f ! -name w.bin -print0 | sort -z | xargs -0 md5sum; \
          cd "$CMNT" && find . -type f -print0 | sort -z | xargs -0 md5sum | sed 's/^/copy /'); }

log "volume $VOL_SIZE, file ${FILE_MB} MiB, work dir $W"
"$pf" mkfs "$VOL" --size "$VOL_SIZE" >/dev/null
mountit
dd if=/dev/urandom of="$MNT/big" bs=1M count="$FILE_MB" conv=fsync status=none
mkdir "$MNT/d"
for i in 1 2 3 4; do head -c $((i * 1000000)) /dev/urandom >"$MNT/d/f$i"; done
"$pf" split "$MNT/d" --wait >/dev/null
for i in 1 2 3 4; do echo "changed after the split" >"$MNT/d/f$i"; done
dd if=/dev/zero of="$MNT/w.bin" bs=1M count=64 conv=fsync status=none
sync

# The writer: 4 KiB pwrite + fdatasync at random offsets until $W/stop exists; then prints
# p50 p99 max (ms) and writes/s.
writer() {
    python3 - "$MNT/w.bin" "$W/stop" "$1" <<'EOF'
import os, random, sys, time
path, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_WRONLY)
size = os.fstat(fd).st_size // 4096
lat = []
t0 = time.monotonic()
buf = bytearray(os.urandom(4096))
while not os.path.exists(stop):
    off = random.randrange(size) * 4096
    buf[0:8] = os.urandom(8)
    t = time.monotonic()
    os.pwrite(fd, buf, off)
    os.fdatasync(fd)
    lat.append((time.monotonic() - t) * 1000)
    if len(lat) == 1:
        open(out + ".started", "w").close()
el = time.monotonic() - t0
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
with open(out, "w") as f:
    if lat:
        f.write(f"{q(0.5):.3f} {q(0.99):.3f} {lat[-1]:.3f} {len(lat) / el:.0f}\n")
    else:
        f.write("- - - 0\n")  # no write completed in the window
EOF
}

log "cp of the image (page cache dropped; cp then fsync of the copy)"
dropcaches
t0=$(date +%s.%N)
cp --sparse=always "$VOL" "$W/cp.img"
sync -d "$W/cp.img" 2>/dev/null || sync
t1=$(date +%s.%N)
cp_s=$(echo "$t1 - $t0" | bc -l)
rm -f "$W/cp.img"

log "writer idle for ${IDLE_S} s"
rm -f "$W/stop"
writer "$W/idle.txt" & writer_pid=$!
sleep "$IDLE_S"
touch "$W/stop"; wait "$writer_pid"; writer_pid=""
sums >"$W/before.txt"

if [ "$nbd" = 1 ]; then
    truncate -s "$(stat -c %s "$VOL")" "$W/new/nbd.img"
    nbdkit -f -U "$W/nbd.sock" file "$W/new/nbd.img" & nbd_pid=$!
    for _ in $(seq 100); do [ -S "$W/nbd.sock" ] && break; sleep 0.05; done
    target="nbd+unix:///?socket=$W/nbd.sock"
else
    target=$W/new/vol.img
fi
log "migration to $target under the writer"
dropcaches
rm -f "$W/stop"
writer "$W/during.txt" & writer_pid=$!
until [ -e "$W/during.txt.started" ]; do sleep 0.01; done
t0=$(date +%s.%N)
"$pf" migrate "$MNT" --to "$target" --wait >"$W/migrate.out" || die "migrate failed: $(cat "$W/migrate.out")"
t1=$(date +%s.%N)
touch "$W/stop"; wait "$writer_pid"; writer_pid=""
mig_s=$(echo "$t1 - $t0" | bc -l)
cat "$W/migrate.out" >&2
sums >"$W/after.txt"
w_sum=$(md5sum <"$MNT/w.bin")
fusermount3 -u "$CMNT"
"$pf" umount "$MNT"
mountit
sums >"$W/remount.txt"
w_sum2=$(md5sum <"$MNT/w.bin")
grep -q "since a migration" "$W/daemon.log" || die "the remount did not follow the recorded location"
ok=yes
cmp -s "$W/before.txt" "$W/after.txt" || ok=NO
cmp -s "$W/before.txt" "$W/remount.txt" || ok=NO
[ "$w_sum" = "$w_sum2" ] || ok=NO
nfiles=$(wc -l <"$W/before.txt")
img_mb=$(( $(stat -c %s "$VOL") / 1048576 ))
alloc_mb=$(( $(stat -c %b "$VOL") * 512 / 1048576 ))
read -r i50 i99 imax iops <"$W/idle.txt"
read -r d50 d99 dmax dops <"$W/during.txt"
printf '\n%-44s %12s\n' "migration ($(basename "$target" | cut -c1-20)), image ${img_mb} MiB (${alloc_mb} MiB allocated)" ""
printf '%-44s %10.2f s  %8.1f MB/s of allocated data\n' "cp of the image + fsync" "$cp_s" "$(echo "$alloc_mb / $cp_s" | bc -l)"
printf '%-44s %10.2f s  %8.1f MB/s of allocated data\n' "pairfs migrate --wait (writer running)" "$mig_s" "$(echo "$alloc_mb / $mig_s" | bc -l)"
printf '%-44s %10s\n' "writer 4K pwrite+fdatasync" "p50 / p99 / max ms, writes/s"
printf '%-44s %10s\n' "  idle" "$i50 / $i99 / $imax, $iops"
printf '%-44s %10s\n' "  during the migration" "$d50 / $d99 / $dmax, $dops"
printf '%-44s %10s\n' "md5 of $nfiles files (+ w.bin) before/after/remount" "$ok"
[ "$ok" = yes ] || die "checksums differ"
