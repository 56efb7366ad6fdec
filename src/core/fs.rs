//! The filesystem core: POSIX operations on cached inodes (loaded from SQLite on demand,
//! evicted when the kernel forgets them or over a budget; see [`NamespaceState`]), data on a
//! [`Volume`], metadata committed to SQLite in batches. No FUSE types here: every operation takes
//! plain arguments and returns [`Result`]; `fuse_main` converts and replies.
//!
//! [`Fs`] is the facade: it owns the namespace, the images, the barrier (split instants:
//! [`Fs::control`]), the durability pipeline and the pair engine, which it builds with its
//! handles and calls with itself as the engine's
//! [`crate::snap::namespace::Namespace`] (implemented at the end of this file).
//!
//! Concurrency: the lock order is in [`crate::core::locks`]. Data I/O runs with only the
//! barrier and the inode's `data_lock` held.
//!
//! Write ordering (see `docs/design.md`):
//! 1. new tracks are allocated and zeroed (discarded) before data is written into them;
//! 2. copy-on-write copies are durable on the copy image, with their bits durably
//!    cleared, before the host data is written over them ([`crate::snap::engine`]);
//! 3. a metadata commit goes through [`crate::core::durability`]: volume sync, copy-image
//!    sync, then the batch;
//! 4. freed tracks are reused only after the commit that frees them is durable.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use crate::core::alloc::Allocator;
use crate::core::clone::{Dependents, backed_ranges};
use crate::core::durability::{BatchSource, Durability};
use crate::core::extent::{Extent, Segment};
use crate::core::inode::{AtimePolicy, Inode};
use crate::core::migrate::{Migrator, Places, Which};
use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};
use crate::meta::{Batch, Geometry, InodeLoad, InodeRow, Loaded, Meta, PairDelta, Reader};
use crate::snap::engine::{Engine, Handles, Op, Piece};
use crate::snap::namespace::Namespace;
use crate::snap::pair::{Frozen, FrozenAttr, FrozenKind, PairId, Pins, Scope};
use crate::store::migrate::MigratingVolume;
use crate::store::volume::{Checked, Volume};

mod clones;

/// Root inode number.
pub const ROOT: u64 = 1;
/// Longest name.
pub const NAME_MAX: usize = 255;
/// Largest file size (8 EiB would overflow track math; 2^62 is plenty).
pub const MAX_FILE_SIZE: u64 = 1 << 62;
/// Most names one inode may have.
pub const LINK_MAX: u32 = 65000;
/// True for the xattr names stored as ordinary xattrs: `user.*`, `trusted.*`,
/// `security.*` and the POSIX ACLs (`system.posix_acl_access`,
/// `system.posix_acl_default`, passed through by the kernel; an access ACL is tied to the
/// mode bits by [`crate::core::acl`], and the kernel's permission checks use the mode).
pub fn stored_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name.starts_with(b"trusted.")
        || name.starts_with(b"security.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// Largest xattr value.
pub const XATTR_SIZE_MAX: usize = 65536;
/// Deepest directory nesting a walk up the parents follows (the tree has no cycles:
/// mount checks it and rename refuses to create one, so this only bounds the work).
pub const MAX_DEPTH: usize = 100_000;

/// Bytes copied per volume read/write when a file split on its own inside a group moves
/// its pinned tracks (`snap::group`).
const MOVE_CHUNK_BYTES: u64 = 1 << 20;

pub use crate::core::now_ns;

/// Who is asking.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// The creating process's umask (create, mkdir, mknod): applied unless the parent
    /// directory has a default ACL, which replaces it (POSIX.1e).
    pub umask: u32,
}

/// Attributes returned to the adapter.
#[derive(Debug, Clone)]
pub struct Attr {
    /// The inode row.
    pub row: InodeRow,
    /// Allocated bytes.
    pub allocated: u64,
}

/// Attribute changes of `setattr`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    /// New mode (permission bits).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New atime (ns); `Some(None)` means now.
    pub atime: Option<Option<i64>>,
    /// New mtime (ns); `Some(None)` means now.
    pub mtime: Option<Option<i64>>,
    /// New ctime.
    pub ctime: Option<i64>,
}

/// Free space report.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    /// Tracks on the volume.
    pub tracks: u64,
    /// Free tracks.
    pub free: u64,
    /// Track size.
    pub track_size: u64,
    /// Inodes in use.
    pub inodes: u64,
}

/// How a directory entry changed, for the batch.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub inodes: HashSet<u64>,
    pub deleted: HashSet<u64>,
    pub dirents: HashMap<(u64, Vec<u8>), Option<u64>>,
}

/// Everything behind the state lock.
///
/// `inodes` is a cache: an inode is read from the database when first used
/// ([`Fs::want`]) and dropped again when it is clean (not dirty, not in a commit in
/// progress, not open, no operation holding its data lock) and the kernel forgot it
/// ([`Fs::forget`]) or the cache is over its budget ([`Fs::shrink`]). A dirty or
/// committing inode is always cached, so the database plus the cache is the truth;
/// a directory in the cache always holds all its entries.
pub struct NamespaceState {
    /// Cached inodes by number.
    pub inodes: HashMap<u64, Inode>,
    /// Track allocator.
    pub alloc: Allocator,
    pub(crate) next_ino: u64,
    pub(crate) dirty: Dirty,
    pub(crate) handles: HashMap<u64, u64>,
    pub(crate) next_fh: u64,
    /// Reads inodes on demand.
    pub(crate) reader: Reader,
    /// Inodes in use (statfs, persisted with each commit).
    pub(crate) inode_count: u64,
    /// The kernel's lookup count per inode (FUSE `forget` lowers it); kept apart from
    /// the cache so an evicted inode keeps it.
    pub(crate) nlookup: HashMap<u64, u64>,
    /// Inodes of the batch being committed: not evictable until it is durable.
    pub(crate) committing: HashSet<u64>,
    /// Entries of the cached directories, as loaded (approximate: a cached directory
    /// that grows is counted at its size when evicted); part of the cache's weight.
    pub(crate) entries: usize,
    /// Weight (cached inodes plus their directory entries) allowed before
    /// [`Fs::shrink`] evicts clean inodes.
    pub(crate) budget: usize,
    /// Size at which [`Fs::shrink`] next scans (raised after a scan that could not
    /// evict enough, e.g. while many inodes are dirty, so scans stay amortized).
    pub(crate) shrink_at: usize,
}

impl NamespaceState {
    /// An inode or ENOENT.
    pub fn get(&self, ino: u64) -> Result<&Inode> {
        self.inodes
            .get(&ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }
    /// A mutable inode or ENOENT.
    pub fn get_mut(&mut self, ino: u64) -> Result<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }
    /// Marks an inode for the next commit.
    pub fn touch(&mut self, ino: u64) {
        self.dirty.inodes.insert(ino);
    }
    fn set_dirent(&mut self, parent: u64, name: &[u8], ino: Option<u64>) {
        self.dirty.dirents.insert((parent, name.to_vec()), ino);
    }
    fn dir_lookup(&self, parent: u64, name: &[u8]) -> Result<u64> {
        let p = self.get(parent)?;
        let d = p.dir.as_ref().ok_or(Error::NotDir)?;
        d.get(name)
            .ok_or_else(|| Error::NotFound(String::from_utf8_lossy(name).into_owned()))
    }

    /// True if the inode may leave the cache.
    fn evictable(&self, ino: u64) -> bool {
        ino != ROOT
            && !self.dirty.inodes.contains(&ino)
            && !self.committing.contains(&ino)
            && self
                .inodes
                .get(&ino)
                .is_some_and(|i| i.open == 0 && Arc::strong_count(&i.data_lock) == 1)
    }

    /// Takes an inode out of the cache.
    fn evict(&mut self, ino: u64) -> Option<Inode> {
        let i = self.inodes.remove(&ino)?;
        if let Some(d) = i.dir.as_ref() {
            self.entries = self.entries.saturating_sub(d.len());
        }
        Some(i)
    }

    /// What the cache holds: inodes plus directory entries.
    fn weight(&self) -> usize {
        self.inodes.len() + self.entries
    }

    /// Counts one more kernel lookup (an entry reply).
    pub(crate) fn looked_up(&mut self, ino: u64) {
        *self.nlookup.entry(ino).or_default() += 1;
    }
}

/// Options of an open filesystem.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds between background metadata commits.
    pub commit_interval: Duration,
    /// Open read-only.
    pub readonly: bool,
    /// Path of the metadata database (for the whole-volume snapshot).
    pub meta_path: Option<std::path::PathBuf>,
    /// Path of the copy image (locked against snapshot mounts while the root pair's
    /// copy is rewritten).
    pub copy_path: Option<std::path::PathBuf>,
    /// Cache weight (inodes plus entries of cached directories) kept in memory before
    /// clean inodes are evicted.
    pub cache_inodes: usize,
    /// Where the volume image is (as mounted; for a migration's locks and record).
    pub volume_image: Option<std::path::PathBuf>,
    /// Where the copy image is (as mounted).
    pub copy_image: Option<std::path::PathBuf>,
    /// A replica to attach at mount (`--replica`).
    pub replica: Option<crate::core::durability::ReplicaHook>,
    /// A read-only open that never allocates (the secondary's copy mount, which opens
    /// once per applied commit): the extent table is not scanned for the allocator, so
    /// the allocator's free-space figures mean nothing. Needs `readonly`.
    pub no_allocator: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            commit_interval: Duration::from_millis(1000),
            readonly: false,
            meta_path: None,
            copy_path: None,
            cache_inodes: 65_536,
            volume_image: None,
            copy_image: None,
            replica: None,
            no_allocator: false,
        }
    }
}

/// The filesystem core.
pub struct Fs {
    /// Geometry.
    pub geo: Geometry,
    /// Track size.
    pub track_size: u64,
    /// The volume image.
    pub vol: Arc<Checked>,
    /// The copy image.
    pub copy: Arc<Checked>,
    /// The namespace: cached inodes, allocator, handles (lock 6 in [`crate::core::locks`]).
    pub namespace: Mutex<NamespaceState>,
    /// Split instants take this exclusively; every data-changing operation shares it.
    pub barrier: RwLock<()>,
    /// The metadata store.
    pub meta: Arc<Mutex<Meta>>,
    /// Every data sync and metadata commit goes through here.
    pub durability: Arc<Durability>,
    /// Which files changed shape (extents, size) since which commit: `fdatasync` of a
    /// file whose shape is committed only needs its data synced.
    layout: Mutex<Layout>,
    /// Pairs.
    pub engine: Engine,
    /// Options.
    pub opts: Options,
    stop: Mutex<bool>,
    stop_cv: Condvar,
    /// Inodes evicted from the cache (statistics).
    pub evictions: AtomicU64,
    /// Lookup counts, inodes and entries freed by forgets (heap trimming).
    forgotten: AtomicU64,
    /// Online migration of the images (`pairfs migrate`).
    pub migrator: Migrator,
    /// Which writable clones read from which pair's frozen copy (a leaf lock).
    clones: Mutex<Dependents>,
}

/// Shape changes of files, stamped in order, and the stamp the last commit covered.
#[derive(Debug, Default)]
struct Layout {
    seq: u64,
    /// Stamp of each file's last shape change not known to be committed.
    by_ino: HashMap<u64, u64>,
    /// Stamp when the batch being committed was taken.
    taken: u64,
    /// Every change stamped up to here is durable.
    committed: u64,
}

/// One inode's rows read in one database snapshot.
struct Fetched {
    load: InodeLoad,
    extents: Vec<Extent>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    children: Vec<(Vec<u8>, u64)>,
}

impl Fs {
    /// Builds the core from loaded metadata and open images.
    pub fn new(
        meta: Meta,
        loaded: Loaded,
        vol: Box<dyn Volume>,
        copy: Box<dyn Volume>,
        opts: Options,
    ) -> Result<Fs> {
        let geo = meta.geometry().clone();
        let ts = geo.track_size;
        let mut alloc = Allocator::new(geo.tracks());
        // The allocator's bitmap comes from the extent table alone (overlaps are refused);
        // inodes are read when used.
        for &(v, l) in &loaded.used {
            if l == 0 {
                return Err(Error::Corrupt(format!("empty extent at track {v}")));
            }
            alloc.mark_used(v, l)?;
        }
        let mut clones = Dependents::default();
        for &(ino, pair) in &loaded.clones {
            clones.add(pair, ino);
        }
        let reader = meta.reader()?;
        match reader.inode(ROOT)? {
            Some(r) if r.row.kind == libc::S_IFDIR => {}
            _ => return Err(Error::Corrupt("the root directory is missing".into())),
        }
        let mut st = NamespaceState {
            inodes: HashMap::new(),
            alloc,
            next_ino: loaded.next_ino.max(2),
            dirty: Dirty::default(),
            handles: HashMap::new(),
            next_fh: 1,
            reader,
            inode_count: loaded.inode_count,
            nlookup: HashMap::new(),
            committing: HashSet::new(),
            entries: 0,
            budget: opts.cache_inodes.max(64),
            shrink_at: opts.cache_inodes.max(64),
        };
        // Orphans: inodes with no name left (unlinked while open, then a crash or an
        // unmount); found by an indexed query, not a scan.
        for ino in loaded.orphans {
            if ino == ROOT {
                return Err(Error::Corrupt("the root directory has link count 0".into()));
            }
            if opts.readonly {
                log::debug!("orphan inode {ino}: left out of this read-only open");
            } else {
                log::info!("removing orphan inode {ino}");
            }
            if !opts.no_allocator {
                for e in st.reader.extents(ino)? {
                    st.alloc.free(e.vol, e.len);
                }
            }
            st.inode_count = st.inode_count.saturating_sub(1);
            st.dirty.deleted.insert(ino);
        }
        // Both images can be moved while mounted (`pairfs migrate`).
        let mvol = Arc::new(MigratingVolume::new(Arc::from(vol), "volume image"));
        let mcopy = Arc::new(MigratingVolume::new(Arc::from(copy), "copy image"));
        let migrator = Migrator::new(
            mvol.clone(),
            mcopy.clone(),
            ts,
            geo.tracks(),
            Places {
                meta: opts.meta_path.clone().unwrap_or_default(),
                volume: opts.volume_image.clone().unwrap_or_default(),
                copy: opts.copy_image.clone().unwrap_or_default(),
            },
        );
        let vol = Arc::new(Checked::new(Box::new(mvol), "volume"));
        let copy = Arc::new(Checked::new(Box::new(mcopy), "copy image"));
        let meta = Arc::new(Mutex::new(meta));
        let durability = Arc::new(Durability::new(vol.clone(), copy.clone(), meta.clone()));
        let engine = Engine::new(Handles {
            vol: vol.clone(),
            copy: copy.clone(),
            track_size: ts,
            durability: durability.clone(),
            copy_path: opts.copy_path.clone(),
        });
        let fs = Fs {
            geo,
            track_size: ts,
            durability,
            layout: Mutex::new(Layout::default()),
            vol,
            copy,
            namespace: Mutex::new(st),
            barrier: RwLock::new(()),
            meta,
            engine,
            opts,
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            evictions: AtomicU64::new(0),
            forgotten: AtomicU64::new(0),
            migrator,
            clones: Mutex::new(clones),
        };
        fs.engine.load_sums(fs.geo.tracks(), &loaded.sums);
        fs.engine
            // A read-only open recovers nothing after an unclean stop: the record
            // bitmaps it would widen serve only a later update, and widening them walks
            // every pair's scope (a secondary's copy mount opens once per commit).
            .load(
                &fs,
                loaded.pairs,
                loaded.clean || fs.opts.readonly,
                loaded.next_pair,
            )?;
        fs.engine
            .clean_at_load
            .store(loaded.clean, std::sync::atomic::Ordering::Relaxed);
        fs.engine.load_gens(&fs, loaded.gens)?;
        if !fs.opts.readonly && fs.opts.volume_image.is_some() {
            fs.migrator.resume(&fs.durability, &fs.meta)?;
        }
        Ok(fs)
    }

    /// Runs a pair control operation on inode `ino` (`user.pairfs.<op>`). Split
    /// instants belong to the facade: it takes the write barrier, so no host change is
    /// in flight, and the engine runs the operation under it.
    pub fn control(&self, ino: u64, op: Op) -> Result<()> {
        Fs::check_readonly(&self.opts)?;
        if matches!(op, Op::Pair | Op::Split) {
            // Pairing a clone (or a tree holding clones) detaches them first: a frozen
            // copy holds only a file's own tracks.
            self.detach_new_scope(ino)?;
        }
        let b = self.barrier.write().unwrap_or_else(|p| p.into_inner());
        self.engine.control(self, &b, ino, op)
    }

    /// Runs `op` (split, update or release) on generation `name` of the pair whose
    /// scope's top is `ino` (`setfattr -n user.pairfs.split -v NAME PATH`).
    pub fn control_gen(&self, ino: u64, name: &str, op: Op) -> Result<()> {
        Fs::check_readonly(&self.opts)?;
        let b = self.barrier.write().unwrap_or_else(|p| p.into_inner());
        self.engine.gen_control(self, &b, ino, name, op)
    }

    /// Runs `op` on pair `id` directly, e.g. to release a pair whose file was deleted
    /// (`setfattr -n user.pairfs.release -v ID MOUNTPOINT`).
    pub fn control_id(&self, id: PairId, op: Op) -> Result<()> {
        Fs::check_readonly(&self.opts)?;
        let b = self.barrier.write().unwrap_or_else(|p| p.into_inner());
        self.engine.control_id(self, &b, id, op)
    }

    /// The byte ranges of regular file `ino` changed since its pair's instant
    /// (`pairfs diff`, [`crate::snap::diff`]). Takes the write barrier, so every write
    /// is wholly before (and reported) or after; reads no data.
    pub fn diff(&self, ino: u64, generation: Option<&str>) -> Result<crate::snap::diff::FileDiff> {
        let _b = self.barrier.write().unwrap_or_else(|p| p.into_inner());
        let (now, size, pid) = {
            let st = self.state_with(ino)?;
            let i = st.get(ino)?;
            if i.is_dir() {
                return Err(Error::IsDir);
            }
            if !i.is_file() {
                return Err(Error::invalid("diff: not a regular file"));
            }
            (i.extents.clone(), i.row.size, i.pair)
        };
        let pid = pid.ok_or_else(|| Error::invalid("diff: not paired (split it first)"))?;
        match generation {
            Some(g) => {
                // A generation learns of an overwrite when the destage round saves the
                // old track: staged writes are saved first.
                self.engine.destage(self)?;
                self.engine.gen_diff(pid, g, ino, &now, size)
            }
            None => self.engine.diff(pid, ino, &now, size),
        }
    }

    fn check_readonly(opts: &Options) -> Result<()> {
        if opts.readonly {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Locks the state.
    pub fn state(&self) -> MutexGuard<'_, NamespaceState> {
        self.namespace.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the state with `ino` in the cache.
    pub fn state_with(&self, ino: u64) -> Result<MutexGuard<'_, NamespaceState>> {
        let mut st = self.state();
        self.want(&mut st, ino)?;
        Ok(st)
    }

    /// True if `dir` is `a` or one of its ancestors (loading uncached ancestors). The
    /// walk is bounded by [`MAX_DEPTH`]; a longer chain can only be a corrupt tree and
    /// is refused.
    fn is_ancestor(&self, st: &mut NamespaceState, dir: u64, mut a: u64) -> Result<bool> {
        for _ in 0..MAX_DEPTH {
            if a == dir {
                return Ok(true);
            }
            if a == ROOT {
                return Ok(false);
            }
            self.want(st, a)?;
            a = st.get(a)?.parent().unwrap_or(ROOT);
        }
        Err(Error::Corrupt(format!(
            "directory {a} is nested more than {MAX_DEPTH} deep"
        )))
    }

    /// Brings `ino` into the cache, reading it (and any uncached ancestors, so that its
    /// pair can be inherited) from the database. ENOENT if there is no such inode.
    pub fn want(&self, st: &mut NamespaceState, ino: u64) -> Result<()> {
        if st.inodes.contains_key(&ino) {
            return Ok(());
        }
        // Not cached while deleted or committing means deleted: the database may
        // still hold the row until the commit.
        if ino == 0 || st.dirty.deleted.contains(&ino) || st.committing.contains(&ino) {
            return Err(Error::NotFound(format!("inode {ino}")));
        }
        let inodes = &st.inodes;
        let chain = st.reader.snapshot(|r| {
            let mut chain: Vec<Fetched> = Vec::new();
            let mut cur = ino;
            loop {
                let load = r
                    .inode(cur)?
                    .ok_or_else(|| Error::NotFound(format!("inode {cur}")))?;
                if load.row.nlink == 0 {
                    return Err(Error::NotFound(format!("inode {cur} (removed)")));
                }
                let parent = load.links.first().map(|l| l.0);
                let children = if load.row.kind == libc::S_IFDIR {
                    r.children(cur)?
                } else {
                    Vec::new()
                };
                chain.push(Fetched {
                    extents: r.extents(cur)?,
                    xattrs: r.xattrs(cur)?,
                    children,
                    load,
                });
                match parent {
                    Some(p) if cur != ROOT && !inodes.contains_key(&p) => cur = p,
                    _ => break,
                }
                if chain.len() > 1 << 16 {
                    return Err(Error::Corrupt(format!(
                        "inode {ino}: no way up to the root (directory cycle)"
                    )));
                }
            }
            Ok(chain)
        })?;
        for f in chain.into_iter().rev() {
            self.install(st, f)?;
        }
        Ok(())
    }

    /// Like [`Fs::want`], but Ok(false) if the inode does not exist.
    pub fn try_want(&self, st: &mut NamespaceState, ino: u64) -> Result<bool> {
        match self.want(st, ino) {
            Ok(()) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Checks and caches one fetched inode; its parent is cached already.
    fn install(&self, st: &mut NamespaceState, f: Fetched) -> Result<()> {
        let ino = f.load.row.ino;
        let mut i = Inode::new(f.load.row);
        if ino == ROOT && !i.is_dir() {
            return Err(Error::Corrupt("the root directory is missing".into()));
        }
        for e in f.extents {
            if !i.is_file()
                || e.len == 0
                || i.extents
                    .segments(e.file, e.len)
                    .iter()
                    .any(|s| s.vol.is_some())
            {
                return Err(Error::Corrupt(format!("bad extent {e:?} of inode {ino}")));
            }
            i.extents.insert(e.file, e.vol, e.len);
        }
        i.xattrs.extend(f.xattrs);
        if let Some(d) = i.dir.as_mut() {
            for (name, child) in f.children {
                d.insert(name, child);
            }
            let want = usize::from(ino != ROOT);
            if f.load.links.len() != want {
                return Err(Error::Corrupt(format!(
                    "directory {ino} has {} names (expected {want})",
                    f.load.links.len()
                )));
            }
        }
        i.links = f.load.links;
        i.pair = self.derive_pair(st, ino, i.parent())?;
        st.entries += i.dir.as_ref().map_or(0, |d| d.len());
        st.inodes.insert(ino, i);
        Ok(())
    }

    /// Scope membership of an inode being loaded: the pair whose scope it is the top
    /// of, else the pair whose committed frozen map holds it (most specific scope,
    /// then lowest id), else its parent directory's pair.
    fn derive_pair(
        &self,
        st: &NamespaceState,
        ino: u64,
        parent: Option<u64>,
    ) -> Result<Option<u64>> {
        if !self.engine.has_pairs() {
            return Ok(None);
        }
        if let Some(id) = self.engine.owner_of(ino) {
            return Ok(Some(id));
        }
        let held = st.reader.frozen_pairs(ino)?;
        if let Some(id) = self.engine.first_claim(&held) {
            return Ok(Some(id));
        }
        Ok(parent
            .filter(|_| ino != ROOT)
            .and_then(|p| st.inodes.get(&p))
            .and_then(|p| p.pair))
    }

    /// The kernel forgot `n` lookups of `ino` (FUSE `forget`): at zero a clean inode
    /// leaves the cache.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.state();
        if let Some(c) = st.nlookup.get_mut(&ino) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                st.nlookup.remove(&ino);
                // Weight: one for the lookup count, one per inode and directory entry freed.
                let mut weight = 1;
                if st.evictable(ino)
                    && let Some(i) = st.evict(ino)
                {
                    weight += 1 + i.dir.as_ref().map_or(0, |d| d.len() as u64);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                self.freed_weight(st, weight);
            }
        }
    }

    /// Counts what forgets freed; every so often hands freed heap back to the system
    /// (the kernel forgets in bursts, e.g. when it drops its caches).
    fn freed_weight(&self, mut st: MutexGuard<'_, NamespaceState>, n: u64) {
        const TRIM_EVERY: u64 = 16384;
        let before = self.forgotten.fetch_add(n, Ordering::Relaxed);
        if before / TRIM_EVERY != (before + n) / TRIM_EVERY {
            // Hash tables keep their capacity when emptied: give it back too.
            if st.inodes.capacity() > 4 * st.inodes.len() + 1024 {
                st.inodes.shrink_to_fit();
            }
            if st.nlookup.capacity() > 4 * st.nlookup.len() + 1024 {
                st.nlookup.shrink_to_fit();
            }
            drop(st);
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free heap pages; no Rust object is touched.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// The adapter handed the kernel an entry for `ino` (readdirplus).
    pub fn remember(&self, ino: u64) {
        self.state().looked_up(ino);
    }

    /// The inodes with an open handle (each once).
    pub fn open_inodes(&self) -> Vec<u64> {
        let st = self.state();
        let mut v: Vec<u64> = st.handles.values().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Cached inodes and kernel-known inodes (statistics, tests).
    pub fn cache_stats(&self) -> (usize, usize) {
        let st = self.state();
        (st.inodes.len(), st.nlookup.len())
    }

    /// Over budget, evicts clean inodes down to three quarters of it. Call only where
    /// no caller relies on an inode staying cached (end of an operation).
    pub fn shrink(&self, st: &mut NamespaceState) {
        // (Table capacity is given back in `freed_weight`, on the kernel's forgets.)
        if st.weight() <= st.shrink_at {
            return;
        }
        let target = st.budget * 3 / 4;
        let candidates: Vec<u64> = st
            .inodes
            .keys()
            .copied()
            .filter(|&i| st.evictable(i))
            .collect();
        let mut n = 0;
        for v in candidates {
            if st.weight() <= target {
                break;
            }
            st.evict(v);
            n += 1;
        }
        st.shrink_at = st.budget.max(st.weight() + st.budget / 4);
        self.evictions.fetch_add(n, Ordering::Relaxed);
    }

    /// Path of an inode relative to the root (`a/b`), following first links.
    pub fn path_of(&self, st: &mut NamespaceState, mut ino: u64) -> Result<String> {
        let mut parts = Vec::new();
        let mut guard = 0;
        while ino != ROOT && guard < 1 << 16 {
            if !self.try_want(st, ino)? {
                break;
            }
            let Some((p, n)) = st.get(ino)?.links.first() else {
                break;
            };
            parts.push(String::from_utf8_lossy(n).into_owned());
            ino = *p;
            guard += 1;
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    /// Every inode beneath (and including) `top`, breadth first, all left cached.
    pub fn subtree(&self, st: &mut NamespaceState, top: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        self.walk(st, top, false, |ino, _| out.push(ino))?;
        Ok(out)
    }

    /// Visits every inode beneath (and including) `top`, breadth first. With `shrink`
    /// the cache is trimmed to its budget as the walk goes (memory stays bounded; the
    /// visitor must not rely on earlier inodes staying cached).
    pub fn walk(
        &self,
        st: &mut NamespaceState,
        top: u64,
        shrink: bool,
        mut f: impl FnMut(u64, &Inode),
    ) -> Result<()> {
        // `seen` also stops at cycles a corrupt database could contain.
        let mut queue = std::collections::VecDeque::from([top]);
        let mut seen: HashSet<u64> = HashSet::from([top]);
        while let Some(ino) = queue.pop_front() {
            if !self.try_want(st, ino)? {
                continue;
            }
            let i = st.get(ino)?;
            f(ino, i);
            if let Some(d) = i.dir.as_ref() {
                for (_, child) in d.iter() {
                    if seen.insert(child) {
                        queue.push_back(child);
                    }
                }
            }
            if shrink {
                self.shrink(st);
            }
        }
        Ok(())
    }

    /// Refuses changes on a read-only mount or after a metadata failure.
    pub fn check_writable(&self) -> Result<()> {
        if self.opts.readonly {
            return Err(Error::ReadOnly);
        }
        self.durability.check()
    }

    fn attr_of(&self, i: &Inode) -> Attr {
        Attr {
            row: i.row.clone(),
            allocated: i.extents.tracks() * self.track_size,
        }
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let mut st = self.state_with(ino)?;
        let a = self.attr_of(st.get(ino)?);
        self.shrink(&mut st);
        Ok(a)
    }

    /// Looks an inode up by number, as the kernel does to decode a file handle
    /// (`open_by_handle_at(2)`, NFS export: a lookup of "." in the inode itself). A
    /// removed inode is stale even while an open file keeps it: the kernel asks only
    /// once it dropped the inode from its own cache, so no open file can be reached
    /// through it. Counts as a lookup, as the kernel counts it.
    pub fn lookup_handle(&self, ino: u64) -> Result<Attr> {
        let mut st = self.state_with(ino)?;
        let i = st.get(ino)?;
        if i.row.nlink == 0 {
            return Err(Error::Stale);
        }
        let a = self.attr_of(i);
        st.looked_up(ino);
        self.shrink(&mut st);
        Ok(a)
    }

    /// Looks a name up in a directory.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        let mut st = self.state_with(parent)?;
        let ino = st.dir_lookup(parent, name)?;
        self.want(&mut st, ino)?;
        let a = self.attr_of(st.get(ino)?);
        st.looked_up(ino);
        self.shrink(&mut st);
        Ok(a)
    }

    fn check_name(name: &[u8]) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(Error::invalid("bad name"));
        }
        Ok(())
    }

    /// Creates an inode named `name`; `mode` is the type (`S_IFREG`, `S_IFDIR`, ...)
    /// and the permission bits.
    pub fn create_node(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
    ) -> Result<Attr> {
        let kind = mode & libc::S_IFMT;
        self.check_writable()?;
        Self::check_name(name)?;
        let now = now_ns();
        let mut st = self.state_with(parent)?;
        let p = st.get(parent)?;
        let pdir = p.dir.as_ref().ok_or(Error::NotDir)?;
        if pdir.get(name).is_some() {
            return Err(Error::Exists(String::from_utf8_lossy(name).into_owned()));
        }
        if p.row.nlink == 0 {
            return Err(Error::NotFound("directory was removed".into()));
        }
        if kind == libc::S_IFDIR && p.row.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        // A default ACL on the parent replaces the umask: the new object's access ACL is
        // that ACL limited by the mode asked for, and a directory inherits it as its own
        // default ACL (`acl::inherit`). Symlinks take neither.
        let default_acl = (kind != libc::S_IFLNK)
            .then(|| p.xattrs.get(crate::core::acl::DEFAULT).cloned())
            .flatten();
        let (mut perm, access_acl) = match &default_acl {
            Some(d) => crate::core::acl::inherit(d, mode & 0o7777)?,
            None => (mode & 0o7777 & !ctx.umask, None),
        };
        // BSD/SysV group semantics: a set-gid directory passes its group on.
        let gid = if p.row.perm & libc::S_ISGID != 0 {
            if kind == libc::S_IFDIR {
                perm |= libc::S_ISGID;
            }
            p.row.gid
        } else {
            ctx.gid
        };
        let pair = p.pair.filter(|&pid| self.engine.inherits(pid));
        self.freeze_before(&mut st, parent)?;
        let ino = st.next_ino;
        st.next_ino += 1;
        let row = InodeRow {
            ino,
            kind,
            perm,
            uid: ctx.uid,
            gid,
            nlink: if kind == libc::S_IFDIR { 2 } else { 1 },
            size: target.as_ref().map_or(0, |t| t.len() as u64),
            atime: now,
            mtime: now,
            ctime: now,
            rdev,
            target,
            clone: None,
        };
        let mut inode = Inode::new(row);
        inode.links.push((parent, name.to_vec()));
        inode.pair = pair;
        if let Some(a) = access_acl {
            inode.xattrs.insert(crate::core::acl::ACCESS.to_vec(), a);
        }
        if let Some(d) = default_acl.filter(|_| kind == libc::S_IFDIR) {
            inode.xattrs.insert(crate::core::acl::DEFAULT.to_vec(), d);
        }
        let attr = self.attr_of(&inode);
        st.inodes.insert(ino, inode);
        st.inode_count += 1;
        st.looked_up(ino);
        let p = st.get_mut(parent)?;
        p.dir.as_mut().expect("dir").insert(name.to_vec(), ino);
        if kind == libc::S_IFDIR {
            p.row.nlink += 1;
        }
        p.row.mtime = now;
        p.row.ctime = now;
        st.touch(parent);
        st.touch(ino);
        st.set_dirent(parent, name, Some(ino));
        // A new file is not on disk yet: its first fdatasync commits it.
        self.layout_changed(ino);
        Ok(attr)
    }

    /// Reads a symlink.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.state_with(ino)?;
        st.get(ino)?
            .row
            .target
            .clone()
            .ok_or_else(|| Error::invalid("not a symlink"))
    }

    /// Adds a hard link.
    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        self.check_writable()?;
        Self::check_name(newname)?;
        let now = now_ns();
        let mut st = self.state_with(ino)?;
        self.want(&mut st, newparent)?;
        let i = st.get(ino)?;
        if i.is_dir() {
            return Err(Error::NotPermitted);
        }
        if i.row.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        let p = st.get(newparent)?;
        let d = p.dir.as_ref().ok_or(Error::NotDir)?;
        if d.get(newname).is_some() {
            return Err(Error::Exists(String::from_utf8_lossy(newname).into_owned()));
        }
        if p.row.nlink == 0 {
            return Err(Error::NotFound("directory was removed".into()));
        }
        // A linked clone stays out of directory and volume pairs (see `rename`).
        if st.get(ino)?.row.clone.is_some()
            && st
                .get(newparent)?
                .pair
                .is_some_and(|q| self.engine.inherits(q))
        {
            return Err(Error::CrossDevice);
        }
        self.freeze_before(&mut st, ino)?;
        self.freeze_before(&mut st, newparent)?;
        let p = st.get_mut(newparent)?;
        p.dir.as_mut().expect("dir").insert(newname.to_vec(), ino);
        p.row.mtime = now;
        p.row.ctime = now;
        let i = st.get_mut(ino)?;
        i.row.nlink += 1;
        i.row.ctime = now;
        i.links.push((newparent, newname.to_vec()));
        let attr = self.attr_of(i);
        st.touch(ino);
        st.touch(newparent);
        st.set_dirent(newparent, newname, Some(ino));
        st.looked_up(ino);
        Ok(attr)
    }

    /// Removes a name; frees the inode when its last name and handle are gone.
    pub fn unlink(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        self.check_writable()?;
        let _b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ns();
        let mut st = self.state_with(parent)?;
        let ino = st.dir_lookup(parent, name)?;
        self.want(&mut st, ino)?;
        let i = st.get(ino)?;
        if dir {
            let d = i.dir.as_ref().ok_or(Error::NotDir)?;
            if !d.is_empty() {
                return Err(Error::NotEmpty);
            }
            if ino == ROOT {
                return Err(Error::Busy("root".into()));
            }
        } else if i.is_dir() {
            return Err(Error::IsDir);
        }
        self.freeze_before(&mut st, parent)?;
        self.freeze_before(&mut st, ino)?;
        self.remove_entry(&mut st, parent, name, ino, now);
        Ok(())
    }

    fn remove_entry(&self, st: &mut NamespaceState, parent: u64, name: &[u8], ino: u64, now: i64) {
        let is_dir = st.inodes[&ino].is_dir();
        let p = st.inodes.get_mut(&parent).expect("parent exists");
        p.dir.as_mut().expect("dir").remove(name);
        p.row.mtime = now;
        p.row.ctime = now;
        if is_dir {
            p.row.nlink -= 1;
        }
        st.touch(parent);
        st.set_dirent(parent, name, None);
        let i = st.inodes.get_mut(&ino).expect("inode exists");
        if let Some(pos) = i.links.iter().position(|l| l.0 == parent && l.1 == name) {
            i.links.remove(pos);
        }
        i.row.ctime = now;
        i.row.nlink = if is_dir {
            0
        } else {
            i.row.nlink.saturating_sub(1)
        };
        st.touch(ino);
        self.maybe_free(st, ino);
    }

    /// Frees an inode with no names and no open handles.
    fn maybe_free(&self, st: &mut NamespaceState, ino: u64) {
        let Some(i) = st.inodes.get(&ino) else { return };
        if i.row.nlink > 0 || i.open > 0 || !i.links.is_empty() {
            return;
        }
        let i = st.evict(ino).expect("exists");
        if i.row.clone.is_some() {
            self.dependents().remove(ino);
        }
        st.inode_count = st.inode_count.saturating_sub(1);
        let freed: Vec<u64> = i.extents.vol_tracks().collect();
        for e in i.extents.iter() {
            st.alloc.free(e.vol, e.len);
        }
        self.engine.drop_staged(freed.iter().copied());
        if let Some(pid) = i.pair {
            self.engine.freed(pid, &freed);
        }
        st.dirty.inodes.remove(&ino);
        st.dirty.deleted.insert(ino);
    }

    /// Renames, with `RENAME_NOREPLACE` and `RENAME_EXCHANGE` support.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.check_writable()?;
        Self::check_name(newname)?;
        let _b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(Error::invalid("unsupported rename flags"));
        }
        let now = now_ns();
        let mut st = self.state_with(parent)?;
        self.want(&mut st, newparent)?;
        let src = st.dir_lookup(parent, name)?;
        self.want(&mut st, src)?;
        st.get(newparent)?.dir.as_ref().ok_or(Error::NotDir)?;
        let dst = st.get(newparent)?.dir.as_ref().expect("dir").get(newname);
        if let Some(d) = dst {
            self.want(&mut st, d)?;
        }
        let src_dir = st.get(src)?.is_dir();
        // A directory may not move beneath itself.
        if src_dir && self.is_ancestor(&mut st, src, newparent)? {
            return Err(Error::invalid("cannot move a directory beneath itself"));
        }
        // A linked clone may not join a pair's scope: its frozen copy would miss the
        // tracks the clone still reads from its backing (`mv` copies on EXDEV). With
        // RENAME_EXCHANGE the target moves the other way.
        let mut moving = vec![(src, newparent)];
        if exchange && let Some(d) = dst {
            moving.push((d, parent));
        }
        for (top, to) in moving {
            if st.get(to)?.pair.is_some_and(|p| self.engine.inherits(p))
                && st.get(top)?.pair.is_none()
                && !self.dependents().is_empty()
            {
                for ino in self.subtree(&mut st, top)? {
                    if st.get(ino)?.row.clone.is_some() {
                        return Err(Error::CrossDevice);
                    }
                }
            }
        }
        // Lazy instants: each object this rename changes is frozen first; one moving
        // into a lazily split directory pair it was not a member of is marked absent
        // there (its unchanged subtree then stays out of that pair's view).
        for ino in [Some(parent), Some(newparent), Some(src), dst]
            .into_iter()
            .flatten()
        {
            self.freeze_before(&mut st, ino)?;
        }
        if let Some(tp) = st.get(newparent)?.pair.filter(|&p| self.engine.inherits(p))
            && st.get(src)?.pair != Some(tp)
        {
            self.freeze_in_all(&mut st, tp, src)?;
        }
        if exchange {
            let dst = dst.ok_or_else(|| Error::NotFound("exchange target".into()))?;
            let dst_dir = st.get(dst)?.is_dir();
            if dst_dir && self.is_ancestor(&mut st, dst, parent)? {
                return Err(Error::invalid("cannot move a directory beneath itself"));
            }
            st.get_mut(parent)?
                .dir
                .as_mut()
                .expect("dir")
                .insert(name.to_vec(), dst);
            st.get_mut(newparent)?
                .dir
                .as_mut()
                .expect("dir")
                .insert(newname.to_vec(), src);
            for (ino, from, fname, to, tname) in [
                (src, parent, name, newparent, newname),
                (dst, newparent, newname, parent, name),
            ] {
                let i = st.get_mut(ino)?;
                if let Some(l) = i.links.iter_mut().find(|l| l.0 == from && l.1 == fname) {
                    *l = (to, tname.to_vec());
                }
                i.row.ctime = now;
                st.touch(ino);
            }
            if src_dir != dst_dir && parent != newparent {
                let (a, b) = if src_dir {
                    (parent, newparent)
                } else {
                    (newparent, parent)
                };
                st.get_mut(a)?.row.nlink -= 1;
                st.get_mut(b)?.row.nlink += 1;
            }
            for p in [parent, newparent] {
                let pi = st.get_mut(p)?;
                pi.row.mtime = now;
                pi.row.ctime = now;
                st.touch(p);
            }
            st.set_dirent(parent, name, Some(dst));
            st.set_dirent(newparent, newname, Some(src));
            return Ok(());
        }
        if let Some(dst) = dst {
            if dst == src {
                return Ok(());
            }
            if noreplace {
                return Err(Error::Exists(String::from_utf8_lossy(newname).into_owned()));
            }
            let d = st.get(dst)?;
            match (src_dir, d.is_dir()) {
                (true, false) => return Err(Error::NotDir),
                (false, true) => return Err(Error::IsDir),
                (true, true) if !d.dir.as_ref().expect("dir").is_empty() => {
                    return Err(Error::NotEmpty);
                }
                _ => {}
            }
            self.remove_entry(&mut st, newparent, newname, dst, now);
        }
        // Move.
        let p = st.get_mut(parent)?;
        p.dir.as_mut().expect("dir").remove(name);
        p.row.mtime = now;
        p.row.ctime = now;
        if src_dir {
            p.row.nlink -= 1;
        }
        let np = st.get_mut(newparent)?;
        np.dir.as_mut().expect("dir").insert(newname.to_vec(), src);
        np.row.mtime = now;
        np.row.ctime = now;
        if src_dir {
            np.row.nlink += 1;
        }
        let np_pair = np.pair;
        let i = st.get_mut(src)?;
        if let Some(l) = i.links.iter_mut().find(|l| l.0 == parent && l.1 == name) {
            *l = (newparent, newname.to_vec());
        }
        i.row.ctime = now;
        // Moving into a directory pair joins it (unless the file has a pair of its own);
        // moving out of one leaves it now, as the next load would decide, unless that
        // pair's frozen copy holds the inode (it keeps copy-on-write wherever it goes)
        // or another name keeps it in the scope.
        let old = i.pair;
        let target = np_pair.filter(|&p| self.engine.inherits(p));
        let leaves = old.is_some_and(|p| Some(p) != target && self.engine.inherits(p));
        if (old.is_none() && target.is_some()) || leaves {
            let sub = self.subtree(&mut st, src)?;
            for ino in sub {
                let n = st.get_mut(ino)?;
                let switch = match n.pair {
                    None => target.is_some(),
                    Some(p) => {
                        leaves
                            && Some(p) == old
                            && !self.engine.holds(p, ino)
                            && (n.is_dir() || n.links.len() <= 1)
                    }
                };
                if !switch {
                    continue;
                }
                let tracks: Vec<u64> = n.extents.vol_tracks().collect();
                let from = n.pair;
                n.pair = target;
                if let Some(a) = from {
                    self.engine.left(a, &tracks);
                }
                if let Some(pid) = target {
                    self.engine.written(pid, &tracks);
                }
            }
        }
        st.touch(src);
        st.touch(parent);
        st.touch(newparent);
        st.set_dirent(parent, name, None);
        st.set_dirent(newparent, newname, Some(src));
        Ok(())
    }

    /// Changes attributes; a size change truncates or extends.
    pub fn setattr(&self, ctx: Ctx, ino: u64, a: SetAttr) -> Result<Attr> {
        let changes = a.mode.is_some()
            || a.uid.is_some()
            || a.gid.is_some()
            || a.size.is_some()
            || a.atime.is_some()
            || a.mtime.is_some()
            || a.ctime.is_some();
        if changes {
            self.check_writable()?;
        }
        if let Some(size) = a.size {
            self.truncate(ino, size)?;
        }
        let now = now_ns();
        let mut st = self.state_with(ino)?;
        if changes {
            self.freeze_before(&mut st, ino)?;
        }
        let i = st.get_mut(ino)?;
        if let Some(m) = a.mode {
            i.row.perm = m & 0o7777;
            i.row.ctime = now;
            // chmod rewrites the owner, group-class and other entries of an access ACL.
            if let Some(acl) = i.xattrs.get_mut(crate::core::acl::ACCESS)
                && let Ok(new) = crate::core::acl::chmod(acl, i.row.perm)
            {
                *acl = new;
            }
        }
        let owner_change =
            a.uid.is_some_and(|u| u != i.row.uid) || a.gid.is_some_and(|g| g != i.row.gid);
        if let Some(u) = a.uid {
            i.row.uid = u;
            i.row.ctime = now;
        }
        if let Some(g) = a.gid {
            i.row.gid = g;
            i.row.ctime = now;
        }
        if owner_change && !i.is_dir() && (ctx.uid != 0 || i.row.perm & 0o111 != 0) {
            // chown clears set-user-id, and set-group-id when group-executable.
            i.row.perm &= !libc::S_ISUID;
            if i.row.perm & libc::S_IXGRP != 0 {
                i.row.perm &= !libc::S_ISGID;
            }
        }
        if let Some(t) = a.atime {
            i.row.atime = t.unwrap_or(now);
            i.row.ctime = now;
        }
        if let Some(t) = a.mtime {
            i.row.mtime = t.unwrap_or(now);
            i.row.ctime = now;
        }
        if let Some(t) = a.ctime {
            i.row.ctime = t;
        }
        let attr = self.attr_of(i);
        st.touch(ino);
        Ok(attr)
    }

    fn data_lock(&self, ino: u64) -> Result<Arc<RwLock<()>>> {
        Ok(self.state_with(ino)?.get(ino)?.data_lock.clone())
    }

    /// Sets the size of a regular file.
    pub fn truncate(&self, ino: u64, size: u64) -> Result<()> {
        self.check_writable()?;
        if size > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let _b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
        let dl = self.data_lock(ino)?;
        let _d = dl.write().unwrap_or_else(|p| p.into_inner());
        let ts = self.track_size;
        let now = now_ns();
        let (zero, pid) = {
            let mut st = self.state();
            let i = st.get(ino)?;
            if i.is_dir() {
                return Err(Error::IsDir);
            }
            if !i.is_file() {
                return Err(Error::invalid("truncate of a special file"));
            }
            self.freeze_before(&mut st, ino)?;
            let i = st.get(ino)?;
            let old = i.row.size;
            let pid = i.pair;
            let mut zero = None;
            if let Some(c) = st.get(ino)?.row.clone
                && size < c.limit
            {
                // Bytes past a shrink read zero after a later extension.
                st.get_mut(ino)?.row.clone = Some(c.truncated(size));
            }
            if size < old {
                let keep = size.div_ceil(ts);
                let freed = self.unmap(&mut st, ino, keep, u64::MAX - keep)?;
                if let Some(pid) = pid {
                    self.engine.freed(pid, &freed);
                }
                if !size.is_multiple_of(ts)
                    && let Some(v) = st.get(ino)?.extents.lookup(size / ts)
                {
                    let end = ((size / ts) + 1) * ts;
                    zero = Some((
                        (ino, size / ts, v),
                        size % ts,
                        end.min(old.div_ceil(ts) * ts) - size,
                    ));
                }
            }
            let i = st.get_mut(ino)?;
            if size != old {
                i.row.size = size;
                self.layout_changed(ino);
                i.row.mtime = now;
                i.row.ctime = now;
            }
            st.touch(ino);
            (zero, pid)
        };
        if let Some((at, off_in_track, len)) = zero {
            self.write_tracks_zero(pid, at, off_in_track, len)?;
        }
        Ok(())
    }

    /// Zeroes part of one mapped track (copy-on-write first if a pair needs it).
    fn write_tracks_zero(
        &self,
        pid: Option<u64>,
        (ino, ftrack, v): (u64, u64, u64),
        off: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if let Some(pid) = pid {
            self.engine.cow(self, pid, &[v])?;
        }
        self.engine.gen_save(self, &[v])?;
        {
            // A truncate by path holds no open handle: the file may have lost its last
            // name (and its tracks) while we waited for the copy. Zero only a track it
            // still maps, under the state lock so it cannot be freed meanwhile.
            let st = self.state();
            if st.inodes.get(&ino).and_then(|i| i.extents.lookup(ftrack)) != Some(v) {
                return Ok(());
            }
            let zeros = vec![0u8; len as usize];
            // A staged track takes the zeros in memory (its newer content is there).
            if !self.engine.patch_staged(v, off, &zeros) {
                self.vol.write_at(v * self.track_size + off, &zeros)?;
            }
        }
        if let Some(pid) = pid {
            self.engine.written(pid, &[v]);
        }
        Ok(())
    }

    /// Unmaps file tracks `[f, f+n)`, freeing them. Returns the volume tracks freed.
    fn unmap(&self, st: &mut NamespaceState, ino: u64, f: u64, n: u64) -> Result<Vec<u64>> {
        let runs = st.get_mut(ino)?.extents.remove(f, n);
        if !runs.is_empty() {
            self.layout_changed(ino);
        }
        let mut freed = Vec::new();
        for (v, l) in runs {
            st.alloc.free(v, l);
            freed.extend(v..v + l);
        }
        self.engine.drop_staged(freed.iter().copied());
        Ok(freed)
    }

    /// Maps every hole of file tracks `[f0, f0+n)` to new, zeroed tracks. Returns the
    /// volume tracks allocated.
    fn map_range(&self, st: &mut NamespaceState, ino: u64, f0: u64, n: u64) -> Result<Vec<u64>> {
        let holes: Vec<Segment> = st
            .get(ino)?
            .extents
            .segments(f0, n)
            .into_iter()
            .filter(|s| s.vol.is_none())
            .collect();
        let need: u64 = holes.iter().map(|s| s.len).sum();
        if need == 0 {
            return Ok(Vec::new());
        }
        if st.alloc.free_tracks() < need {
            return Err(Error::NoSpace("volume"));
        }
        self.layout_changed(ino);
        let mut new = Vec::new();
        for h in holes {
            let goal = st.get(ino)?.extents.goal_for(h.file);
            let runs = st.alloc.allocate(goal, h.len)?;
            let mut f = h.file;
            for (v, l) in runs {
                // Zero every new track before it is mapped, even one the caller is about
                // to overwrite whole: until that write lands (or if it fails, or the
                // extent is committed first and we crash) readers must see zeros, never
                // the data of the file that had the track before.
                self.vol.discard(v * self.track_size, l * self.track_size)?;
                self.engine.drop_staged(v..v + l);
                st.get_mut(ino)?.extents.insert(f, v, l);
                new.extend(v..v + l);
                f += l;
            }
        }
        Ok(new)
    }

    /// Reads up to `size` bytes at `off`.
    pub fn read(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(ino, off, size, &mut buf, AtimePolicy::Never)?;
        Ok(buf)
    }

    /// Reads up to `size` bytes at `off` into `buf` (its old contents are dropped, its
    /// capacity reused: the FUSE adapter passes one buffer per worker thread). Returns
    /// whether `atime` says the read is due to update the access time, judged on the
    /// inode as the read found it (the caller then runs [`Fs::note_read`], which checks
    /// again; a read that is not due costs no second hold of the namespace lock).
    ///
    /// One hold of the namespace lock finds the inode, takes its data lock shared with
    /// `try_read` (never blocking under the namespace lock, so the lock order of
    /// [`crate::core::locks`] holds: if a truncate, punch or fallocate holds it, the
    /// namespace lock is dropped, the data lock awaited, and the namespace lock taken
    /// again) and reads the extent map.
    pub fn read_into(
        &self,
        ino: u64,
        off: u64,
        size: u32,
        buf: &mut Vec<u8>,
        atime: AtimePolicy,
    ) -> Result<bool> {
        buf.clear();
        self.engine.host_io();
        let ts = self.track_size;
        let mut st = self.state_with(ino)?;
        let dl = st.get(ino)?.data_lock.clone();
        let _d: std::sync::RwLockReadGuard<'_, ()>;
        match dl.try_read() {
            Ok(g) => _d = g,
            Err(std::sync::TryLockError::Poisoned(p)) => _d = p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                drop(st);
                _d = dl.read().unwrap_or_else(|p| p.into_inner());
                // The data lock's holder keeps the inode cached (`Arc` count).
                st = self.state_with(ino)?;
            }
        }
        let (segs, len, clone, due) = {
            let i = st.get(ino)?;
            if i.is_dir() {
                return Err(Error::IsDir);
            }
            let due = atime != AtimePolicy::Never && atime.due(&i.row, now_ns());
            if off >= i.row.size {
                return Ok(due);
            }
            let len = (size as u64).min(i.row.size - off);
            let f0 = off / ts;
            let f1 = (off + len - 1) / ts;
            (i.extents.segments(f0, f1 - f0 + 1), len, i.row.clone, due)
        };
        drop(st);
        // Staged writes first (see `snap::stage`): a track destaged after this is on
        // the volume by the time we read it.
        let staged = self.engine.staged_of(
            segs.iter()
                .filter_map(|s| s.vol.map(|v| v..v + s.len))
                .flatten(),
        );
        buf.resize(len as usize, 0);
        // A clone's unwritten tracks below its limit read its frozen source (the same
        // checked path as the copy mount); past the limit they read zero.
        if let Some(c) = clone {
            for (a, b) in backed_ranges(&segs, c.limit, ts, off, len) {
                let d = self
                    .engine
                    .read_frozen_ino(self, c.pair, c.src, a, (b - a) as u32)?;
                let at = (a - off) as usize;
                let n = d.len().min((b - a) as usize);
                buf[at..at + n].copy_from_slice(&d[..n]);
            }
        }
        for s in segs {
            let Some(v) = s.vol else { continue };
            let seg_start = s.file * ts;
            let seg_end = (s.file + s.len) * ts;
            let a = seg_start.max(off);
            let b = seg_end.min(off + len);
            if a >= b {
                continue;
            }
            let voff = v * ts + (a - seg_start);
            self.vol
                .read_at(voff, &mut buf[(a - off) as usize..(b - off) as usize])?;
            if staged.is_empty() {
                continue;
            }
            for k in 0..s.len {
                let Some(patches) = staged.get(&(v + k)) else {
                    continue;
                };
                let t0 = (s.file + k) * ts;
                let (x, y) = (t0.max(a), (t0 + ts).min(b));
                if x < y {
                    patches.overlay(x - t0, &mut buf[(x - off) as usize..(y - off) as usize]);
                }
            }
        }
        Ok(due)
    }

    /// Sets the access time to now after a read if `policy` says it is due and
    /// `allowed()` (asked only then: the adapter checks the mount is not read-only).
    /// Returns whether it changed.
    pub fn note_read(
        &self,
        ino: u64,
        policy: AtimePolicy,
        allowed: impl FnOnce() -> bool,
    ) -> Result<bool> {
        if policy == AtimePolicy::Never || self.check_writable().is_err() {
            return Ok(false);
        }
        let now = now_ns();
        let mut st = self.state_with(ino)?;
        if !policy.due(&st.get(ino)?.row, now) || !allowed() {
            return Ok(false);
        }
        self.freeze_before(&mut st, ino)?;
        st.get_mut(ino)?.row.atime = now;
        st.touch(ino);
        Ok(true)
    }

    /// Writes `data` at `off`.
    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        self.check_writable()?;
        if data.is_empty() {
            return Ok(0);
        }
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(Error::TooBig)?;
        let _b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
        let dl = self.data_lock(ino)?;
        let ts = self.track_size;
        let f0 = off / ts;
        let f1 = (end - 1) / ts;
        // A write to a clone's unwritten (backed) tracks fills them from the frozen copy
        // first, with the data lock exclusive so no other write to them interleaves.
        let (_rd, _wr);
        if self.clone_needs_fill(ino, f0, f1 - f0 + 1)? {
            _wr = dl.write().unwrap_or_else(|p| p.into_inner());
            self.fill_clone(ino, f0, f1 - f0 + 1, Some((off, data)))?;
        } else {
            _rd = dl.read().unwrap_or_else(|p| p.into_inner());
        }
        let now = now_ns();
        let (segs, pid, touched) = {
            let mut st = self.state();
            let i = st.get(ino)?;
            if !i.is_file() {
                return Err(if i.is_dir() {
                    Error::IsDir
                } else {
                    Error::invalid("not a regular file")
                });
            }
            self.freeze_before(&mut st, ino)?;
            self.map_range(&mut st, ino, f0, f1 - f0 + 1)?;
            let i = st.get_mut(ino)?;
            if end > i.row.size {
                i.row.size = end;
                self.layout_changed(ino);
            }
            i.row.mtime = now;
            i.row.ctime = now;
            let segs = i.extents.segments(f0, f1 - f0 + 1);
            let pid = i.pair;
            st.touch(ino);
            let touched: Vec<u64> = segs
                .iter()
                .flat_map(|s| {
                    let v = s.vol.expect("mapped");
                    v..v + s.len
                })
                .collect();
            (segs, pid, touched)
        };
        // One piece per volume track: the engine stages the ones copy-on-write needs.
        let mut pieces = Vec::new();
        for s in &segs {
            let v = s.vol.expect("mapped");
            for k in 0..s.len {
                let t0 = (s.file + k) * ts;
                let a = t0.max(off);
                let b = (t0 + ts).min(end);
                if a < b {
                    pieces.push(Piece {
                        track: v + k,
                        off: a - t0,
                        data: &data[(a - off) as usize..(b - off) as usize],
                    });
                }
            }
        }
        self.engine.host_write(self, pid, &pieces)?;
        if let Some(pid) = pid {
            self.engine.written(pid, &touched);
        }
        self.engine.host_io();
        Ok(data.len())
    }

    /// `fallocate(2)`: plain, `KEEP_SIZE`, `PUNCH_HOLE`, `ZERO_RANGE`.
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        self.check_writable()?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
        {
            return Err(Error::NotSupported("fallocate mode"));
        }
        if punch && !keep {
            return Err(Error::NotSupported("punch hole needs KEEP_SIZE"));
        }
        if len == 0 {
            return Err(Error::invalid("fallocate length 0"));
        }
        let end = off
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(Error::TooBig)?;
        if punch || zero {
            self.punch(ino, off, end)?;
        }
        if punch {
            return Ok(());
        }
        let _b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
        let dl = self.data_lock(ino)?;
        let _d = dl.write().unwrap_or_else(|p| p.into_inner());
        let ts = self.track_size;
        let now = now_ns();
        // A clone's backed holes take their frozen bytes, not zeros.
        self.fill_clone(ino, off / ts, (end - 1) / ts - off / ts + 1, None)?;
        let mut st = self.state();
        if !st.get(ino)?.is_file() {
            return Err(Error::NotSupported("fallocate on a non-regular file"));
        }
        self.freeze_before(&mut st, ino)?;
        let f0 = off / ts;
        let f1 = (end - 1) / ts;
        let new = self.map_range(&mut st, ino, f0, f1 - f0 + 1)?;
        let i = st.get_mut(ino)?;
        if !keep && end > i.row.size {
            i.row.size = end;
            self.layout_changed(ino);
        }
        i.row.ctime = now;
        if !keep {
            i.row.mtime = now;
        }
        let pid = i.pair;
        st.touch(ino);
        drop(st);
        if let Some(pid) = pid {
            self.engine.written(pid, &new);
        }
        Ok(())
    }

    /// Makes `[off, end)` a hole: whole tracks are unmapped, partial ones zeroed.
    fn punch(&self, ino: u64, off: u64, end: u64) -> Result<()> {
        let _b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
        let dl = self.data_lock(ino)?;
        let _d = dl.write().unwrap_or_else(|p| p.into_inner());
        let ts = self.track_size;
        let mut zeros = Vec::new();
        // A clone: partial tracks at either end of the range *as clipped to the size
        // below* take their frozen bytes first (then are zeroed in part below); whole
        // tracks below its limit are mapped to zeroed tracks after the unmap, or they
        // would read the frozen copy again. The clip must come first: a punch past EOF
        // ends at the size, whose track may be a backed hole the unclipped end never
        // names (it would keep reading the frozen bytes). The data lock, held
        // exclusively, keeps the size until the zeroing below.
        let clone_limit = if self.dependents().is_empty() {
            None
        } else {
            let st = self.state_with(ino)?;
            let i = st.get(ino)?;
            i.row.clone.map(|c| (c.limit, i.row.size))
        };
        let clone_limit = match clone_limit {
            Some((limit, size)) => {
                let end = end.min(size.max(off));
                if end > off {
                    if !off.is_multiple_of(ts) {
                        self.fill_clone(ino, off / ts, 1, None)?;
                    }
                    if !end.is_multiple_of(ts) {
                        self.fill_clone(ino, end / ts, 1, None)?;
                    }
                }
                Some(limit)
            }
            None => None,
        };
        let pid = {
            let mut st = self.state();
            let i = st.get(ino)?;
            if !i.is_file() {
                return Err(Error::NotSupported("punch on a non-regular file"));
            }
            let end = end.min(i.row.size.max(off));
            if end <= off {
                return Ok(());
            }
            self.freeze_before(&mut st, ino)?;
            let i = st.get(ino)?;
            let pid = i.pair;
            let c0 = off.div_ceil(ts);
            let c1 = end / ts;
            if c1 > c0 {
                let freed = self.unmap(&mut st, ino, c0, c1 - c0)?;
                if let Some(pid) = pid {
                    self.engine.freed(pid, &freed);
                }
                if let Some(limit) = clone_limit {
                    let upto = c1.min(limit.div_ceil(ts));
                    if upto > c0 {
                        let new = self.map_range(&mut st, ino, c0, upto - c0)?;
                        if let Some(pid) = pid {
                            self.engine.written(pid, &new);
                        }
                    }
                }
            }
            let i = st.get(ino)?;
            // Partial head and tail tracks.
            let mut parts = vec![(off, (c0 * ts).min(end))];
            if c1 >= c0 {
                parts.push(((c1 * ts).max(off), end));
            }
            for (a, b) in parts {
                if a < b
                    && let Some(v) = i.extents.lookup(a / ts)
                {
                    zeros.push(((ino, a / ts, v), a % ts, b - a));
                }
            }
            zeros.dedup();
            let now = now_ns();
            let i = st.get_mut(ino)?;
            i.row.mtime = now;
            i.row.ctime = now;
            st.touch(ino);
            pid
        };
        for (at, o, l) in zeros {
            self.write_tracks_zero(pid, at, o, l)?;
        }
        Ok(())
    }

    /// `SEEK_DATA` / `SEEK_HOLE`.
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> Result<u64> {
        let st = self.state_with(ino)?;
        let i = st.get(ino)?;
        let size = i.row.size;
        if off >= size {
            return Err(Error::NoSuchOffset);
        }
        if i.row.clone.is_some() {
            // A clone is all data (its unwritten tracks read the frozen copy): valid
            // answers for SEEK_DATA and SEEK_HOLE.
            return match whence {
                libc::SEEK_DATA => Ok(off),
                libc::SEEK_HOLE => Ok(size),
                _ => Err(Error::invalid("lseek whence")),
            };
        }
        let ts = self.track_size;
        match whence {
            libc::SEEK_DATA => {
                let f = i.extents.next_data(off / ts).ok_or(Error::NoSuchOffset)?;
                let pos = (f * ts).max(off);
                if pos >= size {
                    Err(Error::NoSuchOffset)
                } else {
                    Ok(pos)
                }
            }
            libc::SEEK_HOLE => {
                let f = i.extents.next_hole(off / ts);
                Ok((f * ts).max(off).min(size))
            }
            _ => Err(Error::invalid("whence")),
        }
    }

    /// Opens a file: returns a handle.
    pub fn open(&self, ino: u64, write: bool) -> Result<u64> {
        if write {
            self.check_writable()?;
        }
        let mut st = self.state_with(ino)?;
        let i = st.get_mut(ino)?;
        i.open += 1;
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(fh, ino);
        Ok(fh)
    }

    /// Closes a handle; frees an unlinked inode on its last close.
    pub fn release(&self, fh: u64) -> Result<()> {
        let mut st = self.state();
        let ino = st.handles.remove(&fh).ok_or(Error::BadHandle)?;
        if let Ok(i) = st.get_mut(ino) {
            i.open = i.open.saturating_sub(1);
        }
        self.maybe_free(&mut st, ino);
        Ok(())
    }

    /// Directory entries after `cookie`: (cookie, ino, kind, name).
    pub fn readdir(&self, ino: u64, cookie: u64) -> Result<Vec<(u64, Attr, Vec<u8>)>> {
        let mut st = self.state_with(ino)?;
        let i = st.get(ino)?;
        let d = i.dir.as_ref().ok_or(Error::NotDir)?;
        let ents: Vec<(u64, Vec<u8>, u64)> = d
            .after(cookie.max(2))
            .take(1024)
            .map(|(c, n, child)| (c, n.to_vec(), child))
            .collect();
        let p = i.parent().unwrap_or(ROOT);
        let mut out = Vec::new();
        if cookie < 1 {
            out.push((1, self.attr_of(st.get(ino)?), b".".to_vec()));
        }
        if cookie < 2 {
            let pa = if self.try_want(&mut st, p)? { p } else { ino };
            out.push((2, self.attr_of(st.get(pa)?), b"..".to_vec()));
        }
        for (c, name, child) in ents {
            let a = match st.inodes.get(&child) {
                Some(i) => self.attr_of(i),
                None => self.peek(&st, child)?,
            };
            out.push((c, a, name));
        }
        self.shrink(&mut st);
        Ok(out)
    }

    /// Attributes of an uncached inode, read without caching it (a directory listing
    /// does not make its entries resident; the kernel's lookups do).
    fn peek(&self, st: &NamespaceState, ino: u64) -> Result<Attr> {
        let (load, exts) = st.reader.snapshot(|r| {
            let l = r
                .inode(ino)?
                .ok_or_else(|| Error::NotFound(format!("inode {ino}")))?;
            Ok((l, r.extents(ino)?))
        })?;
        Ok(Attr {
            row: load.row,
            allocated: exts.iter().map(|e| e.len).sum::<u64>() * self.track_size,
        })
    }

    /// Opens a directory: the handle keeps it cached, so readdir cookies stay valid.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let st = self.state_with(ino)?;
        if !st.get(ino)?.is_dir() {
            return Err(Error::NotDir);
        }
        drop(st);
        self.open(ino, false)
    }

    /// Free space and inode counts.
    pub fn statfs(&self) -> StatFs {
        let st = self.state();
        StatFs {
            tracks: st.alloc.total(),
            free: st.alloc.free_tracks(),
            track_size: self.track_size,
            inodes: st.inode_count,
        }
    }

    /// Sets an ordinary xattr.
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.setxattr_by(ino, name, value, flags, &|_| true)
    }

    /// [`Fs::setxattr`] on behalf of a caller: `in_group(gid)` says whether the caller is
    /// in group `gid` or may act as if (CAP_FSETID). Setting an access ACL on a set-gid
    /// object of a group the caller is not in clears set-gid, as chmod does
    /// (`posix_acl_update_mode`).
    pub fn setxattr_by(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
        in_group: &dyn Fn(u32) -> bool,
    ) -> Result<()> {
        self.check_writable()?;
        if name.is_empty() || name.len() > 255 {
            return Err(if name.is_empty() {
                Error::invalid("empty xattr name")
            } else {
                Error::Range
            });
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(Error::TooBig);
        }
        if !stored_xattr(name) {
            return Err(Error::NotSupported(
                "only user.*, trusted.*, security.* and system.posix_acl_* xattrs",
            ));
        }
        let mut st = self.state_with(ino)?;
        self.freeze_before(&mut st, ino)?;
        let i = st.get_mut(ino)?;
        if name.starts_with(b"user.") && !(i.is_file() || i.is_dir()) {
            return Err(Error::NotPermitted);
        }
        let exists = i.xattrs.contains_key(name);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(Error::Exists("xattr".into()));
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(Error::NoData);
        }
        if name == crate::core::acl::ACCESS {
            // As ext4: the ACL sets the mode's permission bits, and one that says no more
            // than the mode is not stored.
            let (mut perm, plain) = crate::core::acl::mode_of(value, i.row.perm)?;
            if perm & libc::S_ISGID != 0 && !in_group(i.row.gid) {
                perm &= !libc::S_ISGID;
            }
            i.row.perm = perm;
            if plain {
                i.xattrs.remove(name);
            } else {
                i.xattrs.insert(name.to_vec(), value.to_vec());
            }
        } else {
            i.xattrs.insert(name.to_vec(), value.to_vec());
        }
        i.row.ctime = now_ns();
        st.touch(ino);
        Ok(())
    }

    /// Gets an ordinary xattr.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.state_with(ino)?;
        st.get(ino)?.xattrs.get(name).cloned().ok_or(Error::NoData)
    }

    /// Lists xattr names (NUL-terminated, concatenated).
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.state_with(ino)?;
        let mut out = Vec::new();
        for n in st.get(ino)?.xattrs.keys() {
            out.extend_from_slice(n);
            out.push(0);
        }
        Ok(out)
    }

    /// Removes an xattr.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        let mut st = self.state_with(ino)?;
        if !st.get(ino)?.xattrs.contains_key(name) {
            return Err(Error::NoData);
        }
        self.freeze_before(&mut st, ino)?;
        let i = st.get_mut(ino)?;
        i.xattrs.remove(name).ok_or(Error::NoData)?;
        i.row.ctime = now_ns();
        st.touch(ino);
        Ok(())
    }

    /// Copies a range between files by reading and writing (the kernel falls back to
    /// this when it is refused, but doing it here saves round trips).
    pub fn copy_file_range(
        &self,
        ino_in: u64,
        off_in: u64,
        ino_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 20) as u32;
            let buf = self.read(ino_in, off_in + done, n)?;
            if buf.is_empty() {
                break;
            }
            self.write(ino_out, off_out + done, &buf)?;
            done += buf.len() as u64;
        }
        Ok(done)
    }

    /// Commits everything through the durability pipeline: syncs both images, then
    /// writes the metadata batch (plus `extra` pair changes) in one transaction. After
    /// it returns, all data written before the call and all metadata are durable.
    pub fn commit(&self, extra: Vec<PairDelta>) -> Result<()> {
        if self.opts.readonly {
            return Ok(());
        }
        // Staged copy-on-write data reaches the volume first (it was acknowledged).
        self.engine.destage(self)?;
        self.commit_destaged(extra)
    }

    fn layout(&self) -> MutexGuard<'_, Layout> {
        self.layout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `ino`'s extents or size changed. Call with the state lock held, in
    /// the same critical section as the change.
    fn layout_changed(&self, ino: u64) {
        let mut l = self.layout();
        l.seq += 1;
        let s = l.seq;
        l.by_ino.insert(ino, s);
    }

    /// `fsync`/`fdatasync` of a file. `fdatasync` of a file whose extents and size are
    /// already committed only makes its data durable (staged writes destaged, the
    /// volume synced); everything else runs a full commit.
    pub fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        if self.opts.readonly {
            return Ok(());
        }
        if datasync {
            let shaped = {
                let l = self.layout();
                l.by_ino.get(&ino).is_some_and(|&s| s > l.committed)
            };
            if !shaped {
                self.durability.check()?;
                self.engine.destage(self)?;
                return self.durability.sync_data();
            }
        }
        self.commit(Vec::new())
    }

    /// [`Fs::commit`] without the destage round, for a caller that holds a pair's gate
    /// and the write barrier and destaged already (a control operation).
    pub fn commit_destaged(&self, extra: Vec<PairDelta>) -> Result<()> {
        if self.opts.readonly {
            return Ok(());
        }
        self.durability
            .commit(self, &self.engine.hooks(self), extra)
    }
}

/// The namespace's dirty rows, for the durability pipeline.
impl BatchSource for Fs {
    /// Builds the batch of everything dirty. Takes the held-track list with it.
    fn take(&self) -> (Batch, Vec<(u64, u64)>) {
        let mut st = self.state();
        // Shape changes are stamped under the state lock: every one stamped so far is
        // in this batch or an earlier one.
        {
            let mut l = self.layout();
            l.taken = l.seq;
        }
        let dirty = std::mem::take(&mut st.dirty);
        let mut b = Batch {
            next_ino: st.next_ino,
            inode_count: st.inode_count,
            ..Batch::default()
        };
        // Until the batch is durable the database is behind: keep its inodes cached.
        let mut committing: HashSet<u64> = dirty.inodes.iter().copied().collect();
        committing.extend(dirty.deleted.iter().copied());
        for ((p, _), v) in &dirty.dirents {
            committing.insert(*p);
            committing.extend(*v);
        }
        st.committing = committing;
        for ino in dirty.inodes {
            if let Some(i) = st.inodes.get(&ino) {
                let exts: Vec<Extent> = i.extents.iter().collect();
                let xs = i
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                b.inodes.push((i.row.clone(), exts, xs));
            }
        }
        b.deleted = dirty.deleted.into_iter().collect();
        for ((p, n), v) in dirty.dirents {
            match v {
                Some(ino) => b.put_dirents.push((p, n, ino)),
                None => b.del_dirents.push((p, n)),
            }
        }
        let held = st.alloc.take_held();
        (b, held)
    }

    /// Puts a batch that could not be committed back into the dirty sets (a change made
    /// since wins) and its freed tracks back on hold.
    fn restore(&self, b: &Batch, held: Vec<(u64, u64)>) {
        let mut st = self.state();
        st.committing.clear();
        for (row, _, _) in &b.inodes {
            if st.inodes.contains_key(&row.ino) {
                st.dirty.inodes.insert(row.ino);
            }
        }
        st.dirty.deleted.extend(b.deleted.iter().copied());
        for (p, n, ino) in &b.put_dirents {
            st.dirty
                .dirents
                .entry((*p, n.clone()))
                .or_insert(Some(*ino));
        }
        for (p, n) in &b.del_dirents {
            st.dirty.dirents.entry((*p, n.clone())).or_insert(None);
        }
        st.alloc.hold_again(held);
    }

    fn committed(&self, held: &[(u64, u64)]) {
        {
            let mut l = self.layout();
            l.committed = l.committed.max(l.taken);
            let done = l.committed;
            l.by_ino.retain(|_, s| *s > done);
        }
        let mut st = self.state();
        st.alloc.release_held(held);
        // Inodes the kernel forgot while they were dirty can go now.
        let done: Vec<u64> = std::mem::take(&mut st.committing).into_iter().collect();
        for ino in done {
            if !st.nlookup.contains_key(&ino) && st.evictable(ino) {
                st.evict(ino);
            }
        }
        // Inodes just made clean may bring the cache back within its budget.
        self.shrink(&mut st);
    }
}

impl Fs {
    /// True if a commit has something to write.
    pub fn has_dirty(&self) -> bool {
        let st = self.state();
        !st.dirty.inodes.is_empty() || !st.dirty.deleted.is_empty() || !st.dirty.dirents.is_empty()
    }

    /// Background commit loop (one thread). Returns when [`Fs::shutdown`] is called.
    pub fn run_flusher(&self) {
        let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (g, _) = self
                .stop_cv
                .wait_timeout(stop, self.opts.commit_interval)
                .unwrap_or_else(|p| p.into_inner());
            stop = g;
            if *stop {
                return;
            }
            drop(stop);
            // After a failed commit nothing commits until remount (logged once then).
            if !self.durability.meta_failed()
                && (self.has_dirty() || self.engine.any_dirty())
                && let Err(e) = self.commit(Vec::new())
            {
                log::error!("background commit: {e}");
            }
            stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Asks the flusher, copier and migrator to stop.
    pub fn request_stop(&self) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.stop_cv.notify_all();
        self.engine.stop();
        self.migrator.stop();
    }

    /// Starts moving an image to `target` (`user.pairfs.migrate`, `pairfs migrate`).
    pub fn migrate(&self, which: Which, target: &str) -> Result<()> {
        Fs::check_readonly(&self.opts)?;
        self.durability.check()?;
        if self.durability.has_sinks() {
            return Err(Error::invalid(
                "migrate: this volume is replicated (--replica); moving a replicated image is not supported yet",
            ));
        }
        self.migrator.start(&self.durability, which, target)
    }

    /// The migration thread (`pairfs-migrate`): runs until [`Fs::request_stop`].
    pub fn run_migrator(&self) {
        self.migrator.run(&self.durability, &|which, place| {
            if which == Which::Copy
                && let Some(meta) = &self.opts.meta_path
            {
                self.engine
                    .set_copy_lock_path(crate::core::volfile::image_lock_path(
                        meta,
                        place,
                        ".copy.lock",
                    ));
            }
        });
    }

    /// True once [`Fs::request_stop`] was called.
    pub fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Final commit and clean flag.
    pub fn shutdown(&self) -> Result<()> {
        self.request_stop();
        if self.opts.readonly {
            return Ok(());
        }
        let r = self.commit(Vec::new()).and_then(|()| {
            // Never after a failed commit: the next mount must repair.
            self.durability.mark_clean()
        });
        // The replica gets the last commit and the clean flag, then the link ends.
        self.durability.close_sinks();
        self.migrator.release_locks();
        r
    }

    /// Tracks of live files in a set of inodes.
    pub fn tracks_of(st: &NamespaceState, inos: &[u64]) -> crate::core::trackset::TrackSet {
        let mut s = crate::core::trackset::TrackSet::new();
        for ino in inos {
            if let Some(i) = st.inodes.get(ino) {
                s.insert_extents(&i.extents);
            }
        }
        s
    }
}

/// The namespace side of the pair engine: scopes, their tracks, frozen objects, pins.
impl Fs {
    /// Members of a scope: every inode beneath it (or the file itself), all cached.
    fn members(&self, st: &mut NamespaceState, scope: Scope) -> Result<Vec<u64>> {
        match scope {
            Scope::File(i) => Ok(if self.try_want(st, i)? {
                vec![i]
            } else {
                Vec::new()
            }),
            Scope::Dir(i) => self.subtree(st, i),
            Scope::Root => self.subtree(st, ROOT),
        }
    }

    /// The inodes a pair covers now: the file, or the inodes beneath its directory
    /// that carry this pair (a file with a pair of its own stays out). All cached.
    fn scope_members(&self, st: &mut NamespaceState, scope: Scope, id: PairId) -> Result<Vec<u64>> {
        let mut v = self.members(st, scope)?;
        if !matches!(scope, Scope::File(_)) {
            v.retain(|i| st.inodes.get(i).is_some_and(|n| n.pair == Some(id)));
        }
        Ok(v)
    }

    /// Current tracks of the inodes a pair covers, walking its scope with the cache
    /// kept within its budget (linear in the scope, bounded memory).
    fn tracks_in(&self, st: &mut NamespaceState, scope: Scope, id: PairId) -> Result<TrackSet> {
        let mut s = TrackSet::new();
        let top = match scope {
            Scope::File(i) => {
                if self.try_want(st, i)? {
                    s.insert_extents(&st.get(i)?.extents);
                }
                return Ok(s);
            }
            Scope::Dir(i) => i,
            Scope::Root => ROOT,
        };
        self.walk(st, top, true, |_, n| {
            if n.pair == Some(id) {
                s.insert_extents(&n.extents);
            }
        })?;
        Ok(s)
    }

    /// Builds the frozen objects of a scope from the current state: every object with
    /// its split-time attributes and xattrs, a hard-linked one with each of its names
    /// inside the scope. `members` is breadth first from the top (parents first).
    fn freeze_members(&self, st: &mut NamespaceState, members: &[u64]) -> Result<Vec<Frozen>> {
        let inside: std::collections::HashSet<u64> = members.iter().copied().collect();
        // Paths of the directories seen so far.
        let mut dir_paths: HashMap<u64, String> = HashMap::new();
        let mut out = Vec::with_capacity(members.len());
        for &ino in members {
            let Some(links) = st.inodes.get(&ino).map(|i| i.links.clone()) else {
                continue;
            };
            let mut names: Vec<String> = Vec::new();
            for (parent, name) in &links {
                if inside.contains(parent) {
                    let dir = match dir_paths.get(parent) {
                        Some(d) => d.clone(),
                        None => {
                            let d = self.path_of(st, *parent)?;
                            dir_paths.insert(*parent, d.clone());
                            d
                        }
                    };
                    let name = String::from_utf8_lossy(name);
                    names.push(if dir.is_empty() {
                        name.into_owned()
                    } else {
                        format!("{dir}/{name}")
                    });
                }
            }
            if names.is_empty() {
                names.push(self.path_of(st, ino)?);
            }
            let Some(i) = st.inodes.get(&ino) else {
                continue;
            };
            let path = names.remove(0);
            let Some(f) = object_of(i, ino, path, names) else {
                continue;
            };
            if f.attr.kind == FrozenKind::Dir {
                dir_paths.insert(ino, f.path.clone());
            }
            out.push(f);
        }
        Ok(out)
    }
}

/// The object of inode `i` (number `ino`) as of now, at `path` with the other names
/// `links` (None for a kind the frozen copy does not keep).
fn object_of(i: &Inode, ino: u64, path: String, links: Vec<String>) -> Option<Frozen> {
    let kind = FrozenKind::from_mode(i.row.kind)?;
    Some(Frozen {
        ino,
        path,
        attr: FrozenAttr {
            kind,
            perm: i.row.perm,
            uid: i.row.uid,
            gid: i.row.gid,
            size: i.row.size,
            atime: i.row.atime,
            mtime: i.row.mtime,
            ctime: i.row.ctime,
            rdev: i.row.rdev,
        },
        extents: if kind == FrozenKind::File {
            i.extents.clone()
        } else {
            Default::default()
        },
        target: i.row.target.clone().unwrap_or_default(),
        links,
        xattrs: i
            .xattrs
            .iter()
            .filter(|(n, _)| !n.starts_with(b"user.pairfs."))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        absent: false,
    })
}

/// Lazy instants (docs/design.md, "Lazy instants"): freeze before first change.
impl Fs {
    /// Copies the data of each move (`snap::group`) from its old volume tracks to its new
    /// ones, whole tracks (bytes past EOF are zero in the old track, so in the new one),
    /// 1 MiB at a time. The caller holds the write barrier (nothing is staged, no write
    /// in flight, the file's extents cannot change); the new tracks are allocated and
    /// mapped by nothing yet, the old ones are the file's and pinned.
    fn move_tracks(&self, moves: &[crate::snap::group::Move]) -> Result<()> {
        let ts = self.track_size;
        let per = (MOVE_CHUNK_BYTES / ts).max(1);
        let mut buf = Vec::new();
        for m in moves {
            self.engine.drop_staged(m.to..m.to + m.len);
            let mut k = 0;
            while k < m.len {
                let n = per.min(m.len - k);
                buf.resize((n * ts) as usize, 0);
                self.vol.read_at((m.from + k) * ts, &mut buf)?;
                self.vol.write_at((m.to + k) * ts, &buf)?;
                k += n;
            }
        }
        Ok(())
    }

    /// Called under the namespace lock before the first change of inode `ino` (its
    /// attributes, data, xattrs, names, or a directory's entries): if its pair is a
    /// lazy instant that has not frozen it yet, freezes it now.
    pub(crate) fn freeze_before(&self, st: &mut NamespaceState, ino: u64) -> Result<()> {
        match st.inodes.get(&ino).and_then(|i| i.pair) {
            Some(p) => self.freeze_in_all(st, p, ino),
            None => Ok(()),
        }
    }

    /// [`Fs::freeze_in`] for pair `p` and each of its named generations (instants of the
    /// same scope).
    pub(crate) fn freeze_in_all(&self, st: &mut NamespaceState, p: PairId, ino: u64) -> Result<()> {
        self.freeze_in(st, p, ino)?;
        for g in self.engine.gens_of(p) {
            self.freeze_in(st, g, ino)?;
        }
        Ok(())
    }

    /// Freezes inode `ino` (cached) in lazy pair `p` if that instant has not frozen it
    /// yet: its object as of now (still the instant's) at its names at the instant, or
    /// an absent marker if it was not in the scope then (no name reaches the top, or it
    /// is not a member of `p` now: it is joining it). Pins its tracks at once; the
    /// record rides in the next commit, with (or before) the change that follows.
    pub(crate) fn freeze_in(&self, st: &mut NamespaceState, p: PairId, ino: u64) -> Result<()> {
        if !self.engine.needs_freeze(p, ino) {
            return Ok(());
        }
        let member = st.get(ino)?.pair == Some(self.engine.member_id(p));
        let names = if member {
            self.instant_names(st, p, ino)?
        } else {
            Vec::new()
        };
        let rec = match names.split_first() {
            Some((first, rest)) => object_of(st.get(ino)?, ino, first.clone(), rest.to_vec())
                .unwrap_or_else(|| Frozen::absent(ino)),
            None => Frozen::absent(ino),
        };
        let pin = self.engine.lazy_freeze(p, rec);
        if !pin.is_empty() {
            st.alloc.pin_set(&pin);
        }
        Ok(())
    }

    /// The names of unchanged inode `ino` at lazy pair `p`'s instant, as paths
    /// ([`crate::snap::view::instant_paths`]), loading ancestors as needed.
    fn instant_names(&self, st: &mut NamespaceState, p: PairId, ino: u64) -> Result<Vec<String>> {
        let cell = std::cell::RefCell::new(st);
        crate::snap::view::instant_paths(
            ino,
            |i| {
                let mut st = cell.borrow_mut();
                if !self.try_want(&mut st, i)? {
                    return Ok(Vec::new());
                }
                Ok(st.get(i)?.links.clone())
            },
            |i| self.engine.frozen_path(p, i),
            MAX_DEPTH,
        )
    }
}

impl Namespace for Fs {
    fn check_writable(&self) -> Result<()> {
        Fs::check_writable(self)
    }

    fn exists(&self, ino: u64) -> Result<bool> {
        self.try_want(&mut self.state(), ino)
    }

    fn pair_of(&self, ino: u64) -> Result<Option<PairId>> {
        Ok(self.state_with(ino)?.get(ino)?.pair)
    }

    fn members_of(&self, scope: Scope, id: PairId) -> Result<Vec<u64>> {
        self.scope_members(&mut self.state(), scope, id)
    }

    fn scope_tracks(&self, scope: Scope, id: PairId) -> Result<TrackSet> {
        self.tracks_in(&mut self.state(), scope, id)
    }

    fn freeze(&self, scope: Scope, id: PairId) -> Result<Vec<Frozen>> {
        let mut st = self.state();
        let members = self.scope_members(&mut st, scope, id)?;
        self.freeze_members(&mut st, &members)
    }

    fn instant(
        &self,
        scope: Scope,
        set: &mut dyn FnMut(Frozen, u64) -> Result<Pins>,
    ) -> Result<Pins> {
        let mut st = self.state();
        let top = match scope {
            Scope::File(i) | Scope::Dir(i) => i,
            Scope::Root => ROOT,
        };
        self.want(&mut st, top)?;
        let path = self.path_of(&mut st, top)?;
        let rec = object_of(st.get(top)?, top, path, Vec::new())
            .ok_or_else(|| Error::invalid("the scope's top is not a directory"))?;
        set(rec, st.next_ino)
    }

    fn instant_children(
        &self,
        id: PairId,
        dir: u64,
        after: Option<crate::snap::view::Cursor>,
    ) -> Result<crate::snap::view::Children> {
        use crate::snap::view::Cursor;
        // Entries looked at per hold of the namespace lock (each may load an inode).
        const BATCH: usize = 256;
        let mut st = self.state();
        if !self.try_want(&mut st, dir)? {
            return Ok(None);
        }
        let from = after.as_ref().map_or(0, |c| c.cookie);
        let i = st.get(dir)?;
        let (entries, next): (Vec<(Vec<u8>, u64)>, Option<Cursor>) = match i.dir.as_ref() {
            Some(d) => {
                let mut v: Vec<(u64, Vec<u8>, u64)> = d
                    .after(from)
                    .take(BATCH + 1)
                    .map(|(c, n, i)| (c, n.to_vec(), i))
                    .collect();
                // The directory stays cached (not evictable while its data lock is
                // shared), so its cookies stay, until the caller drops the cursor.
                let next = (v.len() > BATCH).then(|| Cursor {
                    cookie: v[BATCH - 1].0,
                    hold: i.data_lock.clone(),
                });
                v.truncate(BATCH);
                (v.into_iter().map(|(_, n, i)| (n, i)).collect(), next)
            }
            None => return Ok(None),
        };
        let mut out = Vec::new();
        for (name, ino) in entries {
            if !self.engine.needs_freeze(id, ino) || !self.try_want(&mut st, ino)? {
                continue;
            }
            let i = st.get(ino)?;
            if i.pair != Some(self.engine.member_id(id)) {
                continue;
            }
            if let Some(f) = object_of(i, ino, String::new(), Vec::new()) {
                out.push((name, f));
            }
        }
        self.shrink(&mut st);
        Ok(Some((out, next)))
    }

    fn instant_file(&self, id: PairId, ino: u64, f0: u64, n: u64) -> Result<(u64, Vec<Segment>)> {
        let mut st = self.state();
        self.engine.instant_file_of(id, (ino, f0, n), || {
            if !self.try_want(&mut st, ino)? {
                return Err(Error::NotFound("frozen file".into()));
            }
            let i = st.get(ino)?;
            Ok((i.row.size, i.extents.segments(f0, n)))
        })
    }

    fn claim(
        &self,
        ino: u64,
        register: &mut dyn FnMut(Scope, &str, TrackSet) -> PairId,
    ) -> Result<PairId> {
        let mut st = self.state_with(ino)?;
        let i = st.get(ino)?;
        let scope = match i.row.kind {
            libc::S_IFREG => Scope::File(ino),
            libc::S_IFDIR if ino == ROOT => Scope::Root,
            libc::S_IFDIR => Scope::Dir(ino),
            _ => {
                return Err(Error::invalid(
                    "only regular files and directories can be paired",
                ));
            }
        };
        let members = self.members(&mut st, scope)?;
        for &m in &members {
            if let Some(other) = st.get(m)?.pair {
                return Err(Error::Busy(format!(
                    "{} is already in pair {other}",
                    self.path_of(&mut st, m)?
                )));
            }
            // A linked clone's frozen copy would miss what it reads from its backing
            // (`Fs::control` detaches the clones of a new scope first).
            if st.get(m)?.row.clone.is_some() {
                return Err(Error::Busy(format!(
                    "/{} is a linked clone (pairfs clone --detach it first)",
                    self.path_of(&mut st, m)?
                )));
            }
        }
        for &m in &members {
            st.get_mut(m)?.pair = Some(0);
        }
        let current = Fs::tracks_of(&st, &members);
        let path = format!("/{}", self.path_of(&mut st, ino)?);
        // Registered before the state lock is released: a member evicted and loaded
        // again finds its pair through the engine.
        let id = register(scope, &path, current);
        for &m in &members {
            st.get_mut(m)?.pair = Some(id);
        }
        Ok(id)
    }

    fn split_off(
        &self,
        ino: u64,
        group: PairId,
        register: &mut dyn FnMut(Scope, &str, TrackSet) -> PairId,
    ) -> Result<PairId> {
        let moves = {
            let mut st = self.state_with(ino)?;
            let i = st.get(ino)?;
            if !i.is_file() || i.pair != Some(group) {
                return Err(Error::Busy(format!(
                    "inside the scope of pair {group}: only a regular file of it can be split \
                     on its own"
                )));
            }
            // The group's instant keeps the file as it is now (unchanged since the instant).
            self.freeze_in(&mut st, group, ino)?;
            // Tracks a frozen copy pins move: the file's own pair must never copy to the
            // copy-image tracks where the group keeps its instant (`snap::group`). The new
            // tracks are taken now (used), mapped after the copy.
            let NamespaceState { inodes, alloc, .. } = &mut *st;
            let ext = &inodes
                .get(&ino)
                .ok_or(Error::NotFound("inode".into()))?
                .extents;
            crate::snap::group::plan_moves(ext, alloc)?
        };
        // The copy runs without the namespace lock: the caller holds the write barrier
        // (the file's data and extents cannot change) and the commits (nothing of it is
        // committed half-way); readers of other files go on.
        let copied = self.move_tracks(&moves);
        let mut st = self.state_with(ino)?;
        let still = {
            let e = &st.get(ino)?.extents;
            moves.iter().all(|m| {
                e.segments(m.file, m.len).as_slice()
                    == [crate::core::extent::Segment {
                        file: m.file,
                        vol: Some(m.from),
                        len: m.len,
                    }]
            })
        };
        if copied.is_err() || !still {
            for m in &moves {
                st.alloc.free(m.to, m.len);
            }
            copied?;
            return Err(Error::Busy(format!(
                "inode {ino} changed during its split-off; try again"
            )));
        }
        if !moves.is_empty() {
            let old = crate::snap::group::apply_moves(&mut st.get_mut(ino)?.extents, &moves);
            let mut freed = Vec::new();
            for (v, l) in old {
                st.alloc.free(v, l);
                freed.extend(v..v + l);
            }
            self.engine.freed(group, &freed);
            self.layout_changed(ino);
            st.touch(ino);
            log::info!(
                "inode {ino}: {} tracks moved off the frozen copy of pair {group}",
                freed.len()
            );
        }
        let tracks: Vec<u64> = st.get(ino)?.extents.vol_tracks().collect();
        self.engine.left(group, &tracks);
        let path = format!("/{}", self.path_of(&mut st, ino)?);
        let current: TrackSet = tracks.iter().copied().collect();
        let id = register(Scope::File(ino), &path, current);
        st.get_mut(ino)?.pair = Some(id);
        Ok(id)
    }

    fn group_of(&self, ino: u64) -> Result<Option<PairId>> {
        let mut st = self.state_with(ino)?;
        let Some(parent) = st.get(ino)?.parent() else {
            return Ok(None);
        };
        if !self.try_want(&mut st, parent)? {
            return Ok(None);
        }
        Ok(st.get(parent)?.pair.filter(|&p| self.engine.inherits(p)))
    }

    fn forget_pair(&self, id: PairId, unregister: &mut dyn FnMut()) {
        let mut st = self.state();
        unregister();
        for i in st.inodes.values_mut() {
            if i.pair == Some(id) {
                i.pair = None;
            }
        }
    }

    fn hand_over(&self, id: PairId, members: &[u64]) -> Result<()> {
        let mut st = self.state();
        for &ino in members {
            // An inode loaded now finds its pair by the usual rule (the released one
            // is gone); a cached one lost it above and takes its parent's.
            if !self.try_want(&mut st, ino)? {
                continue;
            }
            let parent_pair = st
                .inodes
                .get(&ino)
                .and_then(|i| i.parent())
                .and_then(|p| st.inodes.get(&p))
                .and_then(|p| p.pair)
                .filter(|&pid| pid != id && self.engine.inherits(pid));
            let joins = st
                .inodes
                .get(&ino)
                .is_some_and(|i| i.pair.is_none() || i.pair == Some(id));
            if joins && let Some(pp) = parent_pair {
                // Not a member of the enclosing pair's lazy instant: marked absent there.
                self.freeze_in_all(&mut st, pp, ino)?;
            }
            let Some(i) = st.inodes.get_mut(&ino) else {
                continue;
            };
            if i.pair.is_none() || i.pair == Some(id) {
                i.pair = parent_pair;
            }
            if let Some(pid) = i.pair {
                let tracks: Vec<u64> = i.extents.vol_tracks().collect();
                self.engine.written(pid, &tracks);
            }
        }
        Ok(())
    }

    fn pin_frozen(&self, id: PairId, tracks: &TrackSet) -> Result<()> {
        let mut st = self.state();
        for t in tracks.iter() {
            if t == 0 || t >= st.alloc.total() {
                return Err(Error::Corrupt(format!(
                    "pair {id}: frozen track {t} outside the volume"
                )));
            }
            st.alloc.pin(t);
        }
        Ok(())
    }

    fn apply_pins(&self, pins: &Pins) {
        let mut st = self.state();
        st.alloc.pin_set(&pins.pin);
        st.alloc.unpin_set(&pins.unpin);
    }

    fn alloc_slots(&self, n: u64) -> Result<Vec<u64>> {
        let mut st = self.state();
        let runs = st.alloc.allocate(None, n)?;
        Ok(runs.into_iter().flat_map(|(v, l)| v..v + l).collect())
    }

    fn free_slots(&self, slots: &[u64]) {
        let mut st = self.state();
        for &s in slots {
            st.alloc.free(s, 1);
        }
    }

    fn mark_slots(&self, slots: &[u64]) -> Result<()> {
        let mut st = self.state();
        for &s in slots {
            st.alloc.mark_used(s, 1)?;
        }
        Ok(())
    }

    fn unused_count(&self, tracks: &TrackSet) -> u64 {
        let st = self.state();
        tracks.iter().filter(|&t| !st.alloc.is_used(t)).count() as u64
    }

    fn clone_dependent(&self, id: PairId) -> Result<Option<String>> {
        self.clone_of_pair(id)
    }

    fn commit(&self, extra: Vec<PairDelta>) -> Result<()> {
        Fs::commit(self, extra)
    }

    fn commit_destaged(&self, extra: Vec<PairDelta>) -> Result<()> {
        Fs::commit_destaged(self, extra)
    }
}
