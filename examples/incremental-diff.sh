#!/usr/bin/env bash
# Recipe: incremental backup of a large file with `pairfs diff`: copy only the byte
# ranges changed since the split into a backup copy, check it with cmp, and compare
# bytes read and time with rsync --inplace (whole-file, rsync's default for a local copy,
# and --no-whole-file, its delta algorithm). Run as root (needs fuse3, python3, rsync).
#
#   bash examples/incremental-diff.sh                # 2 GiB file, 1% changed, 64K tracks
#   FILE_MB=512 CHANGE_PCT=1 TRACK=4K bash examples/incremental-diff.sh
#
# Bytes read from the live file are what the pairfs daemon read from the volume image
# for it (its rchar), measured after a remount so no page cache serves the file; that
# figure does not depend on other load. Times do (the machine may be shared).
#
# The file is quiet while its changes are copied: the ranges are "changed since the
# split, up to now", copied from the live file. With writers running, split (or update)
# first and copy from the copy mount — comparing two instants needs named generations.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pairfs=${PAIRFS_BIN:-$PWD/target/release/pairfs}
[ -x "$pairfs" ] || cargo build --release
FILE_MB=${FILE_MB:-2048}
CHANGE_PCT=${CHANGE_PCT:-1}
TRACK=${TRACK:-64K}
say() { printf '\n# %s\n' "$*"; }

work=$(mktemp -d /var/tmp/pairfs-diff-recipe.XXXXXX)
cleanup() {
    "$pairfs" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt" "$work/copies"
"$pairfs" mkfs "$work/vol.img" --size $((FILE_MB * 2 + 1024))M --track-size "$TRACK" >/dev/null
mount_it() { "$pairfs" mount "$work/vol.img" "$work/mnt" --copy-mount "$work/copies" --daemon; }
remount() { "$pairfs" umount "$work/mnt"; mount_it; }
daemon_rchar() {
    local pid
    pid=$(pgrep -f -x "$pairfs mount $work/vol.img $work/mnt --copy-mount $work/copies --daemon" | head -1)
    awk '/^rchar/ {print $2}' "/proc/$pid/io"
}
now() { date +%s.%N; }
mount_it
big=$work/mnt/big

say "a ${FILE_MB} MiB file of random data, its full backup, split"
dd if=/dev/urandom of="$big" bs=1M count="$FILE_MB" status=none
cp "$big" "$work/backup-diff"
cp "$big" "$work/backup-rsync"
cp "$big" "$work/backup-rsync-delta"
"$pairfs" split "$big" --wait

say "${CHANGE_PCT}% of it rewritten in random 4 KiB blocks"
python3 - "$big" "$FILE_MB" "$CHANGE_PCT" <<'PY'
import os, random, sys
path, mb, pct = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
blocks = mb * 256
n = int(blocks * pct / 100)
random.seed(13)
fd = os.open(path, os.O_WRONLY)
for b in random.sample(range(blocks), n):
    os.pwrite(fd, os.urandom(4096), b * 4096)
os.close(fd)
print(f"{n} blocks of 4 KiB rewritten ({n * 4096} bytes)")
PY
remount

say "incremental copy of the changed ranges (pairfs diff)"
r0=$(daemon_rchar); t0=$(now)
"$pairfs" diff --json "$big" >"$work/diff.json"
python3 - "$work/diff.json" "$big" "$work/backup-diff" <<'PY'
import json, os, sys
d = json.load(open(sys.argv[1]))
src = os.open(sys.argv[2], os.O_RDONLY)
dst = os.open(sys.argv[3], os.O_WRONLY)
n = 0
for off, length in d["ranges"]:
    while length > 0:
        buf = os.pread(src, min(length, 1 << 20), off)
        os.pwrite(dst, buf, off)
        off += len(buf); length -= len(buf); n += len(buf)
os.ftruncate(dst, d["size"])
print(f"{len(d['ranges'])} ranges, {n} bytes copied")
PY
t1=$(now); r1=$(daemon_rchar)
cmp "$big" "$work/backup-diff"
echo "backup-diff == live file"
diff_read=$((r1 - r0)); diff_s=$(echo "$t1 - $t0" | bc)
remount

say "rsync --inplace (local: whole file)"
r0=$(daemon_rchar); t0=$(now)
rsync --inplace "$big" "$work/backup-rsync"
t1=$(now); r1=$(daemon_rchar)
cmp "$big" "$work/backup-rsync"
rsync_read=$((r1 - r0)); rsync_s=$(echo "$t1 - $t0" | bc)
remount

say "rsync --inplace --no-whole-file (delta algorithm)"
r0=$(daemon_rchar); t0=$(now)
rsync --inplace --no-whole-file "$big" "$work/backup-rsync-delta"
t1=$(now); r1=$(daemon_rchar)
cmp "$big" "$work/backup-rsync-delta"
delta_read=$((r1 - r0)); delta_s=$(echo "$t1 - $t0" | bc)

say "results (${FILE_MB} MiB file, ${CHANGE_PCT}% changed in 4 KiB blocks, track size ${TRACK})"
printf '%-36s %16s %10s\n' method "bytes read (live)" "time s"
printf '%-36s %16s %10.2f\n' "pairfs diff + range copy" "$diff_read" "$diff_s"
printf '%-36s %16s %10.2f\n' "rsync --inplace" "$rsync_read" "$rsync_s"
printf '%-36s %16s %10.2f\n' "rsync --inplace --no-whole-file" "$delta_read" "$delta_s"
echo "(rsync --no-whole-file also reads the whole backup copy, not counted above)"
