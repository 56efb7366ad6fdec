#!/usr/bin/env bash
# Metadata at scale: N empty files made through the mount, then remount time and daemon RSS
# (after remount, after `find` of every file, after the kernel dropped its caches), and
# create/stat/readdir/unlink rates at 10,000 files.
#
#   bench/scale.sh [FILES]        default 1000000 (1000 directories of 1000 files);
#                                 0: only the rates at 10,000 files
# Environment: PAIRFS_BIN (default target/release/pairfs), BENCH_DIR (default /work/bench-tmp),
# KEEP=1 keeps the work directory (volume unmounted).
# Needs root (drop_caches). Prints figures on stdout; progress on stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
N=${1:-1000000}
PF=${PAIRFS_BIN:-$here/../target/release/pairfs}
base=${BENCH_DIR:-/work/bench-tmp}
mkdir -p "$base"
WORK=$(mktemp -d "$base/scale.XXXXXX")
cp "$PF" "$WORK/pairfs"; PF=$WORK/pairfs
VOL=$WORK/v.img MNT=$WORK/mnt
mkdir -p "$MNT"
log() { printf '[scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
cleanup() {
    mountpoint -q "$MNT" && { timeout 120 "$PF" umount "$MNT" >/dev/null 2>&1 || fusermount3 -u -z "$MNT" || true; }
    if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
pid_of() { pgrep -f "^$PF mount $VOL " | head -1; }
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$(pid_of)/status"; }
mount_it() {
    local t0 t1
    t0=$(date +%s.%N)
    "$PF" mount "$VOL" "$MNT" --daemon 2>>"$WORK/daemon.log"
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}
umount_it() { "$PF" umount "$MNT" >/dev/null; }

"$PF" mkfs --size 64G "$VOL" >/dev/null
mount_it >/dev/null
if [ "$N" -gt 0 ]; then
log "binary ${PAIRFS_BIN:-target/release/pairfs}; creating $N files"
t0=$(date +%s.%N)
python3 - "$MNT" "$N" <<'PY'
import os, sys
from multiprocessing import Pool
mnt, n = sys.argv[1], int(sys.argv[2])
per = 1000
dirs = (n + per - 1) // per
def mk(d):
    p = os.path.join(mnt, "d%05d" % d)
    os.mkdir(p)
    for i in range(min(per, n - d * per)):
        os.close(os.open(os.path.join(p, "f%04d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
with Pool(4) as pool:
    pool.map(mk, range(dirs), chunksize=4)
PY
t1=$(date +%s.%N)
printf 'files                          %d\n' "$N"
printf 'create through the mount       %.1f s (%.0f files/s)\n' "$(echo "$t1 - $t0" | bc)" "$(echo "$N / ($t1 - $t0)" | bc -l)"
printf 'RSS after create               %s MiB\n' "$(rss)"
umount_it
sync; echo 3 > /proc/sys/vm/drop_caches
printf 'remount (clean)                %.2f s\n' "$(mount_it)"
printf 'RSS after remount              %s MiB\n' "$(rss)"
t0=$(date +%s.%N)
cnt=$(find "$MNT" \( -size +0 -o -true \) -print | wc -l)  # -size stats every name: a lookup of each
t1=$(date +%s.%N)
printf 'find of every file             %.1f s (%d names)\n' "$(echo "$t1 - $t0" | bc)" "$cnt"
printf 'RSS after find                 %s MiB\n' "$(rss)"
sync; echo 3 > /proc/sys/vm/drop_caches; sleep 2
printf 'RSS after drop_caches          %s MiB\n' "$(rss)"
fi
# Rates at 10,000 files in one directory.
python3 - "$MNT/rates" <<'PY'
import os, sys, time
d = sys.argv[1]; os.mkdir(d); n = 10000
def rate(name, f, count=n):
    t = time.time(); f(); dt = time.time() - t
    print("%-30s %.0f /s" % (name + " (10,000 files)", count / dt))
names = [os.path.join(d, "f%05d" % i) for i in range(n)]
rate("create", lambda: [os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)) for p in names])
open("/proc/sys/vm/drop_caches", "w").write("3")
rate("stat (cold kernel cache)", lambda: [os.stat(p) for p in names])
rate("readdir (entries, 20 passes)", lambda: [len(os.listdir(d)) for _ in range(20)], 20 * n)
rate("unlink", lambda: [os.unlink(p) for p in names])
PY
umount_it
