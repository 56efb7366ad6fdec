#!/bin/bash
# Cost of checksummed copies (issue 13 part 3), sums on vs off in one run:
#
#   sudo bench/sums.sh [MIB] [REPS]
#
# - background copy: `pairfs split FILE --wait` of a freshly written MIB MiB file of random
#   data (the whole file is copied by the copier in the splitting state: batches, confirms,
#   sums recorded and committed with the cleared bits); MB/s of copied data;
# - copy-mount sequential read: `dd bs=1M` of the frozen file through the copy mount after a
#   remount (no FUSE page cache; the copy image itself is in the host page cache, so this is
#   the CPU-bound worst case for verification); MB/s;
# - the verified-track cache: the read on a volume with 1 MiB tracks, with O_DIRECT 128 KiB
#   reads (each request to the daemon is an eighth of a track), PAIRFS_SUMS_CACHE=0 vs the
#   default.
# Daemon CPU seconds (user + system, /proc/PID/stat) are printed beside each figure: the
# machine is shared, wall-clock rates are noisy, CPU time much less so.
# Sums off = PAIRFS_SUMS=off in the daemon's environment (nothing computed, stored or
# verified). On and off alternate REPS times (default 3); medians are printed.
# PAIRFS_BIN picks the binary; BENCH_DIR the parent of the work directory (default
# /work/bench-tmp, on the real disk).
set -euo pipefail
MIB=${1:-1024}
REPS=${2:-3}
BIN=${PAIRFS_BIN:-$(dirname "$0")/../target/release/pairfs}
BIN=$(readlink -f "$BIN")
BASE=${BENCH_DIR:-/work/bench-tmp}
mkdir -p "$BASE"
W=$(mktemp -d "$BASE/sums.XXXXXX")
cleanup() {
    "$BIN" umount "$W/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$W/mnt" 2>/dev/null || true
    fusermount3 -u -z "$W/copy" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
mkdir "$W/mnt" "$W/copy"
head -c $((MIB << 20)) /dev/urandom >"$W/data"
now() { date +%s.%N; }
mbps() { echo "scale=1; $MIB / ($2 - $1)" | bc; }

# CPU seconds (user + system) the daemon has used so far: a figure other load barely moves.
cpu() {
    local pid
    pid=$(pgrep -f -x "$BIN mount $W/vol.img $W/mnt --copy-mount $W/copy --daemon" | head -1)
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$pid/stat"
}
# run TRACK ENV... : fresh volume, write, split --wait (timed), remount, read (timed);
# prints copy MB/s, read MB/s, daemon CPU s of the copy, daemon CPU s of the read.
run() {
    local track=$1; shift
    rm -f "$W"/vol.img*
    "$BIN" mkfs "$W/vol.img" --size $((MIB * 3 + 1024))M --track-size "$track" >/dev/null
    env "$@" "$BIN" mount "$W/vol.img" "$W/mnt" --copy-mount "$W/copy" --daemon 2>/dev/null
    dd if="$W/data" of="$W/mnt/f" bs=1M status=none conv=fsync
    local t0 t1 t2 t3 c0 c1 c2 c3
    c0=$(cpu); t0=$(now)
    "$BIN" split "$W/mnt/f" --wait >/dev/null
    t1=$(now); c1=$(cpu)
    "$BIN" umount "$W/mnt" >/dev/null
    env "$@" "$BIN" mount "$W/vol.img" "$W/mnt" --copy-mount "$W/copy" --daemon 2>/dev/null
    cat "$W/vol.img.copy" >/dev/null # the copy image in the page cache for both runs
    c2=$(cpu); t2=$(now)
    # shellcheck disable=SC2086
    dd if="$W/copy/f" of=/dev/null ${DD_READ:-bs=1M} status=none
    t3=$(now); c3=$(cpu)
    "$BIN" umount "$W/mnt" >/dev/null
    echo "$(mbps "$t0" "$t1") $(mbps "$t2" "$t3") $(echo "$c1 - $c0" | bc) $(echo "$c3 - $c2" | bc)"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -a on_copy on_read off_copy off_read c_on c_off on_cc off_cc on_rc off_rc cc_on cc_off
for i in $(seq "$REPS"); do
    read -r c r x y < <(run 64K PAIRFS_SUMS=on); on_copy+=("$c"); on_read+=("$r"); on_cc+=("$x"); on_rc+=("$y")
    read -r c r x y < <(run 64K PAIRFS_SUMS=off); off_copy+=("$c"); off_read+=("$r"); off_cc+=("$x"); off_rc+=("$y")
    read -r _ r _ y < <(DD_READ="bs=128K iflag=direct" run 1M PAIRFS_SUMS=on); c_on+=("$r"); cc_on+=("$y")
    read -r _ r _ y < <(DD_READ="bs=128K iflag=direct" run 1M PAIRFS_SUMS=on PAIRFS_SUMS_CACHE=0); c_off+=("$r"); cc_off+=("$y")
    echo "rep $i: copy on ${on_copy[-1]} off ${off_copy[-1]} MB/s (cpu ${on_cc[-1]} / ${off_cc[-1]} s);" \
        "read on ${on_read[-1]} off ${off_read[-1]} MB/s (cpu ${on_rc[-1]} / ${off_rc[-1]} s);" \
        "1M tracks read cache ${c_on[-1]} no cache ${c_off[-1]} MB/s (cpu ${cc_on[-1]} / ${cc_off[-1]} s)" >&2
done
m() { printf '%s\n' "$@" | median; }
ratio() { echo "scale=3; $1 / $2" | bc; }
row() { printf '%-50s %10s %10s %8s\n' "$1" "$2" "$3" "$(ratio "$2" "$3")"; }
echo
echo "sums cost, ${MIB} MiB file, median of ${REPS}, load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-50s %10s %10s %8s\n' metric "sums on" "sums off" "on/off"
row "background copy (split --wait), MB/s, 64K" "$(m "${on_copy[@]}")" "$(m "${off_copy[@]}")"
row "  daemon CPU s during it" "$(m "${on_cc[@]}")" "$(m "${off_cc[@]}")"
row "copy-mount sequential read, MB/s, 64K" "$(m "${on_read[@]}")" "$(m "${off_read[@]}")"
row "  daemon CPU s during it" "$(m "${on_rc[@]}")" "$(m "${off_rc[@]}")"
row "copy-mount read, 1M tracks, MB/s: cache / no cache" "$(m "${c_on[@]}")" "$(m "${c_off[@]}")"
row "  daemon CPU s during it" "$(m "${cc_on[@]}")" "$(m "${cc_off[@]}")"
