#!/usr/bin/env bash
# Every test of pairfs, in one command (README: "run all tests"). Run as root on a machine
# set up by .ci/run (fuse3, attr, restic, pjdfstest, fsx, users nobody/tests).
#
#   1. cargo fmt --check and cargo clippy -D warnings   (the gate)
#   2. man pages regenerated from the CLI and compared with man/ (drift check)
#   2b. the Debian package (packaging/build-deb.sh, cargo-deb) built, lintian-free where lintian
#      is installed, and installed with apt-get: /usr/sbin/pairfs, /sbin/mount.fuse.pairfs,
#      man pages, completions, systemd units. Installed before the tests, so the mount helper
#      the admin tests find is this build's; tests/xfstests.sh puts it back after its run.
#   3. cargo test --release: unit tests (allocator, extent maps, bitmaps, pair model,
#      metadata store in memory) and the mount tests in tests/*.rs
#   4. tests/fs_suites.sh: pjdfstest and fsx against a live mount
#   4b. tests/xfstests.sh: fstests generic/quick through mount -t fuse.pairfs, against the
#      expected failures in tests/xfstests-expected.txt (about 15 minutes)
#   5. examples/demo.sh: the README demo, end to end, with the installed /usr/sbin/pairfs
#   6. bench/run.sh --quick and bench/generations.sh --quick: the benchmarks still run (no timing asserts)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --release --all-targets -- -D warnings

step "cargo build --release"
cargo build --release

step "man pages match the CLI"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
target/release/pairfs gen man "$tmp"
for f in "$tmp"/*.8; do
    if ! cmp -s "$f" "man/$(basename "$f")"; then
        echo "man/$(basename "$f") is out of date: run 'target/release/pairfs gen man man/'" >&2
        exit 1
    fi
done
for f in man/*.[78]; do
    out=$(MANWIDTH=80 man -l "$f" 2>&1 >/dev/null)
    [ -z "$out" ] || { echo "$f: $out" >&2; exit 1; }
done

step "Debian package: build, install, check"
deb=$(bash packaging/build-deb.sh | tail -1)
[ -f "$deb" ] || { echo "packaging/build-deb.sh made no package" >&2; exit 1; }
if command -v lintian >/dev/null; then
    lintian --fail-on error,warning "$deb"
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall "$(realpath "$deb")"
dpkg -L pairfs >"$tmp/dpkg-L"
for f in /usr/sbin/pairfs /usr/sbin/mount.fuse.pairfs /usr/share/man/man8/pairfs.8.gz \
    /usr/share/man/man7/pairfs-pairs.7.gz /usr/share/bash-completion/completions/pairfs \
    /lib/systemd/system/pairfs@.service /lib/systemd/system/pairfs-split@.service \
    /lib/systemd/system/pairfs-replica@.service /usr/share/man/man8/pairfs-replica-serve.8.gz; do
    grep -qx "$f" "$tmp/dpkg-L" || { echo "the package does not ship $f" >&2; exit 1; }
done
[ "$(readlink -f /sbin/mount.fuse.pairfs)" = /usr/sbin/pairfs ] ||
    { echo "/sbin/mount.fuse.pairfs does not lead to /usr/sbin/pairfs" >&2; exit 1; }
build_id() { readelf -n "$1" | awk '/Build ID/ { print $3 }'; }
[ "$(build_id /usr/sbin/pairfs)" = "$(build_id target/release/pairfs)" ] ||
    { echo "the installed pairfs is not this build (GNU build ids differ)" >&2; exit 1; }
MANWIDTH=80 man pairfs-status >/dev/null
if command -v systemd-analyze >/dev/null; then
    # The installed units, templates as instances (no systemd as PID 1 needed).
    (cd "$tmp" && systemd-analyze verify /lib/systemd/system/pairfs@mnt-vol.service \
        /lib/systemd/system/pairfs-split@mnt-vol-db.service \
        /lib/systemd/system/pairfs-split-hourly@mnt-vol-db.timer \
        /lib/systemd/system/pairfs-split-daily@mnt-vol-db.timer \
        /lib/systemd/system/pairfs-split-hourly@mnt-vol-db.service \
        /lib/systemd/system/pairfs-split-daily@mnt-vol-db.service \
        /lib/systemd/system/pairfs-textfile.service /lib/systemd/system/pairfs-textfile.timer \
        /lib/systemd/system/pairfs-replica@vol.service)
fi

step "cargo test --release (unit + mount tests)"
cargo test --release -- --test-threads=2

step "pjdfstest + fsx on a live mount"
PAIRFS_BIN=target/release/pairfs bash tests/fs_suites.sh

step "fstests generic/quick (tests/xfstests.sh)"
PAIRFS_BIN=target/release/pairfs bash tests/xfstests.sh -g generic/quick

step "README demo and the backup recipe"
PAIRFS_BIN=/usr/sbin/pairfs bash examples/demo.sh
PAIRFS_BIN=target/release/pairfs bash examples/backup-sqlite-restic.sh
cargo run --release --example library

if [ -x bench/run.sh ] || [ -f bench/run.sh ]; then
    step "benchmarks, quick mode (no timing asserts)"
    bash bench/run.sh --quick
    bash bench/generations.sh --quick
    bash bench/replica_copies.sh --quick
fi
step "all tests passed"
