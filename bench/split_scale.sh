#!/usr/bin/env bash
# Split latency of an already paired (formed) directory tree, and the worst write stall of a
# writer inside the tree, as the tree grows (issue 15: a split must not grow with the tree).
#
#   bench/split_scale.sh [--quick] [N...]   default 10000 100000 1000000; --quick: 10000 only
#
# Per N: mkfs, mount, N empty files made through the mount in directories of 1000 (plus one
# writer file), `user.pairfs.pair` on the tree's top, wait until `formed`; then, while one
# thread rewrites 100 bytes of the writer file in a loop (pwrite, timed one by one), time
# `setxattr user.pairfs.split` on the top (in process, perf_counter); wait for `split`; the
# same for `user.pairfs.update`, five times. Prints a table: split latency, update latency
# (median of 5), the worst single write during the split and during the updates (ms), the
# worst single write in three 0.6 s windows with no operation (the writer's own baseline on
# this machine), the pairing time (s), and the split's growth against the first N.
# Environment: PAIRFS_BIN (default target/release/pairfs), BENCH_DIR (default /work/bench-tmp),
# KEEP=1 keeps the work directories, SCOPE=root pairs and splits the whole volume (the mount
# root) instead of the tree's top, and then times `pairfs mount-snapshot` (mount_snap_ms: it
# copies the metadata database) and checks the snapshot holds every file. Progress on stderr.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sizes=()
for a in "$@"; do
    case $a in
    --quick) sizes=(10000) ;;
    *) sizes+=("$a") ;;
    esac
done
[ ${#sizes[@]} -gt 0 ] || sizes=(10000 100000 1000000)
PF0=${PAIRFS_BIN:-$here/../target/release/pairfs}
base=${BENCH_DIR:-/work/bench-tmp}
mkdir -p "$base"
log() { printf '[split_scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
WORK= MNT= PF=
cleanup() {
    [ -n "$MNT" ] && mountpoint -q "$MNT" && { timeout 120 "$PF" umount "$MNT" >/dev/null 2>&1 || fusermount3 -u -z "$MNT" || true; }
    if [ -n "$WORK" ]; then if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi; fi
}
trap cleanup EXIT

one() { # N -> "split_ms split_stall_ms update_ms update_stall_ms create_s pair_s"
    local n=$1
    WORK=$(mktemp -d "$base/split_scale.XXXXXX")
    cp "$PF0" "$WORK/pairfs"; PF=$WORK/pairfs
    local vol=$WORK/v.img
    MNT=$WORK/mnt
    mkdir -p "$MNT"
    "$PF" mkfs --size 64G "$vol" >/dev/null
    "$PF" mount "$vol" "$MNT" --daemon 2>>"$WORK/daemon.log"
    log "N=$n: creating files"
    python3 - "$MNT" "$n" <<'PY' >&2
import os, sys, time
from multiprocessing import Pool
mnt, n = sys.argv[1], int(sys.argv[2])
top = os.path.join(mnt, "tree"); os.mkdir(top)
per = 1000
def mk(d):
    p = os.path.join(top, "d%05d" % d); os.mkdir(p)
    for i in range(min(per, n - d * per)):
        os.close(os.open(os.path.join(p, "f%04d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
t = time.time()
with Pool(4) as pool:
    pool.map(mk, range((n + per - 1) // per), chunksize=4)
os.mkdir(os.path.join(top, "w"))
with open(os.path.join(top, "w", "file"), "wb") as f:
    f.write(b"x" * 65536)
print("created %d files in %.1f s" % (n, time.time() - t))
PY
    local top=$MNT/tree
    [ "${SCOPE:-dir}" = root ] && top=$MNT
    python3 - "$top" "$n" "$MNT/tree" <<'PY'
import os, sys, threading, time
top, n, tree = sys.argv[1], int(sys.argv[2]), sys.argv[3]
P = "user.pairfs."
def state():
    return os.getxattr(top, P + "state").decode().split()[0]
def wait(want, limit=3600):
    t = time.time()
    while state() != want:
        if time.time() - t > limit:
            raise SystemExit("timeout waiting for " + want)
        time.sleep(0.01)
t = time.perf_counter(); os.setxattr(top, P + "pair", b""); pair_s = time.perf_counter() - t
wait("formed")
fd = os.open(os.path.join(tree, "w", "file"), os.O_WRONLY)
def timed_op(name):
    """Worst single write in a 0.6 s window with `name` run in its middle (None: no op,
    the writer's own worst case as a baseline)."""
    stop = threading.Event(); worst = [0.0]
    def writer():
        k = 0
        while not stop.is_set():
            t = time.perf_counter()
            os.pwrite(fd, b"y" * 100, (k * 100) % 65000)
            worst[0] = max(worst[0], time.perf_counter() - t)
            k += 1
    th = threading.Thread(target=writer); th.start()
    time.sleep(0.3)
    t = time.perf_counter()
    if name:
        os.setxattr(top, P + name, b"")
    dt = time.perf_counter() - t
    time.sleep(0.3)
    stop.set(); th.join()
    if name:
        wait("split")
    return dt * 1e3, worst[0] * 1e3
idle = max(timed_op(None)[1] for _ in range(3))
s, sw = timed_op("split")
ups = [timed_op("update") for _ in range(5)]
u = sorted(x[0] for x in ups)[2]
uw = max(x[1] for x in ups)
print("%.2f %.2f %.2f %.2f %.2f %.2f" % (s, sw, u, uw, idle, pair_s), end=" ")
PY
    local snap_ms=-
    if [ "${SCOPE:-dir}" = root ]; then
        # What a whole-volume split moved out of the split: mount-snapshot copies the
        # metadata database when it mounts. Timed to the mount being served, checked whole.
        mkdir -p "$WORK/snap"
        local t0 t1
        t0=$(date +%s%N)
        "$PF" mount-snapshot "$vol" "$WORK/snap" --daemon 2>>"$WORK/daemon.log"
        t1=$(date +%s%N)
        snap_ms=$(( (t1 - t0) / 1000000 ))
        local got
        got=$(find "$WORK/snap/tree" -type f | wc -l)
        [ "$got" -eq $((n + 1)) ] || { log "snapshot shows $got files, expected $((n + 1))"; exit 1; }
        "$PF" umount "$WORK/snap" >/dev/null
    fi
    echo "$snap_ms"
    "$PF" umount "$MNT" >/dev/null
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; fi
    WORK= MNT=
}

printf '%-10s %10s %13s %14s %14s %13s %8s %8s %15s\n' files split_ms split_worst_w update_ms_p50 update_worst_w idle_worst_w pair_s growth mount_snap_ms
first=
for n in "${sizes[@]}"; do
    read -r s sw u uw idle p sm < <(one "$n")
    [ -n "$first" ] || first=$s
    printf '%-10s %10s %13s %14s %14s %13s %8s %7.1fx %15s\n' "$n" "$s" "$sw" "$u" "$uw" "$idle" "$p" "$(echo "$s / $first" | bc -l)" "$sm"
done
