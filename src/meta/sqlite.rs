//! The metadata store: SQLite (WAL mode) holding inodes, directory entries, extents,
//! xattrs, pairs, pair bitmaps and frozen maps.
//!
//! The core keeps the inodes it uses in memory, reads others on demand through a
//! [`Reader`] (a second, read-only connection: indexed point queries), and hands this
//! module *batches* of changed rows ([`Batch`]); one batch is one transaction. The store
//! never decides anything: it checks the schema version and the volume UUID on open
//! (migrating version 1), loads rows, and writes what it is given. See `docs/design.md` for the order in which batches are committed
//! relative to data writes.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::core::clone::CloneRef;
use crate::core::extent::{Extent, ExtentMap};
use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};
use crate::snap::pair::{Frozen, FrozenAttr, FrozenKind, Pair, PairId, PairState, Progress, Scope};

/// Schema version written by this build. Older versions are migrated on a read-write
/// open and read as they are on a read-only one: version 1 has no `rdev`, `links`,
/// `xattrs` in `frozen`; versions 1 and 2 lack the on-demand indexes and `inode_count`;
/// versions 1 to 3 lack the `sums` table (copy-image track checksums, [`SUMS_SCHEMA`]);
/// versions 1 to 4 lack `pairs.lazy_ino` (lazy instants: 0 = the frozen map is whole);
/// versions 1 to 5 lack the clone columns of `inodes` (`clone_pair`, `clone_src`,
/// `clone_lim`: a writable clone's backing reference) and their index; versions 1 to 6
/// lack the named generations ([`GENS_SCHEMA`]).
pub const SCHEMA_VERSION: u32 = 7;

/// The schema version that added named generations.
pub const GENS_VERSION: u32 = 7;

/// Named generations (schema version 7, `snap::gens`): one row per generation (its
/// frozen records are `frozen` rows under its id, which comes from the pair ids), and
/// the saved tracks: the instant's data of volume track `vtrack`, overwritten since,
/// kept in copy-image track `slot` (a volume track allocated for it: no file maps it).
/// A slot shared by several generations has one row per generation.
pub const GENS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS generations(id INTEGER PRIMARY KEY, pair INTEGER NOT NULL,
  name TEXT NOT NULL, split_ns INTEGER NOT NULL, lazy_ino INTEGER NOT NULL,
  scope_kind TEXT NOT NULL, scope_ino INTEGER NOT NULL, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gen_saved(gen INTEGER NOT NULL, vtrack INTEGER NOT NULL,
  slot INTEGER NOT NULL, PRIMARY KEY(gen, vtrack)) WITHOUT ROWID;
";

/// The schema version that added the `sums` table.
pub const SUMS_VERSION: u32 = 4;

/// The schema version that added `pairs.lazy_ino` (lazy instants).
pub const LAZY_VERSION: u32 = 5;

/// The schema version that added writable clones (`inodes.clone_*`).
pub const CLONE_VERSION: u32 = 6;

/// Version 5 to 6: the backing reference of a clone (NULL for every other inode).
const CLONE_COLUMNS_6: [(&str, &str); 3] = [
    (
        "clone_pair",
        "ALTER TABLE inodes ADD COLUMN clone_pair INTEGER",
    ),
    (
        "clone_src",
        "ALTER TABLE inodes ADD COLUMN clone_src INTEGER",
    ),
    (
        "clone_lim",
        "ALTER TABLE inodes ADD COLUMN clone_lim INTEGER",
    ),
];

/// The clones of a pair, found at mount without a scan of `inodes` (schema version 6).
const CLONE_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS inodes_clone ON inodes(clone_pair) WHERE clone_pair IS NOT NULL;";

/// Checksums of the copy image (schema version 4): the crc32c of each copy-image track as
/// last written by a copy, committed with (or before) the clear of its pending bit.
/// Kept in its own statement so the migration step stays one function
/// ([`Meta::migrate_sums`]).
pub const SUMS_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS sums(track INTEGER PRIMARY KEY, crc INTEGER NOT NULL);";

/// Frozen-row kind code of an absent marker ([`Frozen::absent`]).
const KIND_ABSENT: u8 = 7;

/// Version 1 to 2: frozen objects keep their device number, hard-link names and xattrs.
/// Each column is added only if missing.
const FROZEN_COLUMNS_2: [(&str, &str); 3] = [
    (
        "rdev",
        "ALTER TABLE frozen ADD COLUMN rdev INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "links",
        "ALTER TABLE frozen ADD COLUMN links BLOB NOT NULL DEFAULT x''",
    ),
    (
        "xattrs",
        "ALTER TABLE frozen ADD COLUMN xattrs BLOB NOT NULL DEFAULT x''",
    ),
];

const SCHEMA: &str = "
CREATE TABLE super(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inodes(ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, perm INTEGER NOT NULL,
  uid INTEGER NOT NULL, gid INTEGER NOT NULL, nlink INTEGER NOT NULL, size INTEGER NOT NULL,
  atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL, rdev INTEGER NOT NULL,
  target BLOB, clone_pair INTEGER, clone_src INTEGER, clone_lim INTEGER);
CREATE TABLE dirents(parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
  PRIMARY KEY(parent, name)) WITHOUT ROWID;
CREATE TABLE extents(ino INTEGER NOT NULL, ftrack INTEGER NOT NULL, vtrack INTEGER NOT NULL,
  len INTEGER NOT NULL, PRIMARY KEY(ino, ftrack)) WITHOUT ROWID;
CREATE TABLE xattrs(ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
  PRIMARY KEY(ino, name)) WITHOUT ROWID;
CREATE TABLE pairs(id INTEGER PRIMARY KEY, scope_kind TEXT NOT NULL, scope_ino INTEGER NOT NULL,
  path TEXT NOT NULL, state TEXT NOT NULL, split_ns INTEGER NOT NULL, error TEXT,
  total INTEGER NOT NULL, copied INTEGER NOT NULL, last_copied INTEGER NOT NULL,
  started_ns INTEGER NOT NULL, lazy_ino INTEGER NOT NULL DEFAULT 0);
CREATE TABLE bitmaps(pair INTEGER NOT NULL, which INTEGER NOT NULL, chunk INTEGER NOT NULL,
  bits BLOB NOT NULL, PRIMARY KEY(pair, which, chunk)) WITHOUT ROWID;
CREATE TABLE frozen(pair INTEGER NOT NULL, seq INTEGER NOT NULL, ino INTEGER NOT NULL,
  path TEXT NOT NULL, kind INTEGER NOT NULL, perm INTEGER NOT NULL, uid INTEGER NOT NULL,
  gid INTEGER NOT NULL, size INTEGER NOT NULL, atime INTEGER NOT NULL, mtime INTEGER NOT NULL,
  ctime INTEGER NOT NULL, target BLOB NOT NULL, extents BLOB NOT NULL,
  rdev INTEGER NOT NULL DEFAULT 0, links BLOB NOT NULL DEFAULT x'',
  xattrs BLOB NOT NULL DEFAULT x'',
  PRIMARY KEY(pair, seq)) WITHOUT ROWID;
";

/// Indexes for loading on demand (schema version 3): the names of an inode, the frozen
/// maps that hold an inode, and the inodes with no name left (orphans).
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS dirents_ino ON dirents(ino);
CREATE INDEX IF NOT EXISTS frozen_ino ON frozen(ino);
CREATE INDEX IF NOT EXISTS inodes_unlinked ON inodes(ino) WHERE nlink = 0;
";

/// Geometry and identity of a volume, stored in the `super` table and the image headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Volume UUID (hex, 32 chars).
    pub uuid: String,
    /// Volume size in bytes (a multiple of the track size).
    pub size: u64,
    /// Track size in bytes.
    pub track_size: u64,
}

impl Geometry {
    /// Number of tracks.
    pub fn tracks(&self) -> u64 {
        self.size / self.track_size
    }
}

/// One persisted inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeRow {
    /// Inode number.
    pub ino: u64,
    /// File type as the `S_IFMT` bits (e.g. `libc::S_IFREG`).
    pub kind: u32,
    /// Permission bits (07777).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Times in ns since the epoch.
    pub atime: i64,
    /// Modification time.
    pub mtime: i64,
    /// Change time.
    pub ctime: i64,
    /// Device number.
    pub rdev: u32,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// A writable clone's backing reference (None for every other inode).
    pub clone: Option<CloneRef>,
}

/// One inode's rows: the inode, its extents, its xattrs.
pub type InodeRows = (InodeRow, Vec<Extent>, Vec<(Vec<u8>, Vec<u8>)>);

/// Rows changed since the last commit. Committed in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// Inodes to insert or replace (with their extents and xattrs replaced too).
    pub inodes: Vec<InodeRows>,
    /// Inodes to delete.
    pub deleted: Vec<u64>,
    /// Directory entries to insert or replace.
    pub put_dirents: Vec<(u64, Vec<u8>, u64)>,
    /// Directory entries to delete.
    pub del_dirents: Vec<(u64, Vec<u8>)>,
    /// Next inode number.
    pub next_ino: u64,
    /// Inodes in use after this batch (written with `next_ino`).
    pub inode_count: u64,
    /// Pairs whose row changes (state, progress), with their dirty bitmap chunks.
    pub pairs: Vec<PairDelta>,
}

impl Batch {
    /// True if nothing would be written.
    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
            && self.deleted.is_empty()
            && self.put_dirents.is_empty()
            && self.del_dirents.is_empty()
            && self.pairs.is_empty()
    }
}

/// Changes of one pair.
#[derive(Debug, Default)]
pub struct PairDelta {
    /// The pair row (None: only bitmaps changed... or deleted, see `delete`).
    pub row: Option<PairRow>,
    /// Pair id.
    pub id: PairId,
    /// Delete the pair and everything of it.
    pub delete: bool,
    /// Dirty bitmap chunks: (which 0..3, chunk, bytes or None to delete).
    pub chunks: Vec<(u8, u64, Option<Vec<u8>>)>,
    /// Replace the frozen map with this one.
    pub frozen: Option<Vec<Frozen>>,
    /// Copy-image track checksums (track, crc32c) of this pair's copies since its last
    /// commit, written in the same transaction as `chunks`.
    pub sums: Vec<(u64, u32)>,
    /// Frozen objects to add (a lazy pair's objects frozen since the last commit):
    /// (sequence number, object), after `frozen` if both are given.
    pub append: Vec<(usize, Frozen)>,
    /// A named generation's row (`id` is the generation's): written instead of a pair
    /// row ([`GENS_SCHEMA`]).
    pub generation: Option<GenRow>,
    /// A named generation's newly saved tracks: (volume track, copy-image slot).
    pub saved: Vec<(u64, u64)>,
}

/// The row of a named generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenRow {
    /// The pair it belongs to.
    pub pair: PairId,
    /// Its name.
    pub name: String,
    /// The instant (ns).
    pub split_ns: i64,
    /// Inode limit of a lazy instant (0: the frozen map is whole).
    pub lazy_ino: u64,
    /// The pair's scope at the instant.
    pub scope: Scope,
    /// The scope's path at the instant (display).
    pub path: String,
}

/// A stored named generation: its row, frozen records and saved tracks.
#[derive(Debug, Clone)]
pub struct StoredGen {
    /// Generation id.
    pub id: PairId,
    /// Row.
    pub row: GenRow,
    /// Frozen records (in order).
    pub frozen: Vec<Frozen>,
    /// Saved tracks: (volume track, slot).
    pub saved: Vec<(u64, u64)>,
}

/// The scalar fields of a pair.
#[derive(Debug, Clone)]
pub struct PairRow {
    /// Scope.
    pub scope: Scope,
    /// Display path.
    pub path: String,
    /// State.
    pub state: PairState,
    /// Split instant.
    pub split_ns: i64,
    /// Error text.
    pub error: Option<String>,
    /// Progress.
    pub progress: Progress,
    /// Inode limit of a lazy instant (0: none).
    pub lazy_ino: u64,
}

impl PairRow {
    /// The row of a pair.
    pub fn of(p: &Pair) -> PairRow {
        PairRow {
            scope: p.scope,
            path: p.path.clone(),
            state: p.state,
            split_ns: p.split_ns,
            error: p.error.clone(),
            progress: p.progress,
            lazy_ino: p.lazy.unwrap_or(0),
        }
    }
}

/// Takes every dirty chunk of a pair's three bitmaps.
pub fn take_dirty_chunks(p: &mut Pair) -> Vec<(u8, u64, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    for (w, set) in [&mut p.forming, &mut p.split_diff, &mut p.update_diff]
        .into_iter()
        .enumerate()
    {
        for (ci, b) in set.take_dirty() {
            out.push((w as u8, ci, b));
        }
    }
    out
}

/// Takes a pair's frozen objects not yet in the database (a lazy pair's objects frozen
/// since the last commit), with their sequence numbers.
pub fn take_appends(p: &mut Pair) -> Vec<(usize, Frozen)> {
    let from = p.frozen_saved.min(p.frozen.len());
    let out = p.frozen[from..]
        .iter()
        .enumerate()
        .map(|(k, f)| (from + k, f.clone()))
        .collect();
    p.frozen_saved = p.frozen.len();
    out
}

/// What mount loads ([`Meta::load`]: no scan of the inode table) or, for `fsck`,
/// everything ([`Meta::load_all`]).
#[derive(Debug, Default)]
pub struct Loaded {
    /// Used volume track runs (start, length) of every extent.
    pub used: Vec<(u64, u64)>,
    /// Inodes whose last name went away (nlink 0): deleted at mount.
    pub orphans: Vec<u64>,
    /// Inodes in use.
    pub inode_count: u64,
    /// Inodes (`load_all` only).
    pub inodes: Vec<InodeRow>,
    /// Extents per inode (`load_all` only).
    pub extents: Vec<(u64, Extent)>,
    /// Xattrs (`load_all` only).
    pub xattrs: Vec<(u64, Vec<u8>, Vec<u8>)>,
    /// Directory entries (`load_all` only).
    pub dirents: Vec<(u64, Vec<u8>, u64)>,
    /// Pairs.
    pub pairs: Vec<Pair>,
    /// Next inode number.
    pub next_ino: u64,
    /// Next pair id.
    pub next_pair: u64,
    /// False if the last mount did not end cleanly.
    pub clean: bool,
    /// Copy-image track checksums ([`Meta::load_sums`]).
    pub sums: Vec<(u64, u32)>,
    /// Linked clones and the pair each depends on (an indexed query).
    pub clones: Vec<(u64, PairId)>,
    /// Named generations ([`Meta::load_gens`]).
    pub gens: Vec<StoredGen>,
}

/// The open metadata database.
pub struct Meta {
    conn: Connection,
    geometry: Geometry,
    /// Schema version of the file (below [`SCHEMA_VERSION`] only for a read-only open of
    /// an old volume).
    version: u32,
    path: Option<std::path::PathBuf>,
    /// Opened with SQLite's `immutable=1` ([`Meta::open_immutable`]).
    immutable: bool,
    /// Told of every committed write transaction (a replica link), if set.
    tap: Option<std::sync::Mutex<Box<dyn CommitTap>>>,
}

/// Told of every write transaction the store commits ([`Meta::commit`],
/// [`Meta::set_clean`], [`Meta::set_super_values`]), in commit order, right after it
/// committed and while the caller still holds the store: a replica link takes the
/// transaction's row changes here (`repl::capture`).
pub trait CommitTap: Send {
    /// Installs whatever the tap needs on the writer connection (once).
    fn install(&mut self, conn: &Connection) -> Result<()>;
    /// A transaction committed on `conn`.
    fn committed(&mut self, conn: &Connection);
}

/// The `file:` URI of `path` with SQLite's `immutable=1`: no locks, no change checks.
fn immutable_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut u = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
            u.push(char::from(b));
        } else {
            u.push_str(&format!("%{b:02X}"));
        }
    }
    u.push_str("?immutable=1");
    u
}

/// Opens `path` read-only or read-write, or (`immutable`) read-only as a file nothing
/// changes.
fn connect(path: &Path, readonly: bool, immutable: bool) -> rusqlite::Result<Connection> {
    if immutable {
        return Connection::open_with_flags(
            immutable_uri(path),
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        );
    }
    let flags = if readonly {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    Connection::open_with_flags(path, flags)
}

/// The clone columns (12, 13, 14) of an inode row: all NULL, or all set.
fn clone_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<CloneRef>> {
    let pair: Option<u64> = r.get(12)?;
    let src: Option<u64> = r.get(13)?;
    let limit: Option<u64> = r.get(14)?;
    Ok(match (pair, src, limit) {
        (Some(pair), Some(src), Some(limit)) => Some(CloneRef { pair, src, limit }),
        _ => None,
    })
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

impl Meta {
    /// Creates a new database for `geometry`; refuses an existing file.
    pub fn create(path: &Path, geometry: &Geometry, now: i64) -> Result<Meta> {
        if path.exists() {
            return Err(Error::Exists(path.display().to_string()));
        }
        let conn = Connection::open(path)?;
        Self::pragmas(&conn)?;
        let tx = conn.unchecked_transaction()?;
        Self::init(&tx, geometry, now)?;
        tx.commit()?;
        Ok(Meta {
            conn,
            geometry: geometry.clone(),
            version: SCHEMA_VERSION,
            path: Some(path.to_path_buf()),
            immutable: false,
            tap: None,
        })
    }

    /// Writes the schema, the indexes, the super rows and the root directory of a new
    /// database (`now`: the root's times).
    fn init(conn: &Connection, geometry: &Geometry, now: i64) -> Result<()> {
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(INDEXES)?;
        conn.execute_batch(CLONE_INDEX)?;
        conn.execute_batch(SUMS_SCHEMA)?;
        conn.execute_batch(GENS_SCHEMA)?;
        for (k, v) in [
            ("format", "pairfs".to_string()),
            ("schema_version", SCHEMA_VERSION.to_string()),
            ("uuid", geometry.uuid.clone()),
            ("volume_size", geometry.size.to_string()),
            ("track_size", geometry.track_size.to_string()),
            ("next_ino", "2".to_string()),
            ("next_pair", "1".to_string()),
            ("clean", "1".to_string()),
            ("inode_count", "1".to_string()),
        ] {
            conn.execute(
                "INSERT INTO super(key, value) VALUES (?1, ?2)",
                params![k, v],
            )?;
        }
        conn.execute(
            "INSERT INTO inodes VALUES (1, ?1, ?2, 0, 0, 2, 0, ?3, ?3, ?3, 0, NULL, NULL, NULL, NULL)",
            params![libc::S_IFDIR, 0o755, now],
        )?;
        Ok(())
    }

    /// An in-memory database (tests).
    pub fn in_memory(geometry: &Geometry) -> Result<Meta> {
        let conn = Connection::open_in_memory()?;
        Self::init(&conn, geometry, 0)?;
        Ok(Meta {
            conn,
            geometry: geometry.clone(),
            version: SCHEMA_VERSION,
            path: None,
            immutable: false,
            tap: None,
        })
    }

    fn pragmas(conn: &Connection) -> Result<()> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(())
    }

    /// Opens an existing database and checks it is a pairfs database of a supported
    /// schema version. Read-only opens never modify the file.
    pub fn open(path: &Path, readonly: bool) -> Result<Meta> {
        Self::open_with(path, readonly, false)
    }

    /// Opens a database file that nothing writes while it is open (the copy a snapshot
    /// mount serves), read-only with SQLite's `immutable=1`: its reads take no file
    /// locks and make no hot-journal checks (most of the cost of many small read
    /// transactions on a rollback-journal file).
    pub fn open_immutable(path: &Path) -> Result<Meta> {
        Self::open_with(path, true, true)
    }

    fn open_with(path: &Path, readonly: bool, immutable: bool) -> Result<Meta> {
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "metadata database {} (made by `pairfs mkfs`)",
                path.display()
            )));
        }
        let conn = connect(path, readonly, immutable)
            .map_err(|e| corrupt(format!("{} is not a pairfs database: {e}", path.display())))?;
        let get = |k: &str| -> Result<String> {
            conn.query_row("SELECT value FROM super WHERE key = ?1", [k], |r| r.get(0))
                .optional()
                .map_err(|e| corrupt(format!("{} is not a pairfs database: {e}", path.display())))?
                .ok_or_else(|| corrupt(format!("{}: missing super key {k}", path.display())))
        };
        if get("format")? != "pairfs" {
            return Err(corrupt(format!(
                "{} is not a pairfs database",
                path.display()
            )));
        }
        let ver: u32 = get("schema_version")?
            .parse()
            .map_err(|_| corrupt("schema_version is not a number"))?;
        if !(1..=SCHEMA_VERSION).contains(&ver) {
            return Err(corrupt(format!(
                "{}: schema version {ver}, this pairfs reads versions 1 to {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let num = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|_| corrupt(format!("super key {k} is not a number")))
        };
        let geometry = Geometry {
            uuid: get("uuid")?,
            size: num("volume_size")?,
            track_size: num("track_size")?,
        };
        if !geometry.track_size.is_power_of_two()
            || !(4096..=1 << 20).contains(&geometry.track_size)
            || !geometry.size.is_multiple_of(geometry.track_size)
            || geometry.size < 2 * geometry.track_size
        {
            return Err(corrupt(format!("impossible geometry {geometry:?}")));
        }
        let mut version = ver;
        if !readonly {
            Self::pragmas(&conn)?;
            if ver < SCHEMA_VERSION {
                Self::migrate(&conn, ver)?;
                log::info!(
                    "{}: schema migrated from version {ver} to {SCHEMA_VERSION}",
                    path.display()
                );
                version = SCHEMA_VERSION;
            }
        }
        Ok(Meta {
            conn,
            geometry,
            version,
            path: Some(path.to_path_buf()),
            immutable,
            tap: None,
        })
    }

    /// Migrates a database of schema version `from` to [`SCHEMA_VERSION`] in one
    /// transaction: the frozen columns of version 2, then the on-demand indexes and the
    /// stored inode count of version 3 (one scan, once).
    fn migrate(conn: &Connection, from: u32) -> Result<()> {
        let tx = conn.unchecked_transaction()?;
        // A replica of the old schema cannot take this one's rows: no resuming its
        // stream (the next replica link does a full sync; `repl::link`).
        tx.execute(
            "DELETE FROM super WHERE key IN ('repl_peer_stream', 'repl_peer_seq')",
            [],
        )?;
        if from < 2 {
            let have: Vec<String> = {
                let mut q = tx.prepare("SELECT name FROM pragma_table_info('frozen')")?;
                q.query_map([], |r| r.get(0))?
                    .collect::<std::result::Result<_, _>>()?
            };
            for (col, sql) in FROZEN_COLUMNS_2 {
                if !have.iter().any(|c| c == col) {
                    tx.execute_batch(sql)?;
                }
            }
        }
        if from < 3 {
            tx.execute_batch(INDEXES)?;
            tx.execute(
                "INSERT OR REPLACE INTO super(key, value) \
                 SELECT 'inode_count', CAST(count(*) AS TEXT) FROM inodes",
                [],
            )?;
        }
        if from < SUMS_VERSION {
            Self::migrate_sums(&tx)?;
        }
        if from < LAZY_VERSION {
            let have: Vec<String> = {
                let mut q = tx.prepare("SELECT name FROM pragma_table_info('pairs')")?;
                q.query_map([], |r| r.get(0))?
                    .collect::<std::result::Result<_, _>>()?
            };
            if !have.iter().any(|c| c == "lazy_ino") {
                tx.execute_batch(
                    "ALTER TABLE pairs ADD COLUMN lazy_ino INTEGER NOT NULL DEFAULT 0",
                )?;
            }
        }
        if from < CLONE_VERSION {
            Self::migrate_clones(&tx)?;
        }
        if from < GENS_VERSION {
            tx.execute_batch(GENS_SCHEMA)?;
        }
        tx.execute(
            "UPDATE super SET value = ?1 WHERE key = 'schema_version'",
            [SCHEMA_VERSION.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Migration step to [`CLONE_VERSION`]: the clone columns of `inodes` (each added
    /// only if missing; NULL = not a clone) and their partial index. Runs inside the
    /// caller's migration transaction.
    fn migrate_clones(tx: &Connection) -> Result<()> {
        let have: Vec<String> = {
            let mut q = tx.prepare("SELECT name FROM pragma_table_info('inodes')")?;
            q.query_map([], |r| r.get(0))?
                .collect::<std::result::Result<_, _>>()?
        };
        for (col, sql) in CLONE_COLUMNS_6 {
            if !have.iter().any(|c| c == col) {
                tx.execute_batch(sql)?;
            }
        }
        tx.execute_batch(CLONE_INDEX)?;
        Ok(())
    }

    /// Migration step to [`SUMS_VERSION`]: the `sums` table, empty (tracks copied by an
    /// older version have no sum: reads and scrub pass them as unverified). Runs inside
    /// the caller's migration transaction.
    fn migrate_sums(tx: &Connection) -> Result<()> {
        tx.execute_batch(SUMS_SCHEMA)?;
        Ok(())
    }

    /// Every stored copy-image track checksum (none before schema version 4: a read-only
    /// open of an older database).
    pub fn load_sums(&self) -> Result<Vec<(u64, u32)>> {
        if self.version < SUMS_VERSION {
            return Ok(Vec::new());
        }
        let mut st = self.conn.prepare("SELECT track, crc FROM sums")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u32>(1)?)))?;
        let mut out = Vec::new();
        for r in rows {
            let (t, c) = r.map_err(|e| corrupt(format!("bad sums row: {e}")))?;
            if t == 0 || t >= self.geometry.tracks() {
                return Err(corrupt(format!("sum of track {t} outside the volume")));
            }
            out.push((t, c));
        }
        Ok(out)
    }

    /// A second, read-only connection for loading inodes on demand. It sees what
    /// commits made durable, never a transaction in progress.
    pub fn reader(&self) -> Result<Reader> {
        let path = self
            .path
            .as_ref()
            .ok_or_else(|| Error::invalid("an in-memory database has no reader"))?;
        let conn = connect(path, true, self.immutable)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        if self.immutable {
            // Nothing changes the file: one read transaction for the reader's life, so
            // no statement is checked and prepared again at each snapshot.
            conn.execute_batch("BEGIN DEFERRED")?;
        }
        Ok(Reader {
            conn,
            held: self.immutable,
            clones: self.version >= CLONE_VERSION,
        })
    }

    /// Volume geometry and identity.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Sets the clean-shutdown flag (durably).
    pub fn set_clean(&self, clean: bool) -> Result<()> {
        self.conn.execute(
            "UPDATE super SET value = ?1 WHERE key = 'clean'",
            [if clean { "1" } else { "0" }],
        )?;
        self.tapped();
        Ok(())
    }

    /// Installs a [`CommitTap`] (a replica link): from now on it sees every committed
    /// write transaction of this store.
    pub fn set_tap(&mut self, mut tap: Box<dyn CommitTap>) -> Result<()> {
        tap.install(&self.conn)?;
        self.tap = Some(std::sync::Mutex::new(tap));
        Ok(())
    }

    fn tapped(&self) {
        if let Some(t) = &self.tap {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .committed(&self.conn);
        }
    }

    /// A free-form `super` row (image locations, a migration's progress record), if set.
    pub fn super_value(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM super WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Sets (`Some`) or deletes (`None`) `super` rows, all in one durable transaction.
    pub fn set_super_values(&self, rows: &[(&str, Option<&str>)]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        for (k, v) in rows {
            match v {
                Some(v) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO super(key, value) VALUES (?1, ?2)",
                        [k, v],
                    )?;
                }
                None => {
                    tx.execute("DELETE FROM super WHERE key = ?1", [k])?;
                }
            }
        }
        tx.commit()?;
        self.tapped();
        Ok(())
    }

    /// What mount needs, without reading the inode table: counters, pairs, the used
    /// track runs (a scan of the extent table only) and the orphans (an indexed query).
    pub fn load(&self) -> Result<Loaded> {
        self.load_with(true)
    }

    /// [`Meta::load`], without the used track runs unless `extents` (a read-only open
    /// that never allocates, `Options::no_allocator`).
    pub fn load_with(&self, extents: bool) -> Result<Loaded> {
        let c = &self.conn;
        let get = |k: &str| -> Result<u64> {
            let v: String =
                c.query_row("SELECT value FROM super WHERE key = ?1", [k], |r| r.get(0))?;
            v.parse()
                .map_err(|_| corrupt(format!("super key {k} is not a number")))
        };
        let count: Option<String> = c
            .query_row(
                "SELECT value FROM super WHERE key = 'inode_count'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let inode_count = match count {
            Some(v) => v
                .parse()
                .map_err(|_| corrupt("super key inode_count is not a number"))?,
            // A version 1 database opened read-only.
            None => c.query_row("SELECT count(*) FROM inodes", [], |r| r.get(0))?,
        };
        let mut out = Loaded {
            next_ino: get("next_ino")?,
            next_pair: get("next_pair")?,
            clean: get("clean")? == 1,
            inode_count,
            ..Loaded::default()
        };
        if extents {
            let mut st = c.prepare("SELECT vtrack, len FROM extents")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))?;
            for r in rows {
                out.used
                    .push(r.map_err(|e| corrupt(format!("bad extent row: {e}")))?);
            }
        }
        let mut st = c.prepare("SELECT ino FROM inodes WHERE nlink = 0")?;
        let rows = st.query_map([], |r| r.get::<_, u64>(0))?;
        for r in rows {
            out.orphans.push(r?);
        }
        out.pairs = self.load_pairs()?;
        out.sums = self.load_sums()?;
        out.clones = self.load_clones()?;
        out.gens = self.load_gens()?;
        Ok(out)
    }

    /// The clones (with a name) and the pair each depends on; none before schema 6.
    pub fn load_clones(&self) -> Result<Vec<(u64, PairId)>> {
        if self.version < CLONE_VERSION {
            return Ok(Vec::new());
        }
        let mut st = self.conn.prepare(
            "SELECT ino, clone_pair FROM inodes WHERE clone_pair IS NOT NULL AND nlink > 0",
        )?;
        let rows = st.query_map([], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Loads every row (`fsck`), validating as it goes.
    pub fn load_all(&self) -> Result<Loaded> {
        let c = &self.conn;
        let get = |k: &str| -> Result<u64> {
            let v: String =
                c.query_row("SELECT value FROM super WHERE key = ?1", [k], |r| r.get(0))?;
            v.parse()
                .map_err(|_| corrupt(format!("super key {k} is not a number")))
        };
        let mut out = Loaded {
            next_ino: get("next_ino")?,
            next_pair: get("next_pair")?,
            clean: get("clean")? == 1,
            ..Loaded::default()
        };
        let mut st = c.prepare(
            if self.version >= CLONE_VERSION {
                "SELECT ino, kind, perm, uid, gid, nlink, size, atime, mtime, ctime, rdev, target, clone_pair, clone_src, clone_lim FROM inodes"
            } else {
                "SELECT ino, kind, perm, uid, gid, nlink, size, atime, mtime, ctime, rdev, target, NULL, NULL, NULL FROM inodes"
            },
        )?;
        let rows = st.query_map([], |r| {
            Ok(InodeRow {
                ino: r.get(0)?,
                kind: r.get(1)?,
                perm: r.get(2)?,
                uid: r.get(3)?,
                gid: r.get(4)?,
                nlink: r.get(5)?,
                size: r.get(6)?,
                atime: r.get(7)?,
                mtime: r.get(8)?,
                ctime: r.get(9)?,
                rdev: r.get(10)?,
                target: r.get(11)?,
                clone: clone_of(r)?,
            })
        })?;
        for r in rows {
            out.inodes
                .push(r.map_err(|e| corrupt(format!("bad inode row: {e}")))?);
        }
        let mut st =
            c.prepare("SELECT ino, ftrack, vtrack, len FROM extents ORDER BY ino, ftrack")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                Extent {
                    file: r.get(1)?,
                    vol: r.get(2)?,
                    len: r.get(3)?,
                },
            ))
        })?;
        for r in rows {
            out.extents
                .push(r.map_err(|e| corrupt(format!("bad extent row: {e}")))?);
        }
        let mut st = c.prepare("SELECT ino, name, value FROM xattrs")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        for r in rows {
            out.xattrs
                .push(r.map_err(|e| corrupt(format!("bad xattr row: {e}")))?);
        }
        let mut st = c.prepare("SELECT parent, name, ino FROM dirents")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        for r in rows {
            out.dirents
                .push(r.map_err(|e| corrupt(format!("bad dirent row: {e}")))?);
        }
        out.pairs = self.load_pairs()?;
        out.sums = self.load_sums()?;
        out.gens = self.load_gens()?;
        Ok(out)
    }

    fn load_pairs(&self) -> Result<Vec<Pair>> {
        let c = &self.conn;
        let mut st = c.prepare(if self.version >= LAZY_VERSION {
            "SELECT id, scope_kind, scope_ino, path, state, split_ns, error, total, copied, last_copied, started_ns, lazy_ino FROM pairs ORDER BY id"
        } else {
            "SELECT id, scope_kind, scope_ino, path, state, split_ns, error, total, copied, last_copied, started_ns, 0 FROM pairs ORDER BY id"
        })?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<String>>(6)?,
                [r.get::<_, u64>(7)?, r.get(8)?, r.get(9)?],
                (r.get::<_, i64>(10)?, r.get::<_, u64>(11)?),
            ))
        })?;
        let mut pairs = Vec::new();
        for r in rows {
            let (id, kind, ino, path, state, split_ns, error, prog, (started_ns, lazy_ino)) =
                r.map_err(|e| corrupt(format!("bad pair row: {e}")))?;
            let scope = match kind.as_str() {
                "file" => Scope::File(ino),
                "dir" => Scope::Dir(ino),
                "root" => Scope::Root,
                k => return Err(corrupt(format!("pair {id}: unknown scope kind {k:?}"))),
            };
            let state = PairState::parse(&state)
                .ok_or_else(|| corrupt(format!("pair {id}: unknown state {state:?}")))?;
            let mut p = Pair::new(id, scope, path, TrackSet::new(), started_ns);
            p.state = state;
            p.split_ns = split_ns;
            p.error = error;
            p.progress = Progress {
                total: prog[0],
                copied: prog[1],
                last_copied: prog[2],
                started_ns,
            };
            let mut bs = c.prepare("SELECT which, chunk, bits FROM bitmaps WHERE pair = ?1")?;
            let rows = bs.query_map([id], |r| {
                Ok((
                    r.get::<_, u8>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })?;
            for r in rows {
                let (which, chunk, bits) = r?;
                let set = match which {
                    0 => &mut p.forming,
                    1 => &mut p.split_diff,
                    2 => &mut p.update_diff,
                    w => return Err(corrupt(format!("pair {id}: unknown bitmap {w}"))),
                };
                if chunk > self.geometry.tracks() / crate::core::trackset::CHUNK_BITS {
                    return Err(corrupt(format!(
                        "pair {id}: bitmap chunk {chunk} beyond the volume"
                    )));
                }
                set.load_chunk(chunk, &bits)
                    .map_err(|e| corrupt(format!("pair {id}: {e}")))?;
            }
            for set in [&mut p.forming, &mut p.split_diff, &mut p.update_diff] {
                set.take_dirty();
            }
            p.set_frozen(self.load_frozen(id)?, (lazy_ino > 0).then_some(lazy_ino));
            pairs.push(p);
        }
        Ok(pairs)
    }

    /// The frozen records of pair (or generation) `id`, in order, validated.
    fn load_frozen(&self, id: PairId) -> Result<Vec<Frozen>> {
        let c = &self.conn;
        let mut out = Vec::new();
        let mut fs = c.prepare(if self.version >= 2 {
            "SELECT ino, path, kind, perm, uid, gid, size, atime, mtime, ctime, target, extents, rdev, links, xattrs FROM frozen WHERE pair = ?1 ORDER BY seq"
        } else {
            "SELECT ino, path, kind, perm, uid, gid, size, atime, mtime, ctime, target, extents, 0, x'', x'' FROM frozen WHERE pair = ?1 ORDER BY seq"
        })?;
        let rows = fs.query_map([id], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u8>(2)?,
                [r.get::<_, u32>(3)?, r.get(4)?, r.get(5)?],
                r.get::<_, u64>(6)?,
                [r.get::<_, i64>(7)?, r.get(8)?, r.get(9)?],
                r.get::<_, Vec<u8>>(10)?,
                r.get::<_, Vec<u8>>(11)?,
                (
                    r.get::<_, u32>(12)?,
                    r.get::<_, Vec<u8>>(13)?,
                    r.get::<_, Vec<u8>>(14)?,
                ),
            ))
        })?;
        for r in rows {
            let (ino, path, kind, pug, size, t, target, ext, (rdev, links, xattrs)) = r?;
            if kind == KIND_ABSENT {
                out.push(Frozen::absent(ino));
                continue;
            }
            let kind = FrozenKind::from_code(kind)
                .ok_or_else(|| corrupt(format!("pair {id}: frozen kind {kind}")))?;
            let links = decode_blobs(&links)
                .map_err(|e| corrupt(format!("pair {id}: frozen links: {e}")))?
                .into_iter()
                .map(|b| String::from_utf8(b).map_err(|_| corrupt("frozen link not UTF-8")))
                .collect::<Result<Vec<String>>>()?;
            let xattrs = decode_blobs(&xattrs)
                .map_err(|e| corrupt(format!("pair {id}: frozen xattrs: {e}")))?;
            if xattrs.len() % 2 != 0 {
                return Err(corrupt(format!("pair {id}: frozen xattrs: odd count")));
            }
            let mut it = xattrs.into_iter();
            let mut xa = Vec::new();
            while let (Some(n), Some(v)) = (it.next(), it.next()) {
                xa.push((n, v));
            }
            out.push(Frozen {
                ino,
                path,
                attr: FrozenAttr {
                    kind,
                    perm: pug[0],
                    uid: pug[1],
                    gid: pug[2],
                    size,
                    atime: t[0],
                    mtime: t[1],
                    ctime: t[2],
                    rdev,
                },
                links,
                xattrs: xa,
                extents: {
                    let m = decode_extents(&ext)
                        .map_err(|e| corrupt(format!("pair {id}: frozen extents: {e}")))?;
                    let tracks = self.geometry.tracks();
                    if let Some(e) = m.iter().find(|e| e.vol == 0 || e.vol + e.len > tracks) {
                        return Err(corrupt(format!(
                            "pair {id}: frozen extent {e:?} lies outside the volume"
                        )));
                    }
                    m
                },
                target,
                absent: false,
            });
        }
        Ok(out)
    }

    /// The named generations (none before schema 7): rows, records, saved tracks.
    pub fn load_gens(&self) -> Result<Vec<StoredGen>> {
        if self.version < GENS_VERSION {
            return Ok(Vec::new());
        }
        let c = &self.conn;
        let mut st = c.prepare(
            "SELECT id, pair, name, split_ns, lazy_ino, scope_kind, scope_ino, path FROM generations ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, u64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, u64>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (id, pair, name, split_ns, lazy_ino, kind, ino, path) =
                r.map_err(|e| corrupt(format!("bad generation row: {e}")))?;
            let scope = match kind.as_str() {
                "file" => Scope::File(ino),
                "dir" => Scope::Dir(ino),
                "root" => Scope::Root,
                k => {
                    return Err(corrupt(format!(
                        "generation {id}: unknown scope kind {k:?}"
                    )));
                }
            };
            out.push(StoredGen {
                id,
                row: GenRow {
                    pair,
                    name,
                    split_ns,
                    lazy_ino,
                    scope,
                    path,
                },
                frozen: Vec::new(),
                saved: Vec::new(),
            });
        }
        let tracks = self.geometry.tracks();
        for g in &mut out {
            g.frozen = self.load_frozen(g.id)?;
            let mut st = c.prepare_cached("SELECT vtrack, slot FROM gen_saved WHERE gen = ?1")?;
            let rows = st.query_map([g.id], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))?;
            for r in rows {
                let (v, s) = r?;
                if v == 0 || v >= tracks || s == 0 || s >= tracks {
                    return Err(corrupt(format!(
                        "generation {}: saved track {v} in slot {s} lies outside the volume",
                        g.id
                    )));
                }
                g.saved.push((v, s));
            }
        }
        Ok(out)
    }

    /// Writes one batch in one transaction (durable when this returns).
    pub fn commit(&mut self, b: &Batch) -> Result<()> {
        self.commit_batch(b)?;
        self.tapped();
        Ok(())
    }

    fn commit_batch(&mut self, b: &Batch) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut del_ext = tx.prepare_cached("DELETE FROM extents WHERE ino = ?1")?;
            let mut del_x = tx.prepare_cached("DELETE FROM xattrs WHERE ino = ?1")?;
            let mut put_i = tx.prepare_cached(
                "INSERT OR REPLACE INTO inodes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            let mut put_e = tx.prepare_cached("INSERT INTO extents VALUES (?1, ?2, ?3, ?4)")?;
            let mut put_x = tx.prepare_cached("INSERT INTO xattrs VALUES (?1, ?2, ?3)")?;
            for (i, exts, xattrs) in &b.inodes {
                put_i.execute(params![
                    i.ino,
                    i.kind,
                    i.perm,
                    i.uid,
                    i.gid,
                    i.nlink,
                    i.size,
                    i.atime,
                    i.mtime,
                    i.ctime,
                    i.rdev,
                    i.target,
                    i.clone.map(|c| c.pair),
                    i.clone.map(|c| c.src),
                    i.clone.map(|c| c.limit)
                ])?;
                del_ext.execute([i.ino])?;
                for e in exts {
                    put_e.execute(params![i.ino, e.file, e.vol, e.len])?;
                }
                del_x.execute([i.ino])?;
                for (n, v) in xattrs {
                    put_x.execute(params![i.ino, n, v])?;
                }
            }
            let mut del_i = tx.prepare_cached("DELETE FROM inodes WHERE ino = ?1")?;
            for &ino in &b.deleted {
                del_i.execute([ino])?;
                del_ext.execute([ino])?;
                del_x.execute([ino])?;
            }
            let mut del_d =
                tx.prepare_cached("DELETE FROM dirents WHERE parent = ?1 AND name = ?2")?;
            for (p, n) in &b.del_dirents {
                del_d.execute(params![p, n])?;
            }
            let mut put_d =
                tx.prepare_cached("INSERT OR REPLACE INTO dirents VALUES (?1, ?2, ?3)")?;
            for (p, n, i) in &b.put_dirents {
                put_d.execute(params![p, n, i])?;
            }
            if b.next_ino > 0 {
                tx.execute(
                    "UPDATE super SET value = ?1 WHERE key = 'next_ino'",
                    [b.next_ino.to_string()],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO super(key, value) VALUES ('inode_count', ?1)",
                    [b.inode_count.to_string()],
                )?;
            }
        }
        for d in &b.pairs {
            Self::write_pair(&tx, d)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn write_pair(tx: &rusqlite::Transaction<'_>, d: &PairDelta) -> Result<()> {
        if d.delete {
            tx.execute("DELETE FROM pairs WHERE id = ?1", [d.id])?;
            tx.execute("DELETE FROM bitmaps WHERE pair = ?1", [d.id])?;
            tx.execute("DELETE FROM frozen WHERE pair = ?1", [d.id])?;
            if d.generation.is_some() {
                tx.execute("DELETE FROM generations WHERE id = ?1", [d.id])?;
                tx.execute("DELETE FROM gen_saved WHERE gen = ?1", [d.id])?;
            }
            return Ok(());
        }
        if let Some(g) = &d.generation {
            tx.execute(
                "INSERT OR REPLACE INTO generations VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    d.id,
                    g.pair,
                    g.name,
                    g.split_ns,
                    g.lazy_ino,
                    g.scope.kind(),
                    g.scope.ino(),
                    g.path
                ],
            )?;
            tx.execute(
                "UPDATE super SET value = max(CAST(value AS INTEGER), ?1) WHERE key = 'next_pair'",
                [d.id + 1],
            )?;
        }
        if !d.saved.is_empty() {
            let mut put =
                tx.prepare_cached("INSERT OR REPLACE INTO gen_saved VALUES (?1, ?2, ?3)")?;
            for (v, slot) in &d.saved {
                put.execute(params![d.id, v, slot])?;
            }
        }
        if !d.sums.is_empty() {
            let mut put = tx.prepare_cached("INSERT OR REPLACE INTO sums VALUES (?1, ?2)")?;
            for (t, c) in &d.sums {
                put.execute(params![t, c])?;
            }
        }
        if let Some(r) = &d.row {
            tx.execute(
                "INSERT OR REPLACE INTO pairs VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    d.id,
                    r.scope.kind(),
                    r.scope.ino(),
                    r.path,
                    r.state.name(),
                    r.split_ns,
                    r.error,
                    r.progress.total,
                    r.progress.copied,
                    r.progress.last_copied,
                    r.progress.started_ns,
                    r.lazy_ino
                ],
            )?;
            tx.execute(
                "UPDATE super SET value = max(CAST(value AS INTEGER), ?1) WHERE key = 'next_pair'",
                [d.id + 1],
            )?;
        }
        {
            let mut put =
                tx.prepare_cached("INSERT OR REPLACE INTO bitmaps VALUES (?1, ?2, ?3, ?4)")?;
            let mut del = tx.prepare_cached(
                "DELETE FROM bitmaps WHERE pair = ?1 AND which = ?2 AND chunk = ?3",
            )?;
            for (w, ci, bits) in &d.chunks {
                match bits {
                    Some(b) => put.execute(params![d.id, w, ci, b])?,
                    None => del.execute(params![d.id, w, ci])?,
                };
            }
        }
        if d.frozen.is_some() {
            tx.execute("DELETE FROM frozen WHERE pair = ?1", [d.id])?;
        }
        if d.frozen.is_some() || !d.append.is_empty() {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO frozen VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?;
            let whole = d.frozen.iter().flat_map(|v| v.iter().enumerate());
            for (seq, f) in whole.chain(d.append.iter().map(|(k, f)| (*k, f))) {
                let kind = if f.absent {
                    KIND_ABSENT
                } else {
                    f.attr.kind.code()
                };
                let links = encode_blobs(f.links.iter().map(|l| l.as_bytes()));
                let xattrs = encode_blobs(
                    f.xattrs
                        .iter()
                        .flat_map(|(n, v)| [n.as_slice(), v.as_slice()]),
                );
                put.execute(params![
                    d.id,
                    seq as u64,
                    f.ino,
                    f.path,
                    kind,
                    f.attr.perm,
                    f.attr.uid,
                    f.attr.gid,
                    f.attr.size,
                    f.attr.atime,
                    f.attr.mtime,
                    f.attr.ctime,
                    f.target,
                    encode_extents(&f.extents),
                    f.attr.rdev,
                    links,
                    xattrs
                ])?;
            }
        }
        Ok(())
    }

    /// Copies the whole database to `dest` (a consistent snapshot, via `VACUUM INTO`).
    pub fn snapshot_to(&self, dest: &Path) -> Result<()> {
        let _ = std::fs::remove_file(dest);
        self.conn
            .execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
        Ok(())
    }

    /// Runs SQLite's own integrity check.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        let mut st = self.conn.prepare("PRAGMA integrity_check")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            let s = r?;
            if s != "ok" {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Raw connection (fsck repairs, tests).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

/// The read-only connection that loads inodes on demand (indexed point queries).
pub struct Reader {
    conn: Connection,
    /// One read transaction open for the reader's life (an immutable file).
    held: bool,
    /// The database has the clone columns (schema version 6).
    clones: bool,
}

/// One inode's rows as [`Reader::inode`] returns them.
#[derive(Debug)]
pub struct InodeLoad {
    /// The row.
    pub row: InodeRow,
    /// Names: (parent, name).
    pub links: Vec<(u64, Vec<u8>)>,
}

// The point queries compare with `+?1`, not `?1`: with `?1`, SQLite's planner uses the
// bound value to drop the ORDER BY (or DISTINCT), so every new binding expired the
// statement and it was parsed and planned again at each step (measured with
// `StatementStatus::RePrepare`: 1 per run). `+?1` keeps the same index search.
impl Reader {
    /// The row and names of an inode, or None if there is no such row.
    pub fn inode(&self, ino: u64) -> Result<Option<InodeLoad>> {
        let mut st = self.conn.prepare_cached(if self.clones {
            "SELECT ino, kind, perm, uid, gid, nlink, size, atime, mtime, ctime, rdev, target, \
             clone_pair, clone_src, clone_lim FROM inodes WHERE ino = ?1"
        } else {
            "SELECT ino, kind, perm, uid, gid, nlink, size, atime, mtime, ctime, rdev, target, \
             NULL, NULL, NULL FROM inodes WHERE ino = ?1"
        })?;
        let row = st
            .query_row([ino], |r| {
                Ok(InodeRow {
                    ino: r.get(0)?,
                    kind: r.get(1)?,
                    perm: r.get(2)?,
                    uid: r.get(3)?,
                    gid: r.get(4)?,
                    nlink: r.get(5)?,
                    size: r.get(6)?,
                    atime: r.get(7)?,
                    mtime: r.get(8)?,
                    ctime: r.get(9)?,
                    rdev: r.get(10)?,
                    target: r.get(11)?,
                    clone: clone_of(r)?,
                })
            })
            .optional()
            .map_err(|e| corrupt(format!("bad inode row {ino}: {e}")))?;
        let Some(row) = row else { return Ok(None) };
        let mut st = self.conn.prepare_cached(
            "SELECT parent, name FROM dirents WHERE ino = +?1 ORDER BY parent, name",
        )?;
        let links = st
            .query_map([ino], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Some(InodeLoad { row, links }))
    }

    /// Extents of an inode, in file order.
    pub fn extents(&self, ino: u64) -> Result<Vec<Extent>> {
        let mut st = self.conn.prepare_cached(
            "SELECT ftrack, vtrack, len FROM extents WHERE ino = +?1 ORDER BY ftrack",
        )?;
        let v = st
            .query_map([ino], |r| {
                Ok(Extent {
                    file: r.get(0)?,
                    vol: r.get(1)?,
                    len: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| corrupt(format!("bad extent row of {ino}: {e}")))?;
        Ok(v)
    }

    /// Xattrs of an inode.
    pub fn xattrs(&self, ino: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, value FROM xattrs WHERE ino = ?1")?;
        let v = st
            .query_map([ino], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    /// Entries of a directory: (name, ino), by name.
    pub fn children(&self, parent: u64) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, ino FROM dirents WHERE parent = +?1 ORDER BY name")?;
        let v = st
            .query_map([parent], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| corrupt(format!("bad entry of directory {parent}: {e}")))?;
        Ok(v)
    }

    /// Pairs whose committed frozen map holds `ino`.
    pub fn frozen_pairs(&self, ino: u64) -> Result<Vec<PairId>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT DISTINCT pair FROM frozen WHERE ino = +?1 AND kind != 7")?;
        let v = st
            .query_map([ino], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    /// Runs `f` in one read transaction (one consistent view of the database).
    pub fn snapshot<T>(&self, f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        // Cached like the queries: parsing BEGIN and COMMIT anew was a tenth of a
        // snapshot mount's view build.
        if self.held {
            return f(self);
        }
        self.conn.prepare_cached("BEGIN DEFERRED")?.execute([])?;
        let r = f(self);
        let end = self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]));
        let v = r?;
        end?;
        Ok(v)
    }
}

/// Encodes an extent map as little-endian (file, vol, len) triples.
pub fn encode_extents(m: &ExtentMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.iter().count() * 24);
    for e in m.iter() {
        out.extend_from_slice(&e.file.to_le_bytes());
        out.extend_from_slice(&e.vol.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    out
}

/// Encodes byte strings as (u32 length, bytes) records.
pub fn encode_blobs<'a>(items: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for b in items {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

/// Decodes [`encode_blobs`], refusing malformed input.
pub fn decode_blobs(mut b: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let Some((len, rest)) = b.split_first_chunk::<4>() else {
            return Err("truncated length".into());
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err("truncated record".into());
        }
        out.push(rest[..len].to_vec());
        b = &rest[len..];
    }
    Ok(out)
}

/// Decodes [`encode_extents`], refusing malformed input.
pub fn decode_extents(b: &[u8]) -> std::result::Result<ExtentMap, String> {
    if !b.len().is_multiple_of(24) {
        return Err(format!(
            "{} bytes is not a whole number of extents",
            b.len()
        ));
    }
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
    ExtentMap::from_extents(b.chunks_exact(24).map(|c| Extent {
        file: word(&c[0..8]),
        vol: word(&c[8..16]),
        len: word(&c[16..24]),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            uuid: "00112233445566778899aabbccddeeff".into(),
            size: 1 << 24,
            track_size: 65536,
        }
    }

    #[test]
    fn batch_round_trip_in_memory() {
        let mut m = Meta::in_memory(&geo()).unwrap();
        let row = InodeRow {
            ino: 2,
            kind: libc::S_IFREG,
            perm: 0o644,
            uid: 1,
            gid: 2,
            nlink: 1,
            size: 100,
            atime: 1,
            mtime: 2,
            ctime: 3,
            rdev: 0,
            target: None,
            clone: None,
        };
        let mut b = Batch {
            next_ino: 3,
            ..Batch::default()
        };
        b.inodes.push((
            row.clone(),
            vec![Extent {
                file: 0,
                vol: 5,
                len: 1,
            }],
            vec![(b"user.a".to_vec(), b"v".to_vec())],
        ));
        b.put_dirents.push((1, b"f".to_vec(), 2));
        let mut p = Pair::new(
            7,
            Scope::File(2),
            "/f".into(),
            [5u64].into_iter().collect(),
            0,
        );
        b.pairs.push(PairDelta {
            id: 7,
            row: Some(PairRow::of(&p)),
            chunks: take_dirty_chunks(&mut p),
            frozen: Some(vec![]),
            ..PairDelta::default()
        });
        m.commit(&b).unwrap();
        let l = m.load_all().unwrap();
        assert_eq!(l.inodes.iter().find(|i| i.ino == 2), Some(&row));
        assert_eq!(
            l.extents,
            vec![(
                2,
                Extent {
                    file: 0,
                    vol: 5,
                    len: 1
                }
            )]
        );
        assert_eq!(l.dirents, vec![(1, b"f".to_vec(), 2)]);
        assert_eq!(l.next_ino, 3);
        assert_eq!(l.next_pair, 8);
        assert_eq!(l.pairs.len(), 1);
        assert!(l.pairs[0].forming.contains(5));
        let mut d = Batch::default();
        d.deleted.push(2);
        d.del_dirents.push((1, b"f".to_vec()));
        m.commit(&d).unwrap();
        let l = m.load_all().unwrap();
        assert_eq!(l.inodes.len(), 1);
        assert!(l.extents.is_empty());
    }

    #[test]
    fn refuses_foreign_and_future_databases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.meta");
        std::fs::write(&p, b"this is not sqlite at all, just text padding padding").unwrap();
        assert!(matches!(Meta::open(&p, true), Err(Error::Corrupt(_))));
        let q = dir.path().join("y.meta");
        drop(Meta::create(&q, &geo(), 0).unwrap());
        let c = Connection::open(&q).unwrap();
        c.execute(
            "UPDATE super SET value = '99' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
        drop(c);
        let e = Meta::open(&q, false).err().unwrap();
        assert!(e.to_string().contains("schema version 99"), "{e}");
        assert!(matches!(
            Meta::open(&dir.path().join("missing"), false),
            Err(Error::NotFound(_))
        ));
    }

    fn frozen_pair(m: &mut Meta, f: Frozen) {
        let mut p = Pair::new(3, Scope::Dir(2), "/d".into(), TrackSet::new(), 0);
        let b = Batch {
            pairs: vec![PairDelta {
                id: 3,
                row: Some(PairRow::of(&p)),
                chunks: take_dirty_chunks(&mut p),
                frozen: Some(vec![f]),
                ..PairDelta::default()
            }],
            ..Batch::default()
        };
        m.commit(&b).unwrap();
    }

    #[test]
    fn frozen_rows_keep_links_xattrs_rdev_and_version_1_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("v.meta");
        let mut m = Meta::create(&q, &geo(), 0).unwrap();
        let f = Frozen {
            ino: 9,
            path: "d/a/f".into(),
            attr: FrozenAttr {
                kind: FrozenKind::CharDev,
                perm: 0o600,
                rdev: 0x0501,
                ..FrozenAttr::default()
            },
            links: vec!["d/b/g".into(), "d/h".into()],
            xattrs: vec![
                (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0, 1]),
                (b"user.empty".to_vec(), Vec::new()),
            ],
            ..Frozen::default()
        };
        frozen_pair(&mut m, f.clone());
        assert_eq!(m.load().unwrap().pairs[0].frozen, vec![f.clone()]);
        drop(m);
        // Make it a version-1 database: no rdev, links, xattrs columns.
        let c = Connection::open(&q).unwrap();
        c.execute_batch(
            "ALTER TABLE frozen DROP COLUMN rdev; ALTER TABLE frozen DROP COLUMN links;
             ALTER TABLE frozen DROP COLUMN xattrs;
             UPDATE super SET value = '1' WHERE key = 'schema_version';",
        )
        .unwrap();
        drop(c);
        let plain = Frozen {
            links: Vec::new(),
            xattrs: Vec::new(),
            attr: FrozenAttr {
                rdev: 0,
                ..f.attr.clone()
            },
            ..f.clone()
        };
        // A read-only open reads version 1 as is and changes nothing.
        let ro = Meta::open(&q, true).unwrap();
        assert_eq!(ro.load().unwrap().pairs[0].frozen, vec![plain.clone()]);
        drop(ro);
        let c = Connection::open(&q).unwrap();
        let v: String = c
            .query_row(
                "SELECT value FROM super WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, "1");
        drop(c);
        // A read-write open migrates, keeps the old rows and stores the new fields.
        let mut m = Meta::open(&q, false).unwrap();
        assert_eq!(m.load().unwrap().pairs[0].frozen, vec![plain]);
        frozen_pair(&mut m, f.clone());
        drop(m);
        let m = Meta::open(&q, true).unwrap();
        assert_eq!(m.load().unwrap().pairs[0].frozen, vec![f]);
    }

    #[test]
    fn sums_commit_with_the_bits_and_version_3_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("v.meta");
        let mut m = Meta::create(&q, &geo(), 0).unwrap();
        let b = Batch {
            pairs: vec![PairDelta {
                id: 3,
                sums: vec![(5, 0xdead_beef), (6, 0)],
                ..PairDelta::default()
            }],
            ..Batch::default()
        };
        m.commit(&b).unwrap();
        assert_eq!(m.load().unwrap().sums, vec![(5, 0xdead_beef), (6, 0)]);
        drop(m);
        // A version 3 database: no sums table.
        let c = Connection::open(&q).unwrap();
        c.execute_batch(
            "DROP TABLE sums; UPDATE super SET value = '3' WHERE key = 'schema_version';",
        )
        .unwrap();
        drop(c);
        // Read-only: read as it is, nothing written.
        let ro = Meta::open(&q, true).unwrap();
        assert!(ro.load().unwrap().sums.is_empty());
        drop(ro);
        let ver = || -> String {
            Connection::open(&q)
                .unwrap()
                .query_row(
                    "SELECT value FROM super WHERE key = 'schema_version'",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(ver(), "3");
        // Read-write: migrated in one transaction; sums work.
        let mut rw = Meta::open(&q, false).unwrap();
        assert_eq!(ver(), SCHEMA_VERSION.to_string());
        assert!(rw.load().unwrap().sums.is_empty());
        rw.commit(&Batch {
            pairs: vec![PairDelta {
                id: 3,
                sums: vec![(7, 1)],
                ..PairDelta::default()
            }],
            ..Batch::default()
        })
        .unwrap();
        assert_eq!(rw.load().unwrap().sums, vec![(7, 1)]);
    }

    #[test]
    fn clone_references_round_trip_and_version_5_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("v.meta");
        let mut m = Meta::create(&q, &geo(), 0).unwrap();
        let row = |ino, clone| InodeRow {
            ino,
            kind: libc::S_IFREG,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size: 10,
            atime: 0,
            mtime: 0,
            ctime: 0,
            rdev: 0,
            target: None,
            clone,
        };
        let c = CloneRef {
            pair: 4,
            src: 9,
            limit: 10,
        };
        let mut b = Batch {
            next_ino: 4,
            ..Batch::default()
        };
        b.inodes.push((row(2, Some(c)), vec![], vec![]));
        b.inodes.push((row(3, None), vec![], vec![]));
        m.commit(&b).unwrap();
        assert_eq!(m.load().unwrap().clones, vec![(2, 4)]);
        let r = m.reader().unwrap();
        assert_eq!(r.inode(2).unwrap().unwrap().row.clone, Some(c));
        assert_eq!(r.inode(3).unwrap().unwrap().row.clone, None);
        drop((m, r));
        // A version 5 database: no clone columns, no index.
        let conn = Connection::open(&q).unwrap();
        conn.execute_batch(
            "DROP INDEX inodes_clone; ALTER TABLE inodes DROP COLUMN clone_pair; \
             ALTER TABLE inodes DROP COLUMN clone_src; ALTER TABLE inodes DROP COLUMN clone_lim; \
             UPDATE super SET value = '5' WHERE key = 'schema_version';",
        )
        .unwrap();
        drop(conn);
        let ro = Meta::open(&q, true).unwrap();
        assert!(ro.load().unwrap().clones.is_empty());
        assert_eq!(ro.load_all().unwrap().inodes.len(), 3);
        drop(ro);
        let mut rw = Meta::open(&q, false).unwrap();
        let mut b = Batch::default();
        b.inodes.push((row(3, Some(c)), vec![], vec![]));
        rw.commit(&b).unwrap();
        assert_eq!(rw.load().unwrap().clones, vec![(3, 4)]);
        assert_eq!(
            rw.reader().unwrap().inode(2).unwrap().unwrap().row.clone,
            None
        );
    }

    #[test]
    fn blob_list_is_validated() {
        let items: Vec<&[u8]> = vec![b"a", b"", b"xyz"];
        let e = encode_blobs(items.iter().copied());
        assert_eq!(
            decode_blobs(&e).unwrap(),
            vec![b"a".to_vec(), vec![], b"xyz".to_vec()]
        );
        assert!(decode_blobs(&e[..e.len() - 1]).is_err());
        assert!(decode_blobs(&[1, 0]).is_err());
    }

    #[test]
    fn extent_blob_is_validated() {
        assert!(decode_extents(&[0u8; 23]).is_err());
        let mut m = ExtentMap::new();
        m.insert(0, 3, 2);
        assert_eq!(decode_extents(&encode_extents(&m)).unwrap(), m);
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;

    /// The reader's cached statements are planned once, not at every new binding.
    #[test]
    fn point_queries_are_not_prepared_again_per_binding() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.db");
        let g = Geometry {
            uuid: "00112233445566778899aabbccddeeff".into(),
            size: 1 << 24,
            track_size: 65536,
        };
        drop(Meta::create(&p, &g, 0).unwrap());
        for immutable in [false, true] {
            let m = Meta::open_with(&p, true, immutable).unwrap();
            let r = m.reader().unwrap();
            for i in 1..=20u64 {
                r.snapshot(|r| {
                    r.inode(i)?;
                    r.extents(i)?;
                    r.xattrs(i)?;
                    r.children(i)?;
                    r.frozen_pairs(i)?;
                    Ok(())
                })
                .unwrap();
            }
            for sql in [
                "SELECT parent, name FROM dirents WHERE ino = +?1 ORDER BY parent, name",
                "SELECT ftrack, vtrack, len FROM extents WHERE ino = +?1 ORDER BY ftrack",
                "SELECT name, ino FROM dirents WHERE parent = +?1 ORDER BY name",
                "SELECT DISTINCT pair FROM frozen WHERE ino = +?1 AND kind != 7",
            ] {
                let st = r.conn.prepare_cached(sql).unwrap();
                assert_eq!(
                    st.get_status(rusqlite::StatementStatus::RePrepare),
                    0,
                    "{sql} (immutable {immutable})"
                );
                assert!(
                    st.get_status(rusqlite::StatementStatus::Run) >= 1,
                    "{sql} not run"
                );
            }
        }
    }
}
