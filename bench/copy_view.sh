#!/bin/bash
# Backup through the copy mount vs the same tool on the live tree, in one run (issue 9).
#
#   sudo bench/copy_view.sh [FILES] [BIG_MIB]
#
# FILES small files (100 bytes each, 1,000 per subdirectory; default 100000) in a split
# directory: `tar -cf - DIR | cat >/dev/null` on the live tree, then through the copy mount.
# A split file of BIG_MIB MiB (default 1024; 0 skips it): `cat` live vs copy mount.
# The page cache is dropped before every timed run; live and copy runs alternate, REPS
# times each (default 3), and the best of each is reported (the machine is shared and
# noisy). Volume with 4 KiB tracks.
# PAIRFS_BIN picks the binary (default target/release/pairfs, not rebuilt here);
# BENCH_DIR the parent of the work directory (default /work/bench-tmp, on the real disk).
set -euo pipefail
FILES=${1:-100000}
BIG=${2:-1024}
REPS=${REPS:-3}
BIN=${PAIRFS_BIN:-$(dirname "$0")/../target/release/pairfs}
BIN=$(readlink -f "$BIN")
BASE=${BENCH_DIR:-/work/bench-tmp}
mkdir -p "$BASE"
W=$(mktemp -d "$BASE/copy-view.XXXXXX")
cleanup() {
    "$BIN" umount "$W/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$W/mnt" 2>/dev/null || true
    fusermount3 -u -z "$W/copy" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
mkdir "$W/mnt" "$W/copy"
size_g=$(( (FILES * 4096 / 1048576 + BIG * 2) / 1024 + 2 ))
"$BIN" mkfs "$W/v.img" --size "${size_g}G" --track-size 4K >/dev/null
"$BIN" mount "$W/v.img" "$W/mnt" --copy-mount "$W/copy" --daemon >/dev/null 2>&1

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc; }

echo "binary: $BIN ($("$BIN" --version 2>/dev/null || echo '?'))" >&2
echo "creating $FILES files" >&2
t0=$(now)
python3 - "$W/mnt/tree" "$FILES" <<'EOF'
import os, sys
top, n = sys.argv[1], int(sys.argv[2])
os.mkdir(top)
for k in range(n):
    d = os.path.join(top, "d%04d" % (k // 1000))
    if k % 1000 == 0:
        os.mkdir(d)
    with open(os.path.join(d, "f%06d" % k), "wb") as f:
        f.write(b"x" * 99 + b"\n")
EOF
echo "created in $(elapsed "$t0" "$(now)") s" >&2
t0=$(now)
setfattr -n user.pairfs.split "$W/mnt/tree"
split_s=$(elapsed "$t0" "$(now)")
until getfattr --absolute-names --only-values -n user.pairfs.state "$W/mnt/tree" | grep -q '^split '; do sleep 0.2; done

tar_time() {
    drop
    local t0 t1
    t0=$(now)
    (cd "$1" && tar -cf - tree | cat >/dev/null)
    t1=$(now)
    elapsed "$t0" "$t1"
}
best() { echo "if ($1 < $2) $1 else $2" | bc; }
live=999999
copy=999999
for _ in $(seq "$REPS"); do
    live=$(best "$live" "$(tar_time "$W/mnt")")
    copy=$(best "$copy" "$(tar_time "$W/copy")")
done
n_copy=$(cd "$W/copy" && find tree -type f | wc -l)
[ "$n_copy" -eq "$FILES" ] || { echo "copy mount shows $n_copy files, want $FILES" >&2; exit 1; }
printf 'tar of %d small files: live %.2f s, copy mount %.2f s, copy speed = %.2fx live (split took %.3f s)\n' \
    "$FILES" "$live" "$copy" "$(echo "$live / $copy" | bc -l)" "$split_s"

if [ "$BIG" -gt 0 ]; then
    dd if=/dev/urandom of="$W/mnt/big" bs=1M count="$BIG" status=none
    sync
    setfattr -n user.pairfs.split "$W/mnt/big"
    until getfattr --absolute-names --only-values -n user.pairfs.state "$W/mnt/big" | grep -q '^split '; do sleep 0.2; done
    cat_time() {
        drop
        local t0
        t0=$(now)
        cat "$1" >/dev/null
        elapsed "$t0" "$(now)"
    }
    bl=999999
    bc_=999999
    for _ in $(seq "$REPS"); do
        bl=$(best "$bl" "$(cat_time "$W/mnt/big")")
        bc_=$(best "$bc_" "$(cat_time "$W/copy/big")")
    done
    printf 'cat of a split %d MiB file: live %.2f s (%.0f MiB/s), copy mount %.2f s (%.0f MiB/s), copy speed = %.2fx live\n' \
        "$BIG" "$bl" "$(echo "$BIG / $bl" | bc -l)" "$bc_" "$(echo "$BIG / $bc_" | bc -l)" \
        "$(echo "$bl / $bc_" | bc -l)"
fi
