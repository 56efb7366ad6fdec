#!/usr/bin/env bash
# The main job of pairfs, end to end: make a volume, mount it, write a file, split it while
# it is being written, read the frozen copy from the copy mount, refresh it with update.
# Sets up what it needs on a fresh Debian machine (fuse3, attr; builds pairfs). Run as root.
#
#   bash examples/demo.sh                          # the build in target/release (cargo build if needed)
#   PAIRFS_BIN=/usr/sbin/pairfs bash examples/demo.sh   # the installed package's binary
#
# Without PAIRFS_BIN it uses target/release/pairfs, building it if cargo is there, else the
# pairfs on PATH (an installed package).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }

if ! command -v setfattr >/dev/null || ! command -v fusermount3 >/dev/null; then
    say "installing fuse3 and attr"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 attr
fi
if [ -n "${PAIRFS_BIN:-}" ]; then
    pairfs=$(command -v "$PAIRFS_BIN") && pairfs=$(realpath "$pairfs") ||
        { echo "PAIRFS_BIN=$PAIRFS_BIN: not found" >&2; exit 2; }
elif [ -x target/release/pairfs ] || command -v cargo >/dev/null; then
    [ -x target/release/pairfs ] || cargo build --release
    pairfs=$PWD/target/release/pairfs
elif command -v pairfs >/dev/null; then
    pairfs=$(command -v pairfs)
else
    echo "no pairfs: set PAIRFS_BIN, install the package, or install cargo to build it" >&2
    exit 2
fi
say "using $pairfs ($("$pairfs" --version))"

work=$(mktemp -d /var/tmp/pairfs-demo.XXXXXX)
chmod 755 "$work"
cleanup() {
    "$pairfs" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt" "$work/copies"

say "pairfs mkfs: a 4 GiB sparse volume with 64 KiB tracks"
"$pairfs" mkfs "$work/vol.img" --size 4G

say "pairfs mount, with the frozen copies served read-only on $work/copies"
"$pairfs" mount "$work/vol.img" "$work/mnt" --copy-mount "$work/copies" --daemon
df -h "$work/mnt"

say "an application writes a 256 MiB file"
dd if=/dev/urandom of="$work/mnt/db.bin" bs=1M count=256 status=none
before=$(sha256sum < "$work/mnt/db.bin")

say "it keeps writing in the background while we split"
( while :; do dd if=/dev/urandom of="$work/mnt/db.bin" bs=64K count=16 seek=$((RANDOM % 4000)) conv=notrunc status=none; done ) &
writer=$!
sleep 0.3
kill -STOP $writer                 # a well-defined instant for the demo's checksum
before=$(sha256sum < "$work/mnt/db.bin")
start=$(date +%s%N)
setfattr -n user.pairfs.split "$work/mnt/db.bin"
end=$(date +%s%N)
kill -CONT $writer
echo "split returned in $(( (end - start) / 1000 )) us"
getfattr --only-values -n user.pairfs.state "$work/mnt/db.bin"; echo

say "the backup side reads the frozen copy while writes go on"
sleep 1
frozen=$(sha256sum < "$work/copies/db.bin")
kill $writer; wait $writer 2>/dev/null || true
now=$(sha256sum < "$work/mnt/db.bin")
echo "at split : $before"
echo "frozen   : $frozen"
echo "now      : $now"
[ "$before" = "$frozen" ] || { echo "FROZEN COPY DIFFERS" >&2; exit 1; }
[ "$now" != "$frozen" ] || { echo "the writer changed nothing?" >&2; exit 1; }

say "pairfs status"
"$pairfs" status "$work/mnt"

say "update: refresh the copy, copying only the tracks that changed"
"$pairfs" update --wait "$work/mnt/db.bin"
[ "$(sha256sum < "$work/copies/db.bin")" = "$now" ] || { echo "update did not refresh the copy" >&2; exit 1; }
echo "copy now equals the file"

say "unmount and check"
"$pairfs" umount "$work/mnt"
"$pairfs" fsck "$work/vol.img"
say "demo passed"
