#!/usr/bin/env bash
# Writable clones (`pairfs clone`, seed 003): clone latency against size, and the space a
# clone uses once 1% of it is rewritten.
#
#   bench/clone.sh
#
# One volume (sparse, 16 GiB, 64 KiB tracks). A 256 MiB and a 4 GiB file (non-zero bytes)
# are written and split (timed; then the background copy of the new pair is awaited); each is cloned five times (`pairfs clone`, wall time of the CLI
# process: fork, setxattr, the daemon's commit) and the median printed, so the two show
# whether the latency is flat in the file size; so is a file of a split tree (cloned from its
# frozen object, no view of the tree is built). A tree of 10,000 files of 4 KiB in 100
# directories is split and cloned three times (median): a directory clone creates one
# inode per object, linear in the number of files. Then 1% of the 4 GiB clone is
# rewritten twice over: (a) 1% of its tracks, 64 KiB-aligned whole tracks at random
# places, and (b) on a second clone, 1% of its bytes as 4 KiB writes at random 4 KiB
# offsets; after each, the clone's allocated bytes (st_blocks) and the volume's used bytes
# (statfs) against before. Last, `pairfs clone --detach` of clone (a) copies the 99% left.
# Environment: PAIRFS_BIN (default target/release/pairfs), BENCH_DIR (default /var/tmp).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PF=${PAIRFS_BIN:-$here/../target/release/pairfs}
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/pairfs-clone-bench.XXXXXX")
MNT=$WORK/mnt
log() { printf '[clone %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cleanup() {
    mountpoint -q "$MNT" 2>/dev/null && { timeout 300 "$PF" umount "$MNT" >/dev/null 2>&1 || fusermount3 -u -z "$MNT" || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$MNT"
"$PF" mkfs "$WORK/vol.img" --size 16G >/dev/null
"$PF" mount "$WORK/vol.img" "$MNT" --daemon 2>/dev/null

ms() { # command... -> wall ms
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000))
}
median() { sort -n | awk '{a[NR]=$1} END {m=a[int((NR+1)/2)]; printf "%.1f", m/1000}'; }
used() { python3 -c 'import os,sys; s=os.statvfs(sys.argv[1]); print((s.f_blocks-s.f_bfree)*s.f_frsize)' "$MNT"; }
alloc() { stat -c %b "$1" | awk '{print $1*512}'; }

fill() { # path bytes
    python3 - "$1" "$2" <<'EOF'
import os, sys
path, n = sys.argv[1], int(sys.argv[2])
chunk = (b"pairfs clone bench " * 55189)[: 1 << 20]
with open(path, "wb", buffering=0) as f:
    i = 0
    while i < n:
        f.write(chunk[: min(len(chunk), n - i)])
        i += len(chunk)
EOF
}

log "writing 256 MiB and 4 GiB files"
fill "$MNT/f256m" $((256 << 20))
fill "$MNT/f4g" $((4 << 30))
split_ms=()
waitsplit() { # the background copy of a new pair is done (steady state before timing)
    until getfattr --only-values -n user.pairfs.state "$1" 2>/dev/null | grep -q '^split '; do sleep 0.5; done
}
for f in f256m f4g; do
    split_ms[${#split_ms[@]}]=$(ms "$PF" split "$MNT/$f")
    waitsplit "$MNT/$f"
done
for f in f256m f4g; do
    for i in 1 2 3 4 5; do ms "$PF" clone "$MNT/$f" "$MNT/$f.c$i"; done | median >"$WORK/$f.ms"
done
log "making 10,000 files"
python3 - "$MNT/tree" <<'EOF'
import os, sys
top = sys.argv[1]
os.mkdir(top)
data = b"x" * 4096
for d in range(100):
    os.mkdir(f"{top}/{d}")
    for f in range(100):
        with open(f"{top}/{d}/{f}", "wb") as fh:
            fh.write(data)
EOF
tree_split=$(ms "$PF" split "$MNT/tree")
waitsplit "$MNT/tree"
# One file of the split tree (before any tree clone builds the frozen view): no view.
for i in 1 2 3 4 5; do ms "$PF" clone "$MNT/tree/50/50" "$MNT/one.c$i"; done | median >"$WORK/one.ms"
for i in 1 2 3; do ms "$PF" clone "$MNT/tree" "$MNT/tree.c$i"; done | median >"$WORK/tree.ms"

log "rewriting 1% of two 4 GiB clones"
u0=$(used)
python3 - "$MNT/f4g.c1" <<'EOF'
import os, random, sys
ts, tracks = 65536, (4 << 30) // 65536
random.seed(1)
fd = os.open(sys.argv[1], os.O_WRONLY)
for t in random.sample(range(tracks), tracks // 100):
    os.pwrite(fd, b"A" * ts, t * ts)
os.fsync(fd)
os.close(fd)
EOF
u1=$(used)
python3 - "$MNT/f4g.c2" <<'EOF'
import os, random, sys
bs, n = 4096, (4 << 30) // 4096
random.seed(2)
fd = os.open(sys.argv[1], os.O_WRONLY)
for b in random.sample(range(n), n // 100):
    os.pwrite(fd, b"B" * bs, b * bs)
os.fsync(fd)
os.close(fd)
EOF
u2=$(used)
a1=$(alloc "$MNT/f4g.c1")
a2=$(alloc "$MNT/f4g.c2")
log "detaching the first 4 GiB clone"
det=$(ms "$PF" clone --detach "$MNT/f4g.c1")
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b/1048576}'; }

echo "clone latency (median wall ms of the pairfs CLI, fork + setxattr + commit):"
printf '  256 MiB file: %s ms   (split first: %.1f ms)\n' "$(cat "$WORK/f256m.ms")" "$(echo "${split_ms[0]}" | awk '{print $1/1000}')"
printf '  4 GiB file:   %s ms   (split first: %.1f ms)\n' "$(cat "$WORK/f4g.ms")" "$(echo "${split_ms[1]}" | awk '{print $1/1000}')"
printf '  one 4 KiB file of the split 10,000-file tree: %s ms\n' "$(cat "$WORK/one.ms")"
printf '  10,000-file tree (100 dirs): %s ms   (split first: %.1f ms)\n' "$(cat "$WORK/tree.ms")" "$(echo "$tree_split" | awk '{print $1/1000}')"
echo "space after rewriting 1% of a 4 GiB clone:"
printf '  (a) 1%% of its tracks, whole 64 KiB tracks: clone allocates %s, volume used +%s (41.0 MiB written)\n' "$(mib "$a1")" "$(mib $((u1 - u0)))"
printf '  (b) 1%% of its bytes, 4 KiB writes:        clone allocates %s, volume used +%s (41.0 MiB written)\n' "$(mib "$a2")" "$(mib $((u2 - u1)))"
printf 'detach of clone (a), 99%% of 4 GiB to copy: %.1f s\n' "$(echo "$det" | awk '{print $1/1e6}')"
