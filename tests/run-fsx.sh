#!/usr/bin/env bash
# Run fsx (File System eXerciser, Rust rewrite, `cargo install fsx`) on a directory of the file
# system under test: several seeds, one after the other, stopping at the first failure.
#
#   tests/run-fsx.sh DIR
#
# Each seed works on its own file DIR/fsx.SEED (removed after a successful run unless FSX_KEEP=1). The operation
# mix is tests/fsx.toml: read, write, mmap read, mmap write, truncate, posix_fallocate, punch
# hole, copy_file_range, sendfile, close/open, msync(MS_INVALIDATE), fsync, fdatasync, fadvise.
#
# Environment:
#   FSX            fsx binary (default: from PATH, else ~/.cargo/bin/fsx)
#   FSX_CONFIG     config file (default: tests/fsx.toml next to this script)
#   FSX_SEEDS      space-separated seeds (default: "1 2 3 4 5 6 7 8 9 10")
#   FSX_OPS        operations per seed (default: 10000)
#   FSX_TIMEOUT    seconds allowed per seed before it counts as a hang (default: 900; run in
#                  the foreground process group so that ^C reaches fsx)
#   FSX_KEEP=1     keep each seed's file after it passed (default: remove it; fs_suites.sh
#                  keeps them so that its offline fsck sees the extent maps fsx left)
#   FSX_ARTIFACTS  directory for failure artifacts (default: a new temporary directory under
#                  ${TMPDIR:-/tmp}, i.e. outside the file system under test; removed if all pass)
#
# On a failure fsx prints the seed and the last operations ("LOG DUMP") and writes the expected
# file content as fsx.SEED.fsxgood into FSX_ARTIFACTS; this script adds a copy of the actual file
# (fsx.SEED.actual) and prints the command that reproduces the run. Exit status: 0 if every
# seed passed, otherwise fsx's status (1 = data/size mismatch, 101 = an operation failed, e.g.
# EOPNOTSUPP from punch hole, 124 = timeout). The last line printed is a summary.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "run-fsx: $*" >&2; exit 2; }

[ $# -eq 1 ] || die "usage: $0 DIR"
dir=$1
[ -d "$dir" ] || die "$dir: not a directory"
dir=$(cd "$dir" && pwd -P)

fsx=${FSX:-$(command -v fsx || echo "$HOME/.cargo/bin/fsx")}
[ -x "$fsx" ] || die "fsx not found (cargo install --locked fsx)"
config=${FSX_CONFIG:-$here/fsx.toml}
[ -r "$config" ] || die "$config: cannot read config"
read -r -a seeds <<<"${FSX_SEEDS:-1 2 3 4 5 6 7 8 9 10}"
[ "${#seeds[@]}" -gt 0 ] || die "FSX_SEEDS is empty"
ops=${FSX_OPS:-10000}
limit=${FSX_TIMEOUT:-900}

if [ -n "${FSX_ARTIFACTS:-}" ]; then
    artifacts=$FSX_ARTIFACTS
    mkdir -p -- "$artifacts"
    own_artifacts=
else
    artifacts=$(mktemp -d "${TMPDIR:-/tmp}/fsx-artifacts.XXXXXX")
    own_artifacts=1
fi
# Remove our artifact directory if nothing was saved in it (e.g. interrupted by ^C).
trap '[ -z "$own_artifacts" ] || rmdir -- "$artifacts" 2>/dev/null || true' EXIT

fstype=$(stat -f -c %T "$dir" 2>/dev/null || echo '?')
echo "fsx: ${#seeds[@]} seeds x $ops ops on $dir ($fstype), config $config"

start=$(date +%s)
n=0
for seed in "${seeds[@]}"; do
    n=$((n + 1))
    file=$dir/fsx.$seed
    cmd=("$fsx" -f "$config" -N "$ops" -S "$seed" -P "$artifacts" "$file")
    t0=$(date +%s)
    echo "fsx: seed $seed ($n/${#seeds[@]}): ${cmd[*]}"
    set +e
    timeout --foreground --kill-after=30 "$limit" "${cmd[@]}"
    rc=$?
    set -e
    t1=$(date +%s)
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -ne 124 ] || echo "fsx: seed $seed timed out after ${limit}s (hung file system?)"
        cp -- "$file" "$artifacts/fsx.$seed.actual" 2>/dev/null || true
        echo "fsx: artifacts in $artifacts: $(find "$artifacts" -mindepth 1 -printf '%f ' 2>/dev/null)"
        echo "fsx: reproduce with: ${cmd[*]}   (add -v or -vv to log every operation)"
        echo "fsx: FAIL at seed $seed ($n/${#seeds[@]}, exit $rc) on $dir ($fstype) after $((t1 - start))s"
        exit "$rc"
    fi
    [ "${FSX_KEEP:-0}" = 1 ] || rm -f -- "$file"
    echo "fsx: seed $seed ok ($((t1 - t0))s)"
done

[ -z "$own_artifacts" ] || rm -rf -- "$artifacts"
echo "fsx: PASS ${#seeds[@]} seeds x $ops ops on $dir ($fstype) in $(( $(date +%s) - start ))s"
