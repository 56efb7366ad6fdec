#!/usr/bin/env bash
# Replication cost on loopback: 4 KiB writes each followed by fdatasync (dd oflag=dsync)
# and a 256 MiB sequential write with one fsync at the end, with no replica, a sync
# replica and an async replica (pairfs replica serve on 127.0.0.1).
# Usage: bench/replica.sh [COUNT_4K] ; needs root and /dev/fuse. Prints one line per case.
# DELAY_MS=N adds N ms one way in each direction (bench/delay_proxy.py between the nodes;
# tc netem is not available on every machine).
# PRIMARY_DIR (default /var/tmp) holds the primary volume.
# SECONDARY_DIR=/dev/shm puts the secondary's images on another device (tmpfs), so the
# figures show the link's cost rather than the one disk written twice.
set -euo pipefail
BIN=${BIN:-$(dirname "$0")/../target/release/pairfs}
N=${1:-2000}
T=$(mktemp -d "${PRIMARY_DIR:-/var/tmp}/pairfs-bench-repl.XXXXXX")
mkdir -p "$T/m"
S=${SECONDARY_DIR:-$T}
S=$(mktemp -d "$S/pairfs-bench-repl-s.XXXXXX")
trap 'fusermount3 -u "$T/m" 2>/dev/null || true; [ -n "${SP:-}" ] && kill -9 "$SP" 2>/dev/null; [ -n "${DP:-}" ] && kill -9 "$DP" 2>/dev/null; rm -rf "$T" "$S"' EXIT
head -c 32 /dev/urandom | base64 > "$T/key"; chmod 600 "$T/key"
PORT=$((20000 + RANDOM % 20000))
run() { # name, mount args...
  local name=$1; shift
  rm -f "$T"/p.img* "$S"/s.img*
  "$BIN" mkfs "$T/p.img" --size 2G >/dev/null
  if [ "$name" != none ]; then
    "$BIN" replica serve "$S/s.img" --listen 127.0.0.1:$PORT --key-file "$T/key" 2>/dev/null &
    SP=$!
    sleep 0.3
    if [ -n "${DELAY_MS:-}" ]; then
      python3 "$(dirname "$0")/delay_proxy.py" $((PORT + 10000)) 127.0.0.1:$PORT "$DELAY_MS" &
      DP=$!
      sleep 0.3
      set -- "${@/127.0.0.1:$PORT/127.0.0.1:$((PORT + 10000))}"
    fi
  fi
  "$BIN" mount "$T/p.img" "$T/m" --daemon "$@"
  local t0 t1 t2
  t0=$(date +%s.%N)
  dd if=/dev/zero of="$T/m/small" bs=4k count="$N" oflag=dsync status=none
  t1=$(date +%s.%N)
  dd if=/dev/urandom of="$T/m/big" bs=1M count=256 conv=fsync status=none
  t2=$(date +%s.%N)
  "$BIN" umount "$T/m"
  if [ "$name" != none ]; then kill "$SP"; wait "$SP" 2>/dev/null || true; SP=; fi
  if [ -n "${DP:-}" ]; then kill "$DP"; wait "$DP" 2>/dev/null || true; DP=; fi
  awk -v n="$N" -v a="$t0" -v b="$t1" -v c="$t2" -v name="$name" -v d="${DELAY_MS:-0}" 'BEGIN {
    printf "%-6s delay=%sms 4k+fdatasync: %7.0f us/write (%5.0f IOPS)   256MiB seq+fsync: %6.1f MiB/s\n",
      name, d, (b-a)*1e6/n, n/(b-a), 256/(c-b) }'
  PORT=$((PORT + 1))
}
run none
run sync --replica 127.0.0.1:$PORT --key-file "$T/key"
run async --replica 127.0.0.1:$PORT --key-file "$T/key" --replica-mode async
