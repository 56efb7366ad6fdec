#!/usr/bin/env bash
# Every test of pairfs, in one command (README: "run all tests"). Run as root on a machine
# set up by .ci/run (fuse3, attr, restic, pjdfstest, fsx, users nobody/tests).
#
#   1. cargo fmt --check and cargo clippy -D warnings   (the gate)
#   2. man pages regenerated from the CLI and compared with man/ (drift check)
#   3. cargo test --release: unit tests (allocator, extent maps, bitmaps, pair model,
#      metadata store in memory) and the mount tests in tests/*.rs
#   4. tests/fs_suites.sh: pjdfstest and fsx against a live mount
#   4b. tests/xfstests.sh: fstests generic/quick through mount -t fuse.pairfs, against the
#      expected failures in tests/xfstests-expected.txt (about 15 minutes)
#   5. examples/demo.sh: the README demo, end to end
#   6. bench/run.sh --quick, if present: checks the benchmarks still run (no timing asserts)
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

step "cargo test --release (unit + mount tests)"
cargo test --release -- --test-threads=2

step "pjdfstest + fsx on a live mount"
PAIRFS_BIN=target/release/pairfs bash tests/fs_suites.sh

step "fstests generic/quick (tests/xfstests.sh)"
PAIRFS_BIN=target/release/pairfs bash tests/xfstests.sh -g generic/quick

step "README demo and the backup recipe"
bash examples/demo.sh
PAIRFS_BIN=target/release/pairfs bash examples/backup-sqlite-restic.sh
cargo run --release --example library

if [ -x bench/run.sh ] || [ -f bench/run.sh ]; then
    step "benchmarks, quick mode (no timing asserts)"
    bash bench/run.sh --quick
fi
step "all tests passed"
