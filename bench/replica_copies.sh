#!/usr/bin/env bash
# The secondary's copy mount (`pairfs replica serve --copy-mount`) on loopback: what a
# backup reading the frozen copies at the second site costs, and what it costs the
# primary's synchronous writes.
#
#   1. A directory of FILES small files and a BIG_MIB file is split on the primary and
#      replicated; time of the first and second `find` of the secondary's copy mount
#      (the first builds the view) against the primary's copy mount.
#   2. 4 KiB random writes + fdatasync (fio, QD1) on the primary, to a file outside the
#      split directory, for SECS seconds: alone; while a backup (tar to /dev/null, in a
#      loop) reads the primary's own copy mount; while it reads the secondary's instead
#      (IOPS, p50/p99 latency, ratios to alone). Both nodes share this machine's CPUs
#      and disk, so a reader costs the primary here wherever it reads.
#   3. The reader's throughput alone and under those writes.
#   4. The secondary's reopens (one per applied commit that a request follows): count,
#      median and max time, how many kept the view (from its debug log).
#
# Usage: bench/replica_copies.sh [--quick] [FILES]; root and /dev/fuse.
# PRIMARY_DIR (default /var/tmp) holds both volumes.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/pairfs}
FILES=100000 BIG_MIB=1024 SECS=10
if [ "${1:-}" = --quick ]; then FILES=2000 BIG_MIB=64 SECS=3; shift; fi
FILES=${1:-$FILES}
T=$(mktemp -d "${PRIMARY_DIR:-/var/tmp}/pairfs-bench-rcopy.XXXXXX")
mkdir -p "$T/pm" "$T/pc" "$T/sc"
cleanup() {
  [ -n "${RP:-}" ] && kill -- -"$RP" 2>/dev/null
  "$BIN" umount "$T/pm" 2>/dev/null || fusermount3 -u "$T/pm" 2>/dev/null || true
  [ -n "${SP:-}" ] && kill "$SP" 2>/dev/null && sleep 0.5
  umount -l "$T/sc" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT
head -c 32 /dev/urandom | base64 > "$T/key"; chmod 600 "$T/key"
PORT=$((20000 + RANDOM % 20000))
# Every small file takes a track (64 KiB) of the volume.
"$BIN" mkfs "$T/p.img" --size $((FILES / 16384 + BIG_MIB * 3 / 1024 + 2))G >/dev/null
RUST_LOG=info,pairfs::repl::follow=debug "$BIN" replica serve "$T/s.img" \
  --listen 127.0.0.1:$PORT --key-file "$T/key" --copy-mount "$T/sc" 2>"$T/s.log" &
SP=$!
sleep 0.5
PAIRFS_LOG_FILE="$T/p.log" "$BIN" mount "$T/p.img" "$T/pm" --copy-mount "$T/pc" \
  --replica 127.0.0.1:$PORT --key-file "$T/key" --daemon 2>/dev/null
in_sync() {
  for _ in $(seq 600); do
    getfattr --only-values -n user.pairfs.replica "$T/pm" 2>/dev/null | grep -q '^in_sync' && return
    sleep 0.1
  done
  echo "not in sync" >&2; exit 1
}
python3 - "$T/pm/d" "$FILES" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for k in range(0, n, 1000):
    sub = os.path.join(d, f"s{k // 1000:03d}")
    os.makedirs(sub, exist_ok=True)
    for i in range(k, min(n, k + 1000)):
        with open(os.path.join(sub, f"f{i}"), "wb") as f:
            f.write(os.urandom(512 + i % 4096))
EOF
dd if=/dev/urandom of="$T/pm/d/big" bs=1M count="$BIG_MIB" conv=fsync status=none
dd if=/dev/zero of="$T/pm/w" bs=1M count=256 conv=fsync status=none
"$BIN" split "$T/pm/d" --wait >/dev/null
in_sync
secs() { local t0; t0=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $t0" | bc; }
p1=$(secs find "$T/pc")
s1=$(secs find "$T/sc")
s2=$(secs find "$T/sc")
n=$(find "$T/sc" | wc -l)
printf 'find of the copy mount (%d objects): primary first %.2f s; secondary first %.2f s (%.2fx), again %.2f s\n' \
  "$n" "$p1" "$s1" "$(echo "$s1 / $p1" | bc -l)" "$s2"
fio_run() { # name -> "iops p50_us p99_us"
  fio --name="$1" --filename="$T/pm/w" --rw=randwrite --bs=4k --size=256M --fdatasync=1 \
    --ioengine=psync --time_based --runtime="$SECS" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]; c=j["clat_ns"]["percentile"]; print("%.0f %.0f %.0f" % (j["iops"], c["50.000000"]/1e3, c["99.000000"]/1e3))'
}
COUNTER='
import os, sys
n, out = 0, sys.argv[1]
while True:
    b = sys.stdin.buffer.read1(1 << 20)
    if not b:
        break
    n += len(b)
    with open(out + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(out + ".tmp", out)
'
reader() { # copy mount: tars it to a byte counter in a loop (its own process group, RP);
  # bytes read so far in $T/read.bytes (a tar of 100,000 files outlasts a phase)
  setsid bash -c 'while :; do tar -cf - -C "$0" d; done | python3 -c "$2" "$1"' \
    "$1" "$T/read.bytes" "$COUNTER" &
  RP=$!
}
stop_reader() { kill -- -"$RP" 2>/dev/null || true; wait "$RP" 2>/dev/null || true; RP=; }
read_rate() { # seconds -> MiB/s of the reader
  rm -f "$T/read.bytes"; local t0; t0=$(date +%s.%N)
  reader "$T/sc"
  sleep "$1"; stop_reader
  echo "$(cat "$T/read.bytes" 2>/dev/null || echo 0) / 1048576 / ($(date +%s.%N) - $t0)" | bc -l
}
alone=$(read_rate "$SECS")
read -r i0 a0 b0 <<<"$(fio_run alone)"
under() { # copy mount -> "iops p50 p99 MiB/s"
  rm -f "$T/read.bytes"
  local t0 r; t0=$(date +%s.%N)
  reader "$1"
  r=$(fio_run "under")
  stop_reader
  echo "$r $(echo "$(cat "$T/read.bytes" 2>/dev/null || echo 0) / 1048576 / ($(date +%s.%N) - $t0)" | bc -l)"
}
read -r i1 a1 b1 _ <<<"$(under "$T/pc")"
read -r i2 a2 b2 r2 <<<"$(under "$T/sc")"
printf 'primary 4k randwrite+fdatasync, sync replica, IOPS (p50/p99 us): alone %s (%s/%s); backup reading the primary copy mount %s (%s/%s) %.2fx; backup reading the secondary copy mount %s (%s/%s) %.2fx\n' \
  "$i0" "$a0" "$b0" "$i1" "$a1" "$b1" "$(echo "$i1 / $i0" | bc -l)" "$i2" "$a2" "$b2" "$(echo "$i2 / $i0" | bc -l)"
printf 'tar of the secondary copy mount: alone %.1f MiB/s; under the primary writes %.1f MiB/s (%.2fx)\n' \
  "$alone" "$r2" "$(echo "$r2 / $alone" | bc -l)"
log=$(grep -o 'opened committed state [0-9]* in [0-9]* us ([a-z ,]*' "$T/s.log" || true)
kept=$(grep -c 'view kept' <<<"$log" || true)
if [ -z "$log" ]; then echo "secondary reopens: none"; exit 0; fi
awk '{print $6}' <<<"$log" | sort -n | awk -v kept="$kept" '{us[NR]=$1} END {
  printf "secondary reopens: %d (view kept in %d), median %.1f ms, max %.1f ms\n", NR, kept, us[int((NR+1)/2)]/1000, us[NR]/1000 }'
