#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called from traps look unreachable to shellcheck
# Run the pjdfstest POSIX conformance suite (Rust rewrite, `cargo install pjdfstest`) on a
# mounted file system.
#
#   tests/run-pjdfstest.sh MOUNTPOINT [PATTERN...]
#
# PATTERNs are substrings of test names (e.g. `chmod`, `rename::exdev`), passed through to
# pjdfstest; without them the whole suite runs, in two pjdfstest processes: the EROFS tests
# (which remount MOUNTPOINT read-only and back) first, then all the others (see below). Must run as root: about a quarter of the tests
# switch to the users `nobody` and `tests` (see tests/pjdfstest.toml) and are skipped otherwise.
#
# Environment:
#   PJDFSTEST             pjdfstest binary (default: from PATH, else ~/.cargo/bin/pjdfstest)
#   PJDFSTEST_CONFIG      config file (default: tests/pjdfstest.toml next to this script)
#   PJDFSTEST_SECONDARY   directory on a *different* file system for the EXDEV tests
#                         (default: a fresh temporary directory under ${TMPDIR:-/tmp}, used only
#                         if it is on another device than MOUNTPOINT; removed afterwards)
#   PJDFSTEST_LOG         where to keep the full output (default: a temporary file, kept on failure)
#   PJDFSTEST_BACKTRACE=1 print a backtrace (with file:line) for every failed assertion
#   PJDFSTEST_TIMEOUT     seconds before the run counts as hung (default: 900; ~2 s on ext4 here)
#
# Exit status: 0 if pjdfstest reports no failure (expected failures listed in the config do not
# count; an unexpected pass does), non-zero otherwise. The last line printed is a summary:
#   pjdfstest: PASS|FAIL on MOUNTPOINT (fstype): N failed, N skipped, N passed, ... total (Ns)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "run-pjdfstest: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: $0 MOUNTPOINT [PATTERN...]"
mnt=$1
shift
[ -d "$mnt" ] || die "$mnt: not a directory"
mnt=$(cd "$mnt" && pwd -P)

pjdfstest=${PJDFSTEST:-$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")}
[ -x "$pjdfstest" ] || die "pjdfstest not found (cargo install --locked pjdfstest)"
config=${PJDFSTEST_CONFIG:-$here/pjdfstest.toml}
[ -r "$config" ] || die "$config: cannot read config"

[ "$(id -u)" -eq 0 ] || echo "run-pjdfstest: WARNING: not root, tests that need root are skipped" >&2

# The users pjdfstest switches to (its default [dummy_auth]).
for u in nobody tests; do
    getent passwd "$u" >/dev/null || die "user '$u' missing (see .ci/run for how to create it)"
done

# Tests run as `nobody`/`tests` inside MOUNTPOINT: every directory above it must be searchable
# by others, or ~20 permission tests fail with EACCES for reasons that have nothing to do with
# the file system (e.g. a mount point inside a 0700 mktemp -d directory).
if [ "$(id -u)" -eq 0 ]; then
    if command -v setpriv >/dev/null; then
        as_nobody=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups)
    else
        as_nobody=(runuser -u nobody --)
    fi
    "${as_nobody[@]}" test -x "$mnt" ||
        die "user nobody cannot reach $mnt: make it and its parent directories mode 755"
fi

fstype=$(stat -f -c %T "$mnt" 2>/dev/null || echo '?')

# Secondary file system for the EXDEV tests. pjdfstest creates `file` in it and does not
# remove it, so it must be a fresh directory on every run.
secondary_args=()
cleanup_secondary=
if [ -n "${PJDFSTEST_SECONDARY:-}" ]; then
    secondary_args=(-s "$PJDFSTEST_SECONDARY")
else
    sec=$(mktemp -d "${TMPDIR:-/tmp}/pjdfstest-secondary.XXXXXX")
    cleanup_secondary=$sec
    if [ "$(stat -c %d "$sec")" != "$(stat -c %d "$mnt")" ]; then
        secondary_args=(-s "$sec")
    else
        echo "run-pjdfstest: $sec is on the same file system as $mnt: EXDEV tests skipped" >&2
    fi
fi

if [ -n "${PJDFSTEST_LOG:-}" ]; then
    log=$PJDFSTEST_LOG
    keep_log=1
else
    log=$(mktemp "${TMPDIR:-/tmp}/pjdfstest.XXXXXX.log")
    keep_log=
fi

# The EROFS tests (allow_remount in the config) run `mount -o remount,ro|rw MOUNTPOINT`.
# mount(8) would pass a FUSE remount to the mount.fuse helper, which tries to start a new
# daemon from the mount source ("pairfs:/path/vol.img": "not found"); `mount -i` skips
# helpers and does the plain mount(2) MS_REMOUNT, which the kernel handles for FUSE.
# Without root, remounts are impossible: run with allow_remount = false instead.
tooldir=$(mktemp -d "${TMPDIR:-/tmp}/pjdfstest-tools.XXXXXX")
real_mount=$(command -v mount || true)
if [ "$(id -u)" -eq 0 ] && [ -n "$real_mount" ]; then
    printf '#!/bin/sh\nexec %s -i "$@"\n' "$real_mount" >"$tooldir/mount"
    chmod 755 "$tooldir/mount"
else
    sed -E 's/^allow_remount *= *true/allow_remount = false/' "$config" >"$tooldir/pjdfstest.toml"
    config=$tooldir/pjdfstest.toml
    echo "run-pjdfstest: not root (or no mount(8)): EROFS tests skipped" >&2
fi

cleanup() {
    [ -z "$cleanup_secondary" ] || rm -rf -- "$cleanup_secondary"
    rm -rf -- "$tooldir"
    # A failed EROFS test could leave the mount read-only: put it back.
    if [ -n "$real_mount" ] && [ "$(id -u)" -eq 0 ] &&
        findmnt -n -o OPTIONS --target "$mnt" 2>/dev/null | grep -qE '(^|,)ro(,|$)'; then
        echo "run-pjdfstest: $mnt was left read-only: remounting read-write" >&2
        "$real_mount" -i -o remount,rw "$mnt" || true
    fi
}
trap cleanup EXIT

if [ "${PJDFSTEST_BACKTRACE:-0}" = 1 ]; then bt=1; else bt=0; fi

# run_pass CONFIG ARGS...: one pjdfstest process; its output goes to the terminal and is
# appended to $log. Sets pass_rc and pass_summary (its "Summary: ..." line, or empty).
run_pass() {
    local cfg=$1 plog
    shift
    local cmd=("$pjdfstest" -c "$cfg" -p "$mnt" "$@")
    plog=$(mktemp "${TMPDIR:-/tmp}/pjdfstest-pass.XXXXXX.log")
    echo "+ ${cmd[*]}" | tee -a "$log"
    set +e
    # The suite creates its own temporary directory under MOUNTPOINT and removes it at the
    # end. RUST_LIB_BACKTRACE=0 also silences the backtrace anyhow prints for the final
    # "Some tests have failed" error; RUST_BACKTRACE=1 alone would print one per failed
    # assertion.
    PATH="$tooldir:$PATH" NO_COLOR=1 RUST_BACKTRACE=$bt RUST_LIB_BACKTRACE=$bt \
        timeout --foreground --kill-after=30 "${PJDFSTEST_TIMEOUT:-900}" "${cmd[@]}" 2>&1 | tee "$plog"
    pass_rc=${PIPESTATUS[0]}
    set -e
    cat -- "$plog" >>"$log"
    pass_summary=$(grep -E '^Summary: ' "$plog" | tail -n 1 || true)
    rm -f -- "$plog"
}

# "Summary: F failed, S skipped, P passed, E expected failures, T total" -> "F S P E T"
counts() {
    sed -nE 's/^Summary: ([0-9]+) failed, ([0-9]+) skipped, ([0-9]+) passed, ([0-9]+) expected failures, ([0-9]+) total.*/\1 \2 \3 \4 \5/p' <<<"$1"
}

: >"$log"
start=$(date +%s)
if [ $# -eq 0 ] && grep -qE '^allow_remount *= *true' "$config"; then
    # Two processes. pjdfstest 0.2.2 leaks descriptors open for writing in some tests
    # (open::einval_invalid_combination, posix_fallocate::affected_only_create_flags never
    # close what they open), and the kernel refuses a remount to read-only (EBUSY) while
    # any file of the mount is open for writing: every EROFS test that runs after them in
    # the same process would fail, on any file system. So the EROFS tests run first in a
    # process of their own, then everything else with remounts off (EROFS tests skipped).
    run_pass "$config" erofs
    rc_a=$pass_rc
    sum_a=$pass_summary
    sed -E 's/^allow_remount *= *true/allow_remount = false/' "$config" >"$tooldir/no-remount.toml"
    echo "run-pjdfstest: the EROFS tests ran above; below they show as skipped"
    run_pass "$tooldir/no-remount.toml" "${secondary_args[@]}"
    rc=$pass_rc
    [ "$rc" -ne 0 ] || rc=$rc_a
    summary=
    if [ -n "$sum_a" ] && [ -n "$pass_summary" ]; then
        read -r af _ ap ae _ <<<"$(counts "$sum_a")"
        read -r bf _ bp be bt_ <<<"$(counts "$pass_summary")"
        if [ -n "${af:-}" ] && [ -n "${bt_:-}" ]; then
            f=$((af + bf)) p=$((ap + bp)) e=$((ae + be))
            summary="Summary: $f failed, $((bt_ - f - p - e)) skipped, $p passed, $e expected failures, $bt_ total"
        fi
    fi
    if [ -z "$summary" ] && [ "$rc" -eq 0 ]; then rc=1; fi
else
    run_pass "$config" "${secondary_args[@]}" "$@"
    rc=$pass_rc
    summary=$pass_summary
fi
elapsed=$(( $(date +%s) - start ))

failed_list=$(grep -E ' (FAILED|PASSED UNEXPECTEDLY)$' "$log" | awk '{ n = $1; $1 = ""; sub(/^ +/, ""); print "  " n "  " $0 }' || true)

echo
if [ -n "$failed_list" ]; then
    echo "pjdfstest failures (full output: $log):"
    echo "$failed_list"
    echo "  rerun one: $0 $mnt <name>   (PJDFSTEST_BACKTRACE=1 for the failing line)"
fi

status=PASS
if [ "$rc" -ne 0 ]; then
    status=FAIL
fi
if [ -z "$summary" ]; then
    # pjdfstest died before printing its summary (panic outside a test, bad config, ...).
    status=FAIL
    if [ "$rc" -eq 124 ]; then
        summary="Summary: none (timed out after ${PJDFSTEST_TIMEOUT:-900}s: hung file system?; see $log)"
    else
        summary="Summary: none (pjdfstest exited with status $rc before finishing; see $log)"
    fi
    [ "$rc" -ne 0 ] || rc=1
elif [ $# -eq 0 ] && ! grep -qE ' [1-9][0-9]* passed' <<<"$summary"; then
    status=FAIL
    summary="$summary (nothing passed)"
    [ "$rc" -ne 0 ] || rc=1
fi

if [ "$status" = PASS ] && [ -z "$keep_log" ]; then
    rm -f -- "$log"
fi

echo "pjdfstest: $status on $mnt ($fstype): ${summary#Summary: } (${elapsed}s)"
exit "$rc"
