#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps look unreachable to shellcheck
# fstests (xfstests), the Linux file system regression suite, against pairfs mounted the way a
# user mounts it: `mount -t fuse.pairfs VOLUME DIR` through /sbin/mount.fuse.pairfs.
#
#   tests/xfstests.sh [-g GROUP]... [TEST]...     default: -g generic/quick
#
# 1. Builds fstests from ../shared/vendor/xfstests-*.tar.gz (relative to the repository), once:
#    the build is cached under $XFSTESTS_CACHE/<first 16 hex digits of the tarball's sha256>.
# 2. Creates the users and group fstests switches to (fsgqa, fsgqa2, 123456-fsgqa).
# 3. Links /sbin/mount.fuse.pairfs to the pairfs binary (put back as it was on exit, e.g. the
#    Debian package's link to /usr/sbin/pairfs that tests/run-all.sh installs before this runs).
# 4. Makes a test and a scratch volume (pairfs mkfs) and writes an fstests config with
#    FSTYP=fuse, FUSE_SUBTYP=.pairfs, TEST_DEV/SCRATCH_DEV = the volume images.
# 5. Runs ./check and compares its failures with tests/xfstests-expected.txt ("TEST reason" per
#    line). A failure not on that list fails this script; a listed test that passed is
#    reported (so the entry can be removed) but is not a failure.
# Prints "xfstests: T tests: ran R, passed P, failed F, not run N" and exits 0 if nothing unexpected
# failed, 1 otherwise, 2 on a setup error.
#
# Must run as root with /dev/fuse, on a machine set up by .ci/run (build tools and the Debian
# packages fstests needs).
#
# Environment:
#   PAIRFS_BIN        pairfs binary to test (default: cargo build --release, target/release/pairfs)
#   XFSTESTS_FSTYP    pairfs (default) or tmpfs: run the same tests on tmpfs for comparison
#                     (the expected-failures list is not applied then)
#   XFSTESTS_TARBALL  fstests source tarball (default: ../shared/vendor/xfstests-*.tar.gz)
#   XFSTESTS_CACHE    where builds are cached (default: target/xfstests)
#   XFSTESTS_WORK     volumes, mount points and results (default: a new /var/tmp/pairfs-xfstests.*)
#   XFSTESTS_SIZE     size of each volume (default 4G)
#   XFSTESTS_LEGACY_SOURCE=1  for binaries before the mount source was the volume path (they
#                     showed `pairfs:/abs/path`): name the devices that way, through a wrapper
#                     helper that strips the prefix and sets RUST_LOG=warn (they logged an
#                     INFO line on every mount). Only for measuring old binaries.
set -euo pipefail
# The whole script is one block, read before it runs: editing it during a run is safe.
{
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
log() { echo "xfstests: $*"; }
die() { log "$*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (mounts, users, /sbin/mount.fuse.pairfs)"

args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-g generic/quick)
fstyp=${XFSTESTS_FSTYP:-pairfs}
case $fstyp in pairfs | tmpfs) ;; *) die "XFSTESTS_FSTYP=$fstyp: expected pairfs or tmpfs" ;; esac

# --- 1. build fstests (cached) ---------------------------------------------------------------
tarball=${XFSTESTS_TARBALL:-}
if [ -z "$tarball" ]; then
    for t in "$root"/../shared/vendor/xfstests-*.tar.gz; do tarball=$t; done
fi
[ -f "$tarball" ] || die "no fstests tarball (looked for $root/../shared/vendor/xfstests-*.tar.gz)"
cache=${XFSTESTS_CACHE:-$root/target/xfstests}
key=$(sha256sum "$tarball" | cut -c1-16)
src=$cache/$key/xfstests
if [ ! -f "$cache/$key/built" ]; then
    log "building fstests from $tarball into $cache/$key"
    rm -rf "${cache:?}/$key"
    mkdir -p "$cache/$key"
    tar -xzf "$tarball" -C "$cache/$key"
    [ -d "$src" ] || die "$tarball did not unpack to xfstests/"
    (cd "$src" && make -j"$(nproc)") >"$cache/$key/build.log" 2>&1 ||
        { tail -30 "$cache/$key/build.log" >&2; die "fstests build failed (log: $cache/$key/build.log)"; }
    touch "$cache/$key/built"
else
    log "fstests build cached in $cache/$key"
fi

# --- 2. users ---------------------------------------------------------------------------------
getent group fsgqa >/dev/null || groupadd fsgqa
for u in fsgqa fsgqa2 123456-fsgqa; do
    getent passwd "$u" >/dev/null || useradd -m -g fsgqa "$u" 2>/dev/null ||
        useradd -m -g fsgqa --badname "$u" || die "cannot create user $u"
done

# --- 3. binary and mount helper ---------------------------------------------------------------
work=${XFSTESTS_WORK:-}
[ -n "$work" ] || work=$(mktemp -d /var/tmp/pairfs-xfstests.XXXXXX)
mkdir -p "$work"
work=$(cd "$work" && pwd -P)
chmod 755 "$work"
helper=/sbin/mount.fuse.pairfs
helper_saved=""
if [ "$fstyp" = pairfs ]; then
    if [ -n "${PAIRFS_BIN:-}" ]; then
        pairfs=$(realpath "$PAIRFS_BIN")
    else
        log "building: cargo build --release"
        (cd "$root" && cargo build --release)
        pairfs=${CARGO_TARGET_DIR:-$root/target}/release/pairfs
    fi
    [ -x "$pairfs" ] || die "no pairfs binary at $pairfs"
    # A copy: a rebuild during the run must not change the binary under it.
    cp "$pairfs" "$work/pairfs"
    pairfs=$work/pairfs
    if [ -e "$helper" ] || [ -L "$helper" ]; then
        helper_saved=$work/mount.fuse.pairfs.saved
        cp -P "$helper" "$helper_saved"
    fi
    if [ "${XFSTESTS_LEGACY_SOURCE:-0}" = 1 ]; then
        # They also logged an INFO line on every mount, which fstests takes as test output.
        printf '#!/bin/bash\nsrc=${1#pairfs:}; shift\nexport RUST_LOG=warn,fuser=error\nexec -a mount.fuse.pairfs %q "$src" "$@"\n' \
            "$pairfs" >"$helper"
        chmod 755 "$helper"
    else
        ln -sfn "$pairfs" "$helper"
    fi
fi

test_mnt=$work/test
scratch_mnt=$work/scratch
mkdir -p "$test_mnt" "$scratch_mnt" "$work/results"
is_mounted() { awk -v m="$1" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }
cleanup() {
    local m
    for m in "$test_mnt" "$scratch_mnt"; do
        if is_mounted "$m"; then umount "$m" 2>/dev/null || umount -l "$m" || true; fi
    done
    if [ "$fstyp" = pairfs ]; then
        if [ -n "$helper_saved" ]; then cp -P "$helper_saved" "$helper"; else rm -f "$helper"; fi
        # The daemon commits and exits after the unmount; wait for it before removing files.
        local i
        for i in $(seq 100); do
            fuser -s "$work"/*.img 2>/dev/null || break
            sleep 0.1
        done
    fi
    [ -n "${XFSTESTS_WORK:-}" ] || rm -rf "$work"/*.img* "$work"/test "$work"/scratch "$work"/pairfs
}
trap cleanup EXIT

# --- 4. volumes and config --------------------------------------------------------------------
size=${XFSTESTS_SIZE:-4G}
if [ "$fstyp" = pairfs ]; then
    for v in test scratch; do
        "$pairfs" mkfs --force --size "$size" "$work/$v.img" >/dev/null
    done
    test_dev=$work/test.img
    scratch_dev=$work/scratch.img
    if [ "${XFSTESTS_LEGACY_SOURCE:-0}" = 1 ]; then
        test_dev=pairfs:$test_dev
        scratch_dev=pairfs:$scratch_dev
    fi
    cat >"$work/local.config" <<EOF
export FSTYP=fuse
export FUSE_SUBTYP=.pairfs
export TEST_DEV=$test_dev
export TEST_DIR=$test_mnt
export SCRATCH_DEV=$scratch_dev
export SCRATCH_MNT=$scratch_mnt
export RESULT_BASE=$work/results
EOF
else
    cat >"$work/local.config" <<EOF
export FSTYP=tmpfs
export TEST_DEV=xfstests_test
export TEST_DIR=$test_mnt
export SCRATCH_DEV=xfstests_scratch
export SCRATCH_MNT=$scratch_mnt
export RESULT_BASE=$work/results
export MOUNT_OPTIONS="-o size=$size"
export TEST_FS_MOUNT_OPTS="-o size=$size"
EOF
fi

# --- 5. run and compare -----------------------------------------------------------------------
log "running ./check ${args[*]} on $fstyp (work dir $work)"
start=$(date +%s)
set +e
(cd "$src" && HOST_OPTIONS=$work/local.config ./check "${args[@]}") 2>&1 | tee "$work/check.out"
set -e
secs=$(($(date +%s) - start))

# check's summary: "Ran: a b", "Not run: c", "Failures: d", one line each.
field() { sed -n "s/^$1: //p" "$work/check.out" | tail -1 | tr ' ' '\n' | sed '/^$/d' | sort -u; }
field Ran >"$work/ran.txt"
field "Not run" >"$work/notrun.txt"
field Failures >"$work/failed.txt"
# check's "Ran:" lists every test it started, "not run" ones included.
total=$(wc -l <"$work/ran.txt")
failed=$(wc -l <"$work/failed.txt")
notrun=$(wc -l <"$work/notrun.txt")
ran=$((total - notrun))
[ "$total" -gt 0 ] || die "./check ran no test (see $work/check.out)"

expected=$here/xfstests-expected.txt
sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$expected" | awk '{ print $1 }' | sort -u >"$work/expected.txt"
if [ "$fstyp" = pairfs ]; then
    comm -23 "$work/failed.txt" "$work/expected.txt" >"$work/unexpected.txt"
    # Listed, ran, and did not fail: the entry can go.
    comm -12 "$work/expected.txt" "$work/ran.txt" | comm -23 - "$work/failed.txt" >"$work/fixed.txt"
else
    : >"$work/unexpected.txt"
    : >"$work/fixed.txt"
fi
log "$total tests: ran $ran, passed $((ran - failed)), failed $failed, not run $notrun ($fstyp, ${args[*]}, ${secs}s)"
if [ -s "$work/fixed.txt" ]; then
    log "listed in tests/xfstests-expected.txt but passed (remove the entry):" $(cat "$work/fixed.txt")
fi
if [ -s "$work/unexpected.txt" ]; then
    log "UNEXPECTED failures:" $(cat "$work/unexpected.txt")
    for t in $(cat "$work/unexpected.txt"); do
        for f in "$work"/results/"$t".out.bad "$work"/results/*/"$t".out.bad; do
            [ -f "$f" ] && { echo "--- $f"; head -20 "$f"; }
        done
    done
    exit 1
fi
log "no unexpected failure"
exit 0
}
