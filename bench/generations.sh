#!/usr/bin/env bash
# Named generations (issue 13 part 1): what a generation costs to take, to write under and to
# keep, and how its cost grows.
#
#   bench/generations.sh [--quick]
#
# One sparse volume (32 GiB, 64 KiB tracks).
#  A. Split latency against scope size: a directory of N files (N = 1,000, 10,000, 100,000;
#     --quick: 1,000 and 10,000) is paired (its forming copy awaited), then generations g1..g8
#     are split one after another (wall time of `pairfs split --generation`, median of the 8),
#     (--quick also shrinks B to a 256 MiB file and 3 s runs: the form CI runs)
#     and the copy mount's first listing of all eight (`find COPY/@g*`, which builds the view:
#     a walk of each generation's unchanged tree) is timed; then the same listing again (the
#     view is current: the traversal alone), and once more after refreshing g8 (`split
#     --generation g8` again: one generation's instant changed, the other seven did not).
#  B. Write cost: a 1 GiB file is paired (forming copy awaited, so the pair itself costs
#     nothing); fio 4 KiB random writes, O_DIRECT, QD1, 8 s each: with no generation; right
#     after one generation (every first overwrite of a track saves it); the same again (most
#     tracks saved already); right after 8 more generations split back to back (one save
#     serves all those that still hold the track). IOPS, p50, p99. Then the same with an
#     fdatasync after every write (the durable cost: each first overwrite's save — a copy,
#     a copy-image sync and a commit — happens inside the fdatasync).
#  C. Space: after B, the tracks saved per generation (shared slots counted for each) against
#     the slots actually stored (`used_bytes` growth of the volume), i.e. what sharing saves.
# Environment: PAIRFS_BIN (default target/release/pairfs), BENCH_DIR (default /var/tmp),
# PARTS (default "A B C"; e.g. PARTS="B C").
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PF=${PAIRFS_BIN:-$here/../target/release/pairfs}
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1
PARTS=${PARTS:-A B C}
FILE_MB=1024
RUNTIME=8
[[ $QUICK == 1 ]] && FILE_MB=256 && RUNTIME=3
part() { [[ " $PARTS " == *" $1 "* ]]; }
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/pairfs-gen-bench.XXXXXX")
MNT=$WORK/mnt
COPY=$WORK/copy
log() { printf '[generations %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cleanup() {
    mountpoint -q "$MNT" 2>/dev/null && { timeout 300 "$PF" umount "$MNT" >/dev/null 2>&1 || fusermount3 -u -z "$MNT" || true; }
    mountpoint -q "$COPY" 2>/dev/null && fusermount3 -u -z "$COPY" || true
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$MNT" "$COPY"
"$PF" mkfs "$WORK/vol.img" --size 32G >/dev/null
"$PF" mount "$WORK/vol.img" "$MNT" --copy-mount "$COPY" --daemon 2>/dev/null

us() { # command... -> wall microseconds
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000))
}
median() { sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]/1000}'; }
waitstate() { # path word
    until getfattr --only-values -n user.pairfs.state "$1" 2>/dev/null | grep -q "^$2 "; do sleep 0.2; done
}
vol_used() { getfattr --absolute-names --only-values -n user.pairfs.volume "$MNT" | tr ' ' '\n' | sed -n 's/^used_bytes=//p'; }

sizes="1000 10000 100000"
[[ $QUICK == 1 ]] && sizes="1000 10000"
part A || sizes=""
[[ -n $sizes ]] && echo "## A. split latency of a generation against the scope size" &&
    printf '%-10s %14s %14s %10s %16s %16s\n' files split_ms_med first_find_s again_s after_refresh_s objects_listed
for n in $sizes; do
    d=$MNT/t$n
    log "making $n files"
    python3 - "$d" "$n" <<'EOF'
import os, sys
top, n = sys.argv[1], int(sys.argv[2])
os.mkdir(top)
per = 1000
for k in range(n):
    sub = f"{top}/{k // per}"
    if k % per == 0:
        os.mkdir(sub)
    with open(f"{sub}/f{k}", "wb") as f:
        f.write(b"g" * 512)
EOF
    "$PF" pair "$d" >/dev/null
    waitstate "$d" formed
    for g in 1 2 3 4 5 6 7 8; do us "$PF" split --generation "g$g" "$d"; done | median >"$WORK/split.ms"
    t0=$(date +%s%N)
    listed=$(find "$COPY"/@g* | wc -l)
    t1=$(date +%s%N)
    find "$COPY"/@g* >/dev/null
    t2=$(date +%s%N)
    "$PF" split --generation g8 "$d" >/dev/null
    t3=$(date +%s%N)
    find "$COPY"/@g* >/dev/null
    t4=$(date +%s%N)
    printf '%-10s %14s %14.2f %10.2f %16.2f %16s\n' "$n" "$(cat "$WORK/split.ms")" \
        "$(echo "($t1 - $t0) / 1000000000" | bc -l)" "$(echo "($t2 - $t1) / 1000000000" | bc -l)" \
        "$(echo "($t4 - $t3) / 1000000000" | bc -l)" "$listed"
    "$PF" release "$d" >/dev/null
done

part B || exit 0
echo
echo "## B. 4 KiB random writes (O_DIRECT, QD1, $RUNTIME s) into a $FILE_MB MiB file under generations"
F=$MNT/big
log "writing $FILE_MB MiB"
dd if=/dev/urandom of="$F" bs=1M count=$FILE_MB conv=fsync status=none
"$PF" pair "$F" >/dev/null
waitstate "$F" formed
runfio() { # label [fio options...]
    local label=$1
    shift
    fio --name=w --filename="$F" --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
        --iodepth=1 --runtime=$RUNTIME --time_based --size=${FILE_MB}M --output-format=json "$@" \
        --output="$WORK/fio.json" >/dev/null 2>&1
    python3 - "$WORK/fio.json" "$label" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]["write"]
p = j["clat_ns"]["percentile"]
print(f"{sys.argv[2]:<44} {j['iops']:>9.0f} {p['50.000000']/1e3:>9.1f} {p['99.000000']/1e3:>10.1f}")
EOF
}
printf '%-44s %9s %9s %10s\n' case iops p50_us p99_us
runfio "no generation"
used0=$(vol_used)
"$PF" split --generation b1 "$F" >/dev/null
runfio "1 generation, just split (first overwrites)"
runfio "1 generation, again (tracks saved already)"
for g in 2 3 4 5 6 7 8 9; do "$PF" split --generation "b$g" "$F" >/dev/null; done
runfio "9 generations, 8 just split"
used1=$(vol_used)
getfattr --absolute-names --only-values -n user.pairfs.generations "$MNT" >"$WORK/gens.txt"
for g in 2 3 4 5 6 7 8 9; do "$PF" release --generation "b$g" "$F" >/dev/null; done
"$PF" release --generation b1 "$F" >/dev/null
runfio "fdatasync each: no generation" --fdatasync=1
"$PF" split --generation d1 "$F" >/dev/null
runfio "fdatasync each: 1 generation, just split" --fdatasync=1
runfio "fdatasync each: 1 generation, again" --fdatasync=1

echo
echo "## C. space after B (before the fdatasync runs)"
python3 -c '
import sys
saved = own = 0
n = 0
for l in sys.stdin:
    f = dict(kv.split("=", 1) for kv in l.split()[1:] if "=" in kv)
    if f.get("path", "").strip("\"") != "/big":
        continue
    n += 1
    saved += int(f["saved_bytes"]); own += int(f["own_bytes"])
print(f"generations {n}: saved bytes summed over them {saved/2**20:.1f} MiB, of which only one generation holds {own/2**20:.1f} MiB")
' <"$WORK/gens.txt"
echo "slots stored (volume used_bytes growth): $(( (used1 - used0) >> 20 )) MiB"
