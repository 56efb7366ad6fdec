//! FUSE adapter of the main mount: converts kernel requests to [`Fs`] calls and the
//! results to replies. No filesystem logic lives here, apart from routing the
//! `user.pairfs.*` control attributes to the pair engine.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::core::fs::{Attr, Ctx, Fs, ROOT, SetAttr};
use crate::core::inode::AtimePolicy;
use crate::error::Error;
use crate::snap::engine::Op;

/// Attribute and entry cache time. Every change goes through this daemon, so the
/// kernel is told of it; a long TTL only saves lookups.
const TTL: Duration = Duration::from_secs(10);
/// Prefix of the control attributes.
pub const CONTROL_PREFIX: &str = "user.pairfs.";

/// Converts ns since the epoch to `SystemTime`.
pub fn systime(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// File type from `S_IFMT` bits.
pub fn file_type(kind: u32) -> FileType {
    match kind {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Converts core attributes to FUSE attributes.
pub fn fuse_attr(a: &Attr) -> FileAttr {
    let r = &a.row;
    FileAttr {
        ino: INodeNo(r.ino),
        size: r.size,
        blocks: a.allocated / 512,
        atime: systime(r.atime),
        mtime: systime(r.mtime),
        ctime: systime(r.ctime),
        crtime: systime(r.ctime),
        kind: file_type(r.kind),
        perm: r.perm as u16,
        nlink: r.nlink,
        uid: r.uid,
        gid: r.gid,
        rdev: r.rdev,
        blksize: 65536,
        flags: 0,
    }
}

fn errno(e: &Error, op: &str) -> Errno {
    let n = e.errno();
    match n {
        libc::ENOENT | libc::EEXIST | libc::ENODATA | libc::ENOTEMPTY | libc::ENXIO => {
            log::trace!("{op}: {e}")
        }
        libc::EIO => log::error!("{op}: {e}"),
        _ => log::debug!("{op}: {e}"),
    }
    Errno::from_i32(n)
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        umask: 0,
    }
}

/// [`ctx`] for a create, mkdir or mknod: the core applies the umask, or the parent's
/// default ACL instead (the kernel leaves both to us: `FUSE_POSIX_ACL`, `FUSE_DONT_MASK`).
fn create_ctx(req: &Request, umask: u32) -> Ctx {
    Ctx { umask, ..ctx(req) }
}

/// The main mount.
pub struct MainFs {
    fs: Arc<Fs>,
    atime: AtimePolicy,
    nodiratime: bool,
    mountpoint: Option<PathBuf>,
    /// Open directory handles: the cookie each readdir pass stops before (the
    /// directory's end cookie when the pass began at offset 0).
    dirs: Mutex<HashMap<u64, u64>>,
    /// Tells the kernel of attribute changes it did not ask for (set once mounted).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Kernel write-back caching asked for (`-o writeback_cache`), and granted at init.
    writeback: bool,
}

impl MainFs {
    /// Wraps the core (relatime, no mountpoint known: atime updates are not checked
    /// against a read-only remount).
    pub fn new(fs: Arc<Fs>) -> Self {
        MainFs {
            fs,
            atime: AtimePolicy::default(),
            nodiratime: false,
            mountpoint: None,
            dirs: Mutex::new(HashMap::new()),
            notifier: Arc::new(OnceLock::new()),
            writeback: false,
        }
    }

    /// Where the session's notifier goes once the session exists (see
    /// [`fuser::Session::notifier`]): setting an access ACL or clearing set-id bits
    /// changes the mode, and the kernel must drop the attributes it has cached.
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Sets the atime policy (`relatime`, `strictatime`, `noatime`, `nodiratime`) and the
    /// mountpoint, whose read-only flag (`mount -o remount,ro`) turns atime updates off.
    pub fn with_atime(mut self, policy: AtimePolicy, nodiratime: bool, mnt: PathBuf) -> Self {
        self.atime = policy;
        self.nodiratime = nodiratime;
        self.mountpoint = Some(std::fs::canonicalize(&mnt).unwrap_or(mnt));
        self
    }

    fn note_read(&self, ino: u64, dir: bool) {
        let policy = if dir && self.nodiratime {
            AtimePolicy::Never
        } else {
            self.atime
        };
        let writable = || {
            self.mountpoint
                .as_deref()
                .is_none_or(|m| !mount_is_readonly(m))
        };
        if let Err(e) = self.fs.note_read(ino, policy, writable) {
            log::debug!("atime of inode {ino}: {e}");
        }
    }

    /// Asks for kernel write-back caching: writes return once they are in the page cache,
    /// and the kernel keeps size and times while it holds dirty pages.
    pub fn with_writeback_cache(mut self, on: bool) -> Self {
        self.writeback = on;
        self
    }

    /// With write-back caching, the kernel may hold data of `write()`s that returned
    /// before a split request: they belong to the split's instant (SPEC "Kernel caches").
    /// So before the instant is taken, the kernel writes the dirty pages of the scope to
    /// us: a file's through an inode invalidation (its dirty pages are written back
    /// first, `launder_folio`), a directory's or the whole volume's (or a pair named by
    /// id) through syncfs(2) of the mount. Both send their writes to the other worker
    /// threads and return when those are done; nothing is held meanwhile, and writes
    /// that come after are simply after the instant or before it, like any concurrent
    /// write.
    fn flush_kernel_cache(&self, ino: u64, by_id: bool) -> crate::Result<()> {
        let is_file = !by_id
            && self
                .fs
                .getattr(ino)
                .is_ok_and(|a| a.row.kind == libc::S_IFREG);
        if is_file && let Some(n) = self.notifier.get() {
            return n
                .inval_inode(INodeNo(ino), 0, 0)
                .map_err(|e| Error::io("flushing the kernel's dirty pages", e));
        }
        // A directory or the volume: first every open file's dirty pages, as for a file
        // scope (syncfs alone was seen to return with an open file's pages unwritten);
        // then syncfs for pages of files closed since (closing writes them back too).
        if let Some(n) = self.notifier.get() {
            for ino in self.fs.open_inodes() {
                if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                    return Err(Error::io("flushing the kernel's dirty pages", e));
                }
            }
        }
        let Some(m) = &self.mountpoint else {
            return Err(Error::invalid("no mountpoint known to flush"));
        };
        let dir = std::fs::File::open(m).map_err(|e| Error::io("open the mountpoint", e))?;
        // SAFETY: syncfs takes an open descriptor, which `dir` is for the whole call.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(Error::io(
                "syncfs of the mount",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn entry(&self, r: crate::Result<Attr>, reply: ReplyEntry, op: &str) {
        match r {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e, op)),
        }
    }

    fn control_set(&self, ino: u64, name: &str, value: &[u8]) -> crate::Result<()> {
        if name == "migrate" {
            let r = self.migrate_set(ino, value);
            if let Err(e) = &r {
                log::warn!("{CONTROL_PREFIX}{name}: {e}");
            }
            return r;
        }
        if name == "clone" || name == "detach" {
            let r = self.clone_set(ino, name, value);
            if let Err(e) = &r {
                log::warn!("{CONTROL_PREFIX}{name} on inode {ino}: {e}");
            }
            return r;
        }
        let op = Op::parse(name).ok_or_else(|| {
            Error::invalid(format!("unknown control attribute {CONTROL_PREFIX}{name}"))
        })?;
        let value = std::str::from_utf8(value)
            .map_err(|_| Error::invalid(format!("{CONTROL_PREFIX}{name}: the value is not UTF-8")))?
            .trim_end_matches('\0')
            .trim();
        // A value that starts with a letter names a generation of the pair (`default`:
        // the pair's own frozen copy, as without a value); on the mount root, a number
        // names a pair by id (a pair whose file is gone).
        let generation = value
            .starts_with(|c: char| c.is_ascii_alphabetic())
            .then_some(value)
            .filter(|v| *v != crate::snap::gens::DEFAULT_NAME);
        let by_id = Some(value)
            .filter(|v| {
                !v.is_empty() && generation.is_none() && *v != crate::snap::gens::DEFAULT_NAME
            })
            .filter(|_| ino == crate::core::fs::ROOT);
        if generation.is_none() && by_id.is_none() && !value.is_empty() && value != "default" {
            // Neither a generation nor (on the mount root) a pair id: say why.
            crate::snap::gens::check_name(value)?;
        }
        if self.writeback && matches!(op, Op::Split | Op::Update) {
            self.flush_kernel_cache(ino, by_id.is_some())?;
        }
        let r = match (generation, by_id) {
            (Some(g), _) => self.fs.control_gen(ino, g, op),
            (None, Some(v)) => {
                let id = v
                    .parse()
                    .map_err(|_| Error::invalid(format!("pair id {v:?} is not a number")))?;
                self.fs.control_id(id, op)
            }
            (None, None) => self.fs.control(ino, op),
        };
        if let Err(e) = &r {
            log::warn!("{CONTROL_PREFIX}{name} on inode {ino}: {e}");
        }
        r
    }

    /// `user.pairfs.clone` on a directory, value `SRC_INO NAME`: makes NAME in it a
    /// writable clone of inode SRC_INO's frozen copy (`pairfs clone`);
    /// `user.pairfs.detach` on a clone or a directory: detaches the clones there.
    fn clone_set(&self, ino: u64, name: &str, value: &[u8]) -> crate::Result<()> {
        if name == "detach" {
            self.fs.detach(ino)?;
            return Ok(());
        }
        let value = value.strip_suffix(b"\0").unwrap_or(value);
        let sp = value
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| Error::invalid("clone: the value is `SRC_INO NAME`"))?;
        let src: u64 = std::str::from_utf8(&value[..sp])
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::invalid("clone: SRC_INO is not a number"))?;
        if self.writeback {
            self.flush_kernel_cache(src, false)?;
        }
        let made = self.fs.make_clone(src, ino, &value[sp + 1..])?;
        log::info!(
            "clone of inode {src}: inode {} ({} objects, {} files, pair {})",
            made.ino,
            made.objects,
            made.files,
            made.pair
        );
        Ok(())
    }

    /// `user.pairfs.volume` of the mount root: volume-wide figures for `pairfs status`
    /// (sizes in bytes, counters in tracks since mount).
    fn volume_line(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.fs.statfs();
        let e = &self.fs.engine;
        format!(
            "volume size_bytes={} used_bytes={} track_size={} inodes={} clean_at_mount={} readonly={} meta_failed={} copied_tracks={} cow_tracks={} staged_tracks={}\n",
            s.tracks * s.track_size,
            (s.tracks - s.free.min(s.tracks)) * s.track_size,
            s.track_size,
            s.inodes,
            u8::from(e.clean_at_load.load(Relaxed)),
            // Mounted read-only, or remounted so since.
            u8::from(
                self.fs.opts.readonly || self.mountpoint.as_deref().is_some_and(mount_is_readonly)
            ),
            u8::from(self.fs.durability.meta_failed()),
            e.copied_total.load(Relaxed),
            e.cow_total.load(Relaxed),
            e.staged_total.load(Relaxed),
        )
    }

    /// `user.pairfs.migrate` on the mount root: `volume TARGET`, `copy TARGET` or
    /// `abort` (`pairfs migrate`).
    fn migrate_set(&self, ino: u64, value: &[u8]) -> crate::Result<()> {
        if ino != crate::core::fs::ROOT {
            return Err(Error::invalid(format!(
                "{CONTROL_PREFIX}migrate is set on the mount root"
            )));
        }
        let v = std::str::from_utf8(value)
            .map_err(|_| Error::invalid("migrate: the value is not UTF-8"))?
            .trim_end_matches('\0')
            .trim();
        let (word, rest) = v.split_once(' ').unwrap_or((v, ""));
        // An image inside the file system it holds would be written through this daemon.
        if let Some(m) = &self.mountpoint
            && Path::new(rest.trim()).starts_with(m)
        {
            return Err(Error::invalid(format!(
                "migrate: the target {rest} is inside the mount {} itself",
                m.display()
            )));
        }
        match word {
            "abort" => self.fs.migrator.abort(),
            "volume" => self.fs.migrate(crate::core::migrate::Which::Volume, rest),
            "copy" => self.fs.migrate(crate::core::migrate::Which::Copy, rest),
            _ => Err(Error::invalid(format!(
                "migrate: {v:?}: expected `volume TARGET`, `copy TARGET` or `abort`"
            ))),
        }
    }

    fn control_get(&self, ino: u64, name: &str) -> crate::Result<Vec<u8>> {
        if name == "migration" {
            return Ok(self.fs.migrator.status_line().into_bytes());
        }
        if name == "replica" {
            return Ok(self.fs.durability.sinks_status().into_bytes());
        }
        if name == "pairs" {
            let mut out = String::new();
            for s in self.fs.engine.all_status(&*self.fs) {
                // Quoted with Rust's escapes (as `error=`): a path may hold spaces,
                // quotes, backslashes or newlines.
                out.push_str(&format!("{} path={:?}\n", s.line(), s.path));
            }
            return Ok(out.into_bytes());
        }
        if name == "generations" {
            let mut out = String::new();
            for g in self.fs.engine.gen_status() {
                out.push_str(&g.line());
                out.push('\n');
            }
            return Ok(out.into_bytes());
        }
        if name == "clones" && ino == crate::core::fs::ROOT {
            // At most 300 lines: a getxattr value is at most 64 KiB.
            return Ok(self.fs.clone_lines(300)?.into_bytes());
        }
        if name == "volume" && ino == crate::core::fs::ROOT {
            return Ok(self.volume_line().into_bytes());
        }
        if let Some(from) = name.strip_prefix("diff") {
            // `diff` or `diff.FROM`: one page of changed ranges (snap::diff); `@NAME`
            // after either: against generation NAME.
            let (from, generation) = match from.split_once('@') {
                Some((f, g)) => (f, Some(g)),
                None => (from, None),
            };
            let from = match from.strip_prefix('.') {
                Some(n) => n
                    .parse()
                    .map_err(|_| Error::invalid(format!("bad diff offset {n:?}")))?,
                None if from.is_empty() => 0,
                None => {
                    return Err(Error::invalid(format!(
                        "unknown control attribute {CONTROL_PREFIX}{name}"
                    )));
                }
            };
            let d = self.fs.diff(ino, generation)?;
            return Ok(crate::snap::diff::encode_page(&d, from));
        }
        if name == "scrub" && ino == crate::core::fs::ROOT {
            // Runs the whole scrub in this request (`pairfs scrub MOUNTPOINT`).
            return Ok(self.fs.engine.scrub(&*self.fs)?.text().into_bytes());
        }
        if name != "state" {
            return Err(Error::invalid(format!(
                "unknown control attribute {CONTROL_PREFIX}{name}"
            )));
        }
        let line = match self.fs.engine.status_of(&*self.fs, ino)? {
            Some(s) => s.line(),
            None => "none".to_string(),
        };
        Ok(line.into_bytes())
    }
}

/// Whether the mount at `mnt` is read-only now (it may have been remounted), from
/// /proc/self/mountinfo: the daemon must not ask its own mount (statvfs would be a
/// request to itself).
fn mount_is_readonly(mnt: &Path) -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mnt.as_os_str().as_bytes();
    let unescape = |x: &str| {
        x.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    s.lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 5 && unescape(f[4]).as_bytes() == want)
                .then(|| f[5].split(',').any(|o| o == "ro"))
        })
        .unwrap_or(false)
}

/// Whether the caller of `req` is in group `gid` (primary or supplementary).
fn in_group(req: &Request, gid: u32) -> bool {
    if req.gid() == gid {
        return true;
    }
    let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", req.pid())) else {
        return false;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

pub(crate) fn reply_xattr(reply: ReplyXattr, size: u32, data: crate::Result<Vec<u8>>, op: &str) {
    match data {
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(errno(&e, op)),
    }
}

impl MainFs {
    /// Runs `op`; if it finds no space, commits (tracks freed since the last commit
    /// become allocatable only then) and runs it once more, as ext4 retries an
    /// allocation after a journal commit. `rm big; fallocate big` then works at once.
    fn retry_enospc<T>(&self, op: impl Fn() -> crate::Result<T>) -> crate::Result<T> {
        match op() {
            Err(Error::NoSpace(_)) if self.fs.commit(Vec::new()).is_ok() => op(),
            r => r,
        }
    }

    /// The cookie a readdir pass of `ino` starting now stops before.
    fn dir_end(&self, ino: u64) -> u64 {
        let st = self.fs.state();
        st.get(ino)
            .ok()
            .and_then(|i| i.dir.as_ref())
            .map_or(u64::MAX, |d| d.end_cookie())
    }

    /// Entries of a directory read through handle `fh` from `offset`: a pass (from
    /// offset 0) returns only entries named before it began, so an entry renamed during
    /// the pass (it gets a new, larger cookie) is not returned twice and the pass ends
    /// (btrfs had the same problem, fixed the same way). Offset 0 also updates the atime.
    fn entries(&self, ino: u64, fh: u64, offset: u64) -> crate::Result<Vec<(u64, Attr, Vec<u8>)>> {
        let end = if offset == 0 {
            let end = self.dir_end(ino);
            let mut d = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = d.get_mut(&fh) {
                *e = end;
            }
            self.note_read(ino, true);
            end
        } else {
            let d = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            d.get(&fh).copied().unwrap_or(u64::MAX)
        };
        let mut v = self.fs.readdir(ino, offset)?;
        v.retain(|e| e.0 < end);
        Ok(v)
    }

    /// Clears set-user-id, and set-group-id when group-executable or the caller is not
    /// in the file's group, after an unprivileged fallocate, as the kernel does for a
    /// write (it does not for a FUSE fallocate).
    fn kill_privs(&self, req: &Request, ino: u64) {
        if req.uid() == 0 {
            return;
        }
        let Ok(a) = self.fs.getattr(ino) else { return };
        let perm = a.row.perm;
        let mut new = perm & !libc::S_ISUID;
        if perm & libc::S_ISGID != 0 && (perm & libc::S_IXGRP != 0 || !in_group(req, a.row.gid)) {
            new &= !libc::S_ISGID;
        }
        if new != perm && a.row.kind == libc::S_IFREG {
            let set = SetAttr {
                mode: Some(new),
                ..SetAttr::default()
            };
            if let Err(e) = self.fs.setattr(ctx(req), ino, set) {
                log::debug!("clearing set-id bits of inode {ino}: {e}");
            }
            // The kernel keeps the mode it had; make it ask again (attributes only).
            if let Some(n) = self.notifier.get()
                && let Err(e) = n.inval_inode(INodeNo(ino), -1, 0)
            {
                log::debug!("invalidating the attributes of inode {ino}: {e}");
            }
        }
    }
}

/// The open flags for a file opened with `flags`. An `O_DIRECT` open is answered with
/// `FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES`: its writes then reach the workers
/// concurrently (the page-cache path holds the inode lock across each O_DIRECT write, so
/// a queue of them ran one at a time: 4 KiB random writes at QD16 went from 17-18k to
/// 38-92k IOPS). The core runs writes of one file in parallel (`core::locks`: data I/O
/// shares the data lock). The kernel invalidates cached pages of the range before each
/// such write and, with `FUSE_DIRECT_IO_ALLOW_MMAP`, still allows shared mappings.
/// `PAIRFS_NO_PARALLEL_DIO=1` turns it off (to measure it).
fn direct_open_flags(flags: i32) -> FopenFlags {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var_os("PAIRFS_NO_PARALLEL_DIO").is_none());
    if on && flags & libc::O_DIRECT != 0 {
        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
    } else {
        FopenFlags::empty()
    }
}

/// The main mount's data-path settings at FUSE init: 1 MiB writes and readahead,
/// parallel directory operations, asynchronous reads and O_DIRECT (FUSE_ASYNC_DIO: an
/// application's queued O_DIRECT I/O, libaio or io_uring, reaches the worker threads as
/// concurrent requests instead of one at a time), readdirplus. Also used by
/// `examples/memfs.rs`, the FUSE floor the benchmarks compare against, so both are
/// mounted alike.
pub fn data_path_init(config: &mut KernelConfig) {
    let _ = config.set_max_write(1 << 20);
    let _ = config.set_max_readahead(1 << 20);
    let _ = config.add_capabilities(
        InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO,
    );
}

impl Filesystem for MainFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        data_path_init(config);
        if self.writeback
            && config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_err()
        {
            log::warn!("the kernel does not offer FUSE_WRITEBACK_CACHE: writes go through");
            self.writeback = false;
        }
        // POSIX ACLs: the kernel checks access against the access ACL it reads through
        // getxattr (and caches), and passes the mode and umask of a create unmasked, so
        // the core applies the parent's default ACL or else the umask.
        if config
            .add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
            .is_err()
        {
            log::warn!("the kernel does not offer FUSE_POSIX_ACL: ACLs are kept, not enforced");
        }
        // Shared mappings of files opened with O_DIRECT (`direct_open_flags`).
        if config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_err()
        {
            log::debug!("the kernel does not offer FUSE_DIRECT_IO_ALLOW_MMAP");
        }
        // Inode numbers are persistent and never reused (`next_ino` is committed), so a
        // file handle (inode, generation 0) stays valid across cache drops and remounts:
        // open_by_handle_at(2) and NFS export work. Needs lookup of "." and "..".
        if config
            .add_capabilities(InitFlags::FUSE_EXPORT_SUPPORT)
            .is_err()
        {
            log::debug!("the kernel does not offer FUSE_EXPORT_SUPPORT");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // "." and ".." arrive only from the export code (a handle decoded after the
        // inode left the kernel's cache, or a parent asked for).
        let r = match name.as_bytes() {
            b"." => self.fs.lookup_handle(parent.0),
            b".." => {
                let p = self
                    .fs
                    .state()
                    .get(parent.0)
                    .map(|i| i.parent().unwrap_or(ROOT));
                p.and_then(|p| self.fs.lookup_handle(p))
            }
            n => self.fs.lookup(parent.0, n),
        };
        self.entry(r, reply, "lookup");
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(errno(&e, "getattr")),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = |x: Option<TimeOrNow>| {
            x.map(|t| match t {
                TimeOrNow::Now => None,
                TimeOrNow::SpecificTime(s) => Some(ns_of(s)),
            })
        };
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: t(atime),
            mtime: t(mtime),
            ctime: ctime.map(ns_of),
        };
        match self.fs.setattr(ctx(req), ino.0, a) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(errno(&e, "setattr")),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e, "readlink")),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = mode & libc::S_IFMT;
        let kind = if kind == 0 { libc::S_IFREG } else { kind };
        let r = match kind {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK => {
                self.fs.create_node(
                    create_ctx(req, umask),
                    parent.0,
                    name.as_bytes(),
                    kind | (mode & 0o7777),
                    rdev,
                    None,
                )
            }
            _ => Err(Error::invalid("mknod of this type")),
        };
        self.entry(r, reply, "mknod");
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.fs.create_node(
            create_ctx(req, umask),
            parent.0,
            name.as_bytes(),
            libc::S_IFDIR | (mode & 0o7777),
            0,
            None,
        );
        self.entry(r, reply, "mkdir");
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, name.as_bytes(), false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "unlink")),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, name.as_bytes(), true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "rmdir")),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes().to_vec();
        if t.len() > 4095 {
            reply.error(Errno::from_i32(libc::ENAMETOOLONG));
            return;
        }
        let r = self.fs.create_node(
            ctx(req),
            parent.0,
            link_name.as_bytes(),
            libc::S_IFLNK | 0o777,
            0,
            Some(t),
        );
        self.entry(r, reply, "symlink");
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        // RENAME_WHITEOUT (overlayfs' upper layer): the rename, then a whiteout (a
        // character device 0:0) at the old name. The kernel has checked CAP_MKNOD.
        let whiteout = flags.bits() & libc::RENAME_WHITEOUT != 0;
        let r = if whiteout && flags.bits() & libc::RENAME_EXCHANGE != 0 {
            Err(Error::invalid("RENAME_WHITEOUT with RENAME_EXCHANGE"))
        } else {
            self.fs.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits() & !libc::RENAME_WHITEOUT,
            )
        };
        let r = r.and_then(|()| {
            if whiteout {
                self.fs
                    .create_node(ctx(req), parent.0, name.as_bytes(), libc::S_IFCHR, 0, None)
                    .map(|_| ())
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "rename")),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            self.fs.link(ino.0, newparent.0, newname.as_bytes()),
            reply,
            "link",
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        // O_TRUNC arrives as a separate setattr (no FUSE_ATOMIC_O_TRUNC).
        match self.fs.open(ino.0, write) {
            Ok(fh) => reply.opened(FileHandle(fh), direct_open_flags(flags.0)),
            Err(e) => reply.error(errno(&e, "open")),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // One reply buffer per worker thread: no allocation per read.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            match self.fs.read_into(ino.0, offset, size, buf, self.atime) {
                Ok(due) => {
                    // Before the reply: a stat right after the read must see the new atime.
                    if due {
                        self.note_read(ino.0, false);
                    }
                    reply.data(buf);
                }
                Err(e) => reply.error(errno(&e, "read")),
            }
            // Keep at most one maximal read (1 MiB) per thread.
            if buf.capacity() > 1 << 20 {
                *buf = Vec::new();
            }
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.retry_enospc(|| self.fs.write(ino.0, offset, data)) {
            Ok(n) => {
                // A direct-I/O write (`FOPEN_DIRECT_IO`) leaves clearing set-id bits to
                // the file system: the kernel asks with this flag.
                if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                    self.kill_privs(req, ino.0);
                }
                reply.written(n as u32)
            }
            Err(e) => reply.error(errno(&e, "write")),
        }
    }

    /// Nothing to do at close(2): data reaches the core at each write (and, with
    /// write-back caching, the kernel writes a file's dirty pages back before it would
    /// send FLUSH), and POSIX locks are the kernel's. ENOSYS tells the kernel so once
    /// (`no_flush`): it stops sending FLUSH, one round trip less per close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "release")),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(ino.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "fsync")),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // A handle like a file's: an open directory that is removed or renamed over stays
        // (with nlink 0) until it is closed; it also keeps the inode cached.
        match self.fs.opendir(ino.0) {
            Ok(fh) => {
                let end = self.dir_end(ino.0);
                self.dirs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, end);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(errno(&e, "opendir")),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        match self.fs.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "releasedir")),
        }
    }

    // fuser's default `batch_forget` calls this per inode (its `ForgetOne` is private).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.entries(ino.0, fh.0, offset) {
            Ok(entries) => {
                for (cookie, a, name) in entries {
                    if reply.add(
                        INodeNo(a.row.ino),
                        cookie,
                        file_type(a.row.kind),
                        OsStr::from_bytes(&name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e, "readdir")),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.entries(ino.0, fh.0, offset) {
            Ok(entries) => {
                for (cookie, a, name) in entries {
                    let n = OsStr::from_bytes(&name);
                    if name == b"." || name == b".." {
                        // Entries for . and .. must not add lookup counts.
                        let mut fa = fuse_attr(&a);
                        fa.ino = INodeNo(a.row.ino);
                        if reply.add(
                            INodeNo(a.row.ino),
                            cookie,
                            n,
                            &Duration::ZERO,
                            &fa,
                            Generation(0),
                        ) {
                            break;
                        }
                        continue;
                    }
                    if reply.add(
                        INodeNo(a.row.ino),
                        cookie,
                        n,
                        &TTL,
                        &fuse_attr(&a),
                        Generation(0),
                    ) {
                        break;
                    }
                    // The kernel counts a lookup for every entry it is given.
                    self.fs.remember(a.row.ino);
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e, "readdirplus")),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.commit(Vec::new()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "fsyncdir")),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        let blocks = s.tracks * s.track_size / 4096;
        let free = s.free * s.track_size / 4096;
        let files = 1 << 32;
        reply.statfs(blocks, free, free, files, files - s.inodes, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let n = name.as_bytes();
        let r = match std::str::from_utf8(n)
            .ok()
            .and_then(|s| s.strip_prefix(CONTROL_PREFIX))
        {
            // A clone keeps the frozen owners and modes (set-uid files too), as `cp -a`
            // can only for root.
            Some("clone") if req.uid() != 0 => Err(Error::NotPermitted),
            Some(op) => self.control_set(ino.0, op, value),
            None => self.fs.setxattr_by(ino.0, n, value, flags, &|g| {
                req.uid() == 0 || in_group(req, g)
            }),
        };
        if r.is_ok()
            && n == crate::core::acl::ACCESS
            && let Some(notifier) = self.notifier.get()
        {
            // The ACL set the mode; the kernel only refreshes ctime after a setxattr.
            let _ = notifier.inval_inode(ino, -1, 0);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "setxattr")),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let n = name.as_bytes();
        let r = match std::str::from_utf8(n)
            .ok()
            .and_then(|s| s.strip_prefix(CONTROL_PREFIX))
        {
            Some(op) => self.control_get(ino.0, op),
            None => self.fs.getxattr(ino.0, n),
        };
        reply_xattr(reply, size, r, "getxattr");
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.fs.listxattr(ino.0), "listxattr");
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let n = name.as_bytes();
        if n.starts_with(CONTROL_PREFIX.as_bytes()) {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        match self.fs.removexattr(ino.0, n) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "removexattr")),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only checks
        // that the inode exists.
        match self.fs.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e, "access")),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self
            .fs
            .create_node(
                create_ctx(req, umask),
                parent.0,
                name.as_bytes(),
                libc::S_IFREG | (mode & 0o7777),
                0,
                None,
            )
            .and_then(|a| {
                let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
                Ok((self.fs.open(a.row.ino, write)?, a))
            });
        match r {
            Ok((fh, a)) => reply.created(
                &TTL,
                &fuse_attr(&a),
                Generation(0),
                FileHandle(fh),
                direct_open_flags(flags),
            ),
            Err(e) => reply.error(errno(&e, "create")),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.retry_enospc(|| self.fs.fallocate(ino.0, offset, length, mode)) {
            Ok(()) => {
                self.kill_privs(req, ino.0);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e, "fallocate")),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if offset < 0 {
            // As on ext4 and xfs: no data or hole before the start of the file.
            let e = if whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE {
                libc::ENXIO
            } else {
                libc::EINVAL
            };
            reply.error(Errno::from_i32(e));
            return;
        }
        match self.fs.lseek(ino.0, offset as u64, whence) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(&e, "lseek")),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let len = len.min(u32::MAX as u64 & !0xfff);
        match self
            .fs
            .copy_file_range(ino_in.0, offset_in, ino_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e, "copy_file_range")),
        }
    }
}
