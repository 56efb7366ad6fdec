#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps look unreachable to shellcheck
# Third-party file system suites on a real pairfs mount: pjdfstest (POSIX semantics) and fsx
# (data integrity under random I/O: mmap, truncate, fallocate, punch hole, copy_file_range).
#
#   tests/fs_suites.sh
#
# Builds the release binary, creates a 4 GiB volume in a temporary directory, mounts it with
# --daemon, runs tests/run-pjdfstest.sh on the mount and tests/run-fsx.sh in a subdirectory,
# then unmounts, checks the volume offline with `pairfs fsck` and removes everything (an EXIT
# trap always unmounts, also on failure or ^C). Both suites run even if the first fails.
# Exit status: 0 if both pass, the unmount is clean and fsck finds no problem.
#
# Must run as root (pjdfstest switches users; pairfs mounts with allow_other and
# default_permissions as root). Needs /dev/fuse, fusermount3, pjdfstest, fsx and the users
# `nobody` and `tests` (.ci/run sets all of that up).
#
# Environment:
#   PAIRFS_BIN          use this pairfs binary instead of building target/release/pairfs
#   PAIRFS_MOUNT_ARGS   extra arguments for `pairfs mount` (e.g. "--threads 4")
#   FS_SUITES_TMPDIR    where to put the volume and mount point (default: ${TMPDIR:-/tmp})
#   FS_SUITES_KEEP=1    keep the volume files after the run (for debugging; still unmounted)
#   SUITES              which suites to run (default: "pjdfstest fsx")
#   plus everything run-pjdfstest.sh and run-fsx.sh read (PJDFSTEST_*, FSX_*).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

log() { echo "fs_suites: $*"; }

[ "$(id -u)" -eq 0 ] || log "WARNING: not running as root; pjdfstest will skip or fail many tests"

if [ -n "${PAIRFS_BIN:-}" ]; then
    pairfs=$PAIRFS_BIN
else
    log "building: cargo build --release"
    (cd "$root" && cargo build --release)
    pairfs=${CARGO_TARGET_DIR:-$root/target}/release/pairfs
fi
[ -x "$pairfs" ] || { log "no pairfs binary at $pairfs"; exit 2; }

work=$(mktemp -d "${FS_SUITES_TMPDIR:-${TMPDIR:-/tmp}}/pairfs-suites.XXXXXX")
work=$(cd "$work" && pwd -P)  # as the mount table will show it
# pjdfstest runs part of its tests as `nobody`/`tests`: they must be able to reach the mount.
chmod 755 "$work"
vol=$work/vol.img
mnt=$work/mnt
mkdir "$mnt"

# Listed in the mount table. (Not `mountpoint -q`: it stat()s the directory, which fails with
# ENOTCONN once the FUSE daemon has died, so a dead mount would look "not mounted".)
is_mounted() { awk -v m="$mnt" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
# Mounted and answering (statfs reaches the daemon).
is_alive() { is_mounted && stat -f "$mnt" >/dev/null 2>&1; }

# Processes of this run's pairfs daemon: those with our (unique, temporary) volume path as an
# argument. Never match by program name: other pairfs mounts may be running on this machine.
daemon_pids() {
    local p arg
    for p in /proc/[0-9]*; do
        while IFS= read -r -d '' arg; do
            if [ "$arg" = "$vol" ]; then
                echo "${p#/proc/}"
                break
            fi
        done 2>/dev/null <"$p/cmdline" || true
    done
}

# Unmounts $mnt (if mounted) and waits for the daemon to exit, killing it after 30 s.
# Returns 1 if any of that needed force.
unmount_all() {
    local i pids status=0
    if is_mounted; then
        log "unmounting $mnt"
        for i in 1 2 3; do
            "$pairfs" umount "$mnt" && break
            log "pairfs umount failed (attempt $i)"
            sleep 1
        done
        if is_mounted; then
            log "still mounted: fusermount3 -u"
            fusermount3 -u "$mnt" || true
            status=1
        fi
        if is_mounted; then
            log "still mounted: fusermount3 -u -z (lazy)"
            fusermount3 -u -z "$mnt" || umount -l "$mnt" || true
        fi
    fi
    # The daemon should exit by itself once unmounted; give it time to flush.
    for i in $(seq 1 30); do
        pids=$(daemon_pids)
        [ -n "$pids" ] || break
        sleep 1
    done
    if [ -n "$pids" ]; then
        log "pairfs daemon still running 30s after unmount (pids $pids): killing it"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        status=1
    fi
    return "$status"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    cd /
    unmount_all || rc=1
    if is_mounted; then
        log "$mnt is STILL mounted; leaving $work in place"
    elif [ "${FS_SUITES_KEEP:-0}" = 1 ]; then
        log "keeping $work"
    else
        rm -rf -- "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "mkfs: $pairfs mkfs $vol --size 4G"
"$pairfs" mkfs "$vol" --size 4G

log "mount: $pairfs mount $vol $mnt --daemon ${PAIRFS_MOUNT_ARGS:-}"
# shellcheck disable=SC2086
"$pairfs" mount "$vol" "$mnt" --daemon ${PAIRFS_MOUNT_ARGS:-}
if ! is_alive; then
    log "FAIL: pairfs mount --daemon returned but $mnt is not a live mount"
    exit 1
fi
log "mounted: $(findmnt -n -o FSTYPE,OPTIONS "$mnt" 2>/dev/null || echo '?')"

declare -A result=()
overall=0
for suite in ${SUITES:-pjdfstest fsx}; do
    t0=$(date +%s)
    case $suite in
    pjdfstest)
        log "=== pjdfstest ==="
        if bash "$here/run-pjdfstest.sh" "$mnt"; then rc=0; else rc=$?; fi
        ;;
    fsx)
        log "=== fsx ==="
        mkdir -p "$mnt/fsx"
        # The files stay (FSX_KEEP) for the offline fsck below.
        if FSX_KEEP=1 bash "$here/run-fsx.sh" "$mnt/fsx"; then rc=0; else rc=$?; fi
        ;;
    *)
        log "unknown suite '$suite'"
        rc=2
        ;;
    esac
    if ! is_alive; then
        log "$mnt is no longer a live mount after $suite (daemon crashed?)"
        [ "$rc" -ne 0 ] || rc=1
    fi
    if [ "$rc" -eq 0 ]; then
        result[$suite]="PASS ($(( $(date +%s) - t0 ))s)"
    else
        result[$suite]="FAIL (exit $rc, $(( $(date +%s) - t0 ))s)"
        overall=1
    fi
    is_alive || break
done

# Offline check of what the suites left (the fsx files, whose extent maps went through
# 10,000 random operations each): no track mapped twice or outside the volume, link
# counts, orphans, SQLite integrity. Needs a clean unmount: that is checked too.
if unmount_all && ! is_mounted; then
    log "fsck: $pairfs fsck $vol"
    if "$pairfs" fsck "$vol"; then
        result[fsck]=PASS
    else
        result[fsck]="FAIL (problems found)"
        overall=1
    fi
else
    result[fsck]="FAIL (the unmount needed force)"
    overall=1
fi

for suite in ${SUITES:-pjdfstest fsx} fsck; do
    log "$suite: ${result[$suite]:-NOT RUN}"
done
if [ "$overall" -eq 0 ]; then log "PASS"; else log "FAIL"; fi
exit "$overall"
