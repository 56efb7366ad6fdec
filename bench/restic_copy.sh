#!/usr/bin/env bash
# restic through the copy mount at scale: a tree of 100,000 small files (100 directories of
# 1,000) is split, every live file is then changed, restic backs up the copy mount, and the
# restore must equal the split-time tree (sha256 of every file). Prints the split time, the
# backup time and the verdict; exit 1 on a mismatch.
#
#   sudo bench/restic_copy.sh        # PAIRFS_BIN (default target/release/pairfs), BENCH_DIR
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
base=${BENCH_DIR:-/work/bench-tmp}
mkdir -p "$base"
D=$(mktemp -d "$base/restic.XXXXXX")
PF=$D/pairfs
cp "${PAIRFS_BIN:-$here/../target/release/pairfs}" "$PF"
cleanup() {
    mountpoint -q "$D/mnt" && { "$PF" umount "$D/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$D/mnt" || true; }
    rm -rf "$D"
}
trap cleanup EXIT
mkdir -p "$D/mnt" "$D/copy"
"$PF" mkfs "$D/vol.img" --size 8G --track-size 4K >/dev/null
"$PF" mount "$D/vol.img" "$D/mnt" --copy-mount "$D/copy" --daemon 2>>"$D/daemon.log"
python3 - "$D/mnt/tree" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    os.makedirs(f"{root}/d{d:03}", exist_ok=True)
    for f in range(1000):
        with open(f"{root}/d{d:03}/f{f:04}", "wb") as fh:
            fh.write((f"{d}-{f}-v1 " * 10).encode())
PY
t0=$(date +%s.%N)
setfattr -n user.pairfs.split "$D/mnt/tree"
echo "split of 100,000 files: $(echo "$(date +%s.%N) - $t0" | bc) s"
(cd "$D/mnt/tree" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$D/before.sum"
python3 - "$D/mnt/tree" <<'PY'
import sys
root = sys.argv[1]
for d in range(100):
    for f in range(1000):
        with open(f"{root}/d{d:03}/f{f:04}", "r+b") as fh:
            fh.write(b"CHANGED")
PY
until getfattr --only-values -n user.pairfs.state "$D/mnt/tree" 2>/dev/null | grep -q '^split '; do sleep 0.2; done
export RESTIC_PASSWORD=bench
restic init -r "$D/repo" >/dev/null
t0=$(date +%s.%N)
restic -r "$D/repo" backup "$D/copy/tree" -q
echo "restic backup of the copy mount: $(echo "$(date +%s.%N) - $t0" | bc) s"
restic -r "$D/repo" restore latest --target "$D/restore" -q
(cd "$D/restore$D/copy/tree" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$D/after.sum"
if cmp -s "$D/before.sum" "$D/after.sum"; then
    echo "restore == split-time tree ($(wc -l <"$D/before.sum") files, every live file changed after the split)"
else
    echo "MISMATCH between the restore and the split-time tree"
    exit 1
fi
