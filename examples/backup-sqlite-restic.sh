#!/usr/bin/env bash
# Recipe: back up a live SQLite database with pairfs split + restic, verify the restore,
# then refresh the copy with update and back up again. Run as root (needs fuse3, attr,
# restic, sqlite3, python3; .ci/run installs them).
#
#   bash examples/backup-sqlite-restic.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pairfs=${PAIRFS_BIN:-$PWD/target/release/pairfs}
[ -x "$pairfs" ] || cargo build --release
say() { printf '\n# %s\n' "$*"; }

work=$(mktemp -d /var/tmp/pairfs-recipe.XXXXXX)
chmod 755 "$work"
writer=
cleanup() {
    if [ -n "$writer" ]; then
        kill "$writer" 2>/dev/null || true
        wait "$writer" 2>/dev/null || true
    fi
    "$pairfs" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/mnt" "$work/copies"
export RESTIC_PASSWORD=recipe RESTIC_REPOSITORY=$work/repo RESTIC_CACHE_DIR=$work/cache

"$pairfs" mkfs "$work/vol.img" --size 2G >/dev/null
"$pairfs" mount "$work/vol.img" "$work/mnt" --copy-mount "$work/copies" --daemon
mkdir "$work/mnt/app"

say "a live application: inserts rows into app/app.db (WAL mode) as fast as it can"
python3 - "$work/mnt/app/app.db" <<'PY' &
import sqlite3, sys, os
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB)")
while True:
    db.execute("BEGIN")
    for _ in range(50):
        db.execute("INSERT INTO t(payload) VALUES (?)", (os.urandom(500),))
    db.execute("COMMIT")
PY
writer=$!
sleep 2

say "split the directory (database, -wal and -shm at one instant)"
setfattr -n user.pairfs.split "$work/mnt/app"
getfattr --only-values -n user.pairfs.state "$work/mnt/app"; echo

say "restic backs up the frozen copy while the application keeps writing"
restic init -q
restic backup -q "$work/copies/app"
rows_live=$(sqlite3 "file:$work/mnt/app/app.db?mode=ro" 'SELECT count(*) FROM t' 2>/dev/null || echo '?')

say "restore and verify"
restic restore -q latest --target "$work/restore"
restored=$work/restore$work/copies/app
check=$(sqlite3 "$restored/app.db" 'PRAGMA integrity_check')
rows=$(sqlite3 "$restored/app.db" 'SELECT count(*) FROM t')
echo "integrity_check: $check; rows in the restored copy: $rows; rows in the live db now: $rows_live"
[ "$check" = ok ] || { echo "restored database is corrupt" >&2; exit 1; }
[ "$rows" -gt 0 ] || { echo "restored database is empty" >&2; exit 1; }

say "later: refresh the frozen copy (only changed tracks) and back up again"
"$pairfs" update --wait "$work/mnt/app"
getfattr --only-values -n user.pairfs.state "$work/mnt/app"; echo
restic backup -q "$work/copies/app"
rm -rf "$work/restore"
restic restore -q latest --target "$work/restore"
rows2=$(sqlite3 "$restored/app.db" 'SELECT count(*) FROM t')
[ "$(sqlite3 "$restored/app.db" 'PRAGMA integrity_check')" = ok ] || { echo "second restore corrupt" >&2; exit 1; }
echo "second backup restores $rows2 rows (first: $rows)"
[ "$rows2" -gt "$rows" ] || { echo "update did not move the copy forward" >&2; exit 1; }
say "recipe passed"
