#!/usr/bin/env bash
# Resync after a 10 s outage of the secondary: bytes changed on the primary meanwhile vs
# track data the resync sends. A 2 GiB volume with a 256 MiB file; the secondary is killed;
# during 10 s: a new 64 MiB file and 2000 random 4 KiB overwrites of the big file (fsync'd);
# the link's buffer is 1 MiB (PAIRFS_REPL_BUFFER) so the stream is dropped and the changed
# blocks are marked; then the secondary restarts and the link resyncs. Needs root, /dev/fuse.
# RESTART=umount (a clean unmount) or RESTART=kill (kill -9) stops the primary too before
# the secondary comes back; its next mount resyncs by the persistent bitmap
# (META.repl-bitmap) instead of a full sync.
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../target/release/pairfs}
T=$(mktemp -d /var/tmp/pairfs-bench-resync.XXXXXX); mkdir "$T/m"
SP=
trap 'fusermount3 -u "$T/m" 2>/dev/null || true; [ -n "$SP" ] && kill -9 "$SP" 2>/dev/null; rm -rf "$T"' EXIT
head -c 32 /dev/urandom | base64 > "$T/key"; chmod 600 "$T/key"
"$BIN" mkfs "$T/p.img" --size 2G >/dev/null
PORT=$((30000 + RANDOM % 10000))
"$BIN" replica serve "$T/s.img" --listen 127.0.0.1:$PORT --key-file "$T/key" 2>"$T/s.log" & SP=$!
sleep 0.3
mount_primary() {
  PAIRFS_REPL_BUFFER=1M PAIRFS_LOG_FILE="$T/p.log" RUST_LOG=info "$BIN" mount "$T/p.img" "$T/m" \
      --replica 127.0.0.1:$PORT --key-file "$T/key" --on-disconnect continue --daemon
}
mount_primary
dd if=/dev/urandom of="$T/m/big" bs=1M count=256 conv=fsync status=none
kill -9 "$SP"; wait "$SP" 2>/dev/null || true; SP=
t0=$(date +%s)
dd if=/dev/urandom of="$T/m/new" bs=1M count=64 conv=fsync status=none
python3 - "$T/m/big" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
offs = {random.randrange(0, 256 << 20, 4096) for _ in range(2000)}
for o in offs:
    os.pwrite(fd, os.urandom(4096), o)
os.fsync(fd)
print(f"changed: 64 MiB new file + {len(offs)} distinct 4 KiB blocks = {64 + len(offs) * 4096 / 2**20:.1f} MiB")
PY
sleep $((10 - ($(date +%s) - t0))) 2>/dev/null || true
getfattr -n user.pairfs.replica --only-values "$T/m" 2>/dev/null | grep -o "out_of_sync_bytes=[0-9]* out_of_sync_blocks=[0-9]*"
case "${RESTART:-}" in
  umount) "$BIN" umount "$T/m" ;;
  kill)
    sleep 2.5 # two bitmap checkpoints: the fine bits are on disk
    for pid in $(pgrep -f "mount $T/p.img $T/m"); do kill -9 "$pid"; done
    sleep 0.5
    fusermount3 -u -z "$T/m" 2>/dev/null || true ;;
esac
"$BIN" replica serve "$T/s.img" --listen 127.0.0.1:$PORT --key-file "$T/key" 2>>"$T/s.log" & SP=$!
if [ -n "${RESTART:-}" ]; then
  sleep 0.3
  mount_primary 2>&1 | grep -o "resync by bitmap\|full sync done.*" || true
fi
for _ in $(seq 1 300); do
    getfattr -n user.pairfs.replica --only-values "$T/m" 2>/dev/null | grep -q '^in_sync' && break
    sleep 0.2
done
getfattr -n user.pairfs.replica --only-values "$T/m" 2>/dev/null | cut -d' ' -f1
grep -o "resync sent: .*" "$T/p.log" | tail -1
"$BIN" umount "$T/m"
