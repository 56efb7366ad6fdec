//! lazyfs: a passthrough FUSE filesystem that loses unsynced writes on demand, for
//! power-loss tests (issue 4; after LazyFS).
//!
//! ```text
//! lazyfs BACKING_DIR MOUNTPOINT        # foreground
//! kill -USR1 <pid>                     # power loss: keep a random subset of the unsynced
//!                                      # writes, drop the rest, unmount, exit 0
//! ```
//!
//! Data writes to regular files (`write`, `fallocate` with `PUNCH_HOLE`) do not reach the
//! backing file until an `fsync`/`fdatasync` of that file: they are kept in memory as a
//! per-file list of pending operations, and reads and `getattr` see the backing content
//! overlaid with them in order. `fsync` applies the file's pending operations in order to the
//! backing file and fsyncs it. Truncation (which also drops pending writes past the new end),
//! other `fallocate` modes and namespace operations (create, mkdir, unlink, rmdir, rename)
//! go to the backing store at once.
//!
//! On SIGUSR1 each file keeps a random subset of its pending operations (seeded by
//! `LAZYFS_SEED`, else the clock; the seed is printed), applied in order; the rest is lost.
//! SIGTERM/SIGINT unmount without applying anything either (also a power loss, of
//! everything unsynced). POSIX locks are left to the kernel (no `FUSE_POSIX_LOCKS`); xattrs,
//! symlinks, hard links and `lseek` `SEEK_DATA`/`SEEK_HOLE` are not supported.

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(1);

enum Op {
    Write { off: u64, data: Vec<u8> },
    Punch { off: u64, len: u64 },
}

impl Op {
    fn end(&self) -> u64 {
        match self {
            Op::Write { off, data } => off + data.len() as u64,
            Op::Punch { .. } => 0, // KEEP_SIZE: does not extend the file
        }
    }
}

#[derive(Default)]
struct FileState {
    fd: Option<File>,
    pending: Vec<Op>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

impl FileState {
    fn fd(&self) -> Result<&File, Errno> {
        self.fd.as_ref().ok_or(Errno::EBADF)
    }

    /// Backing size with the pending writes.
    fn size(&self, backing: u64) -> u64 {
        self.pending.iter().map(Op::end).fold(backing, u64::max)
    }

    /// Drops (clips) pending writes at or past `size` after a truncation.
    fn clip(&mut self, size: u64) {
        self.pending.retain_mut(|op| match op {
            Op::Write { off, data } => {
                if *off >= size {
                    false
                } else {
                    data.truncate((size - *off).min(data.len() as u64) as usize);
                    true
                }
            }
            Op::Punch { off, len } => {
                if *off >= size {
                    false
                } else {
                    *len = (*len).min(size - *off);
                    true
                }
            }
        });
    }

    fn apply(fd: &File, op: &Op) -> std::io::Result<()> {
        match op {
            Op::Write { off, data } => fd.write_all_at(data, *off),
            Op::Punch { off, len } => {
                // SAFETY: fallocate on an open fd.
                let r = unsafe {
                    libc::fallocate(
                        fd.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        *off as i64,
                        *len as i64,
                    )
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if let Some(fd) = &self.fd {
            for op in &self.pending {
                Self::apply(fd, op)?;
            }
            self.pending.clear();
            fd.sync_all()?;
        }
        Ok(())
    }
}

struct Table {
    paths: HashMap<u64, PathBuf>,
    by_path: HashMap<PathBuf, u64>,
    files: HashMap<u64, Arc<Mutex<FileState>>>,
    next: u64,
}

#[derive(Clone)]
struct LazyFs {
    root: PathBuf,
    t: Arc<Mutex<Table>>,
}

fn kind_of(m: &std::fs::Metadata) -> FileType {
    FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile)
}

fn ts(s: i64, ns: i64) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns as u32)
    } else {
        UNIX_EPOCH
    }
}

impl LazyFs {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        lock(&self.t)
            .paths
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn real(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn node(&self, ino: INodeNo) -> Arc<Mutex<FileState>> {
        lock(&self.t).files.entry(ino.0).or_default().clone()
    }

    /// The node of `rel`, created if new.
    fn ino_of(&self, rel: &Path) -> u64 {
        let mut t = lock(&self.t);
        if let Some(&i) = t.by_path.get(rel) {
            return i;
        }
        let i = t.next;
        t.next += 1;
        t.paths.insert(i, rel.to_path_buf());
        t.by_path.insert(rel.to_path_buf(), i);
        i
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = lock(&self.t).files.get(&ino).cloned();
        if let Some(n) = node {
            let n = lock(&n);
            if let Some(fd) = &n.fd {
                let m = fd.metadata().map_err(errno)?;
                return Ok(Self::to_attr(ino, &m, n.size(m.len())));
            }
        }
        let rel = self.path(INodeNo(ino))?;
        let m = std::fs::symlink_metadata(self.real(&rel)).map_err(errno)?;
        Ok(Self::to_attr(ino, &m, m.len()))
    }

    fn to_attr(ino: u64, m: &std::fs::Metadata, size: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: m.blocks().max(size.div_ceil(512)),
            atime: ts(m.atime(), m.atime_nsec()),
            mtime: ts(m.mtime(), m.mtime_nsec()),
            ctime: ts(m.ctime(), m.ctime_nsec()),
            crtime: ts(m.ctime(), m.ctime_nsec()),
            kind: kind_of(m),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Opens the node's backing fd if it has none.
    fn ensure_fd(&self, ino: INodeNo) -> Result<Arc<Mutex<FileState>>, Errno> {
        let node = self.node(ino);
        let has = lock(&node).fd.is_some();
        if !has {
            let rel = self.path(ino)?;
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.real(&rel))
                .map_err(errno)?;
            let mut n = lock(&node);
            if n.fd.is_none() {
                n.fd = Some(f);
            }
        }
        Ok(node)
    }

    fn truncate(&self, ino: INodeNo, size: u64) -> Result<(), Errno> {
        let node = self.ensure_fd(ino)?;
        let mut n = lock(&node);
        n.fd()?.set_len(size).map_err(errno)?;
        n.clip(size);
        Ok(())
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn entry_of(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let i = self.ino_of(rel);
        self.attr(i)
    }

    /// A path went away (unlink, rmdir, replaced by rename): its node keeps its fd and data.
    /// unlink/rmdir: remove the backing entry at once (namespace operations are durable
    /// immediately in this layer) and forget the path.
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        rm: fn(PathBuf) -> std::io::Result<()>,
        reply: ReplyEmpty,
    ) {
        let r = self.child(parent, name).and_then(|rel| {
            let mut t = lock(&self.t);
            rm(self.real(&rel)).map_err(errno)?;
            Self::forget_path(&mut t, &rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn forget_path(t: &mut Table, rel: &Path) {
        if let Some(i) = t.by_path.remove(rel) {
            t.paths.remove(&i);
        }
    }

    /// Power loss: every file keeps a random subset of its pending ops.
    fn crash(&self, seed: u64, subset: bool) -> (usize, usize, usize, String) {
        let t = lock(&self.t);
        let mut per_file = String::new();
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let (mut kept, mut total, mut files) = (0, 0, 0);
        let ids = ids_sorted(&t);
        // Hold every file's lock to the end: no request gets through any more.
        let mut guards = Vec::new();
        for i in ids {
            let node = t.files[&i].clone();
            guards.push(node);
        }
        let mut held: Vec<(u64, MutexGuard<'_, FileState>)> = ids_sorted(&t)
            .into_iter()
            .zip(guards.iter().map(|n| lock(n)))
            .collect();
        for (ino, n) in held.iter_mut() {
            if n.pending.is_empty() {
                continue;
            }
            files += 1;
            // Per file: keep nothing, everything, a prefix, or each op with probability 1/2.
            let mode = if subset { next() % 4 } else { 0 };
            let len = n.pending.len();
            let cut = (next() % (len as u64 + 1)) as usize;
            let pending = std::mem::take(&mut n.pending);
            let fd = n.fd.as_ref().unwrap();
            let kept0 = kept;
            for (k, op) in pending.iter().enumerate() {
                let keep = match mode {
                    0 => false,
                    1 => true,
                    2 => k < cut,
                    _ => next() & 1 == 0,
                };
                total += 1;
                if keep {
                    kept += 1;
                    let _ = FileState::apply(fd, op);
                }
            }
            let _ = fd.sync_all();
            let name = t
                .paths
                .get(ino)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("(deleted ino {ino})"));
            per_file += &format!(" {name}: {}/{len}", kept - kept0);
        }
        std::mem::forget(held);
        (kept, total, files, per_file)
    }
}

fn ids_sorted(t: &Table) -> Vec<u64> {
    let mut ids: Vec<_> = t.files.keys().copied().collect();
    ids.sort();
    ids
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.child(parent, name).and_then(|rel| {
            std::fs::symlink_metadata(self.real(&rel)).map_err(errno)?;
            self.entry_of(&rel)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let real = self.real(&self.path(ino)?);
            let c = cpath(&real);
            if let Some(m) = mode {
                // SAFETY: valid C string.
                if unsafe { libc::chmod(c.as_ptr(), m & 0o7777) } != 0 {
                    return Err(errno(std::io::Error::last_os_error()));
                }
            }
            if uid.is_some() || gid.is_some() {
                let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
                // SAFETY: valid C string.
                if unsafe { libc::lchown(c.as_ptr(), u, g) } != 0 {
                    return Err(errno(std::io::Error::last_os_error()));
                }
            }
            if let Some(s) = size {
                self.truncate(ino, s)?;
            }
            if atime.is_some() || mtime.is_some() {
                let conv = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec {
                            tv_sec: d.as_secs() as i64,
                            tv_nsec: d.subsec_nanos() as i64,
                        }
                    }
                };
                let times = [conv(atime), conv(mtime)];
                // SAFETY: valid C string and two timespecs.
                if unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                } != 0
                {
                    return Err(errno(std::io::Error::last_os_error()));
                }
            }
            self.attr(ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.child(parent, name).and_then(|rel| {
            let c = cpath(&self.real(&rel));
            // SAFETY: valid C string.
            if unsafe { libc::mkdir(c.as_ptr(), mode & !umask & 0o7777) } != 0 {
                return Err(errno(std::io::Error::last_os_error()));
            }
            self.entry_of(&rel)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, std::fs::remove_file, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, std::fs::remove_dir, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let r = (|| {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            let mut t = lock(&self.t);
            std::fs::rename(self.real(&from), self.real(&to)).map_err(errno)?;
            if from == to {
                return Ok(());
            }
            Self::forget_path(&mut t, &to);
            // Move the node and everything under it.
            let moved: Vec<(PathBuf, u64)> = t
                .by_path
                .iter()
                .filter(|(p, _)| p.starts_with(&from))
                .map(|(p, &i)| (p.clone(), i))
                .collect();
            for (p, i) in moved {
                let np = to.join(p.strip_prefix(&from).unwrap());
                t.by_path.remove(&p);
                t.by_path.insert(np.clone(), i);
                t.paths.insert(i, np);
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let rel = self.path(ino)?;
            let m = std::fs::symlink_metadata(self.real(&rel)).map_err(errno)?;
            if m.is_file() {
                self.ensure_fd(ino)?;
                if flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                    self.truncate(ino, 0)?;
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            let rel = self.child(parent, name)?;
            let mut o = OpenOptions::new();
            o.read(true)
                .write(true)
                .create(true)
                .mode(mode & !umask & 0o7777);
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            }
            let f = o.open(self.real(&rel)).map_err(errno)?;
            let ino = INodeNo(self.ino_of(&rel));
            let node = self.node(ino);
            {
                let mut n = lock(&node);
                if n.fd.is_none() {
                    n.fd = Some(f);
                }
            }
            if flags & libc::O_TRUNC != 0 {
                self.truncate(ino, 0)?;
            }
            self.attr(ino.0)
        })();
        match r {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(a.ino.0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
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
        let r = (|| {
            let node = self.ensure_fd(ino)?;
            let n = lock(&node);
            let fd = n.fd()?;
            let bsize = fd.metadata().map_err(errno)?.len();
            let total = n.size(bsize);
            if offset >= total {
                return Ok(Vec::new());
            }
            let len = (size as u64).min(total - offset) as usize;
            let mut buf = vec![0u8; len];
            // Backing content (zeros past its end).
            let mut got = 0usize;
            while got < len {
                match fd.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            let end = offset + len as u64;
            for op in &n.pending {
                let (o, l) = match op {
                    Op::Write { off, data } => (*off, data.len() as u64),
                    Op::Punch { off, len } => (*off, *len),
                };
                let (a, b) = (o.max(offset), (o + l).min(end));
                if a >= b {
                    continue;
                }
                let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
                match op {
                    Op::Write { data, .. } => {
                        dst.copy_from_slice(&data[(a - o) as usize..(b - o) as usize])
                    }
                    Op::Punch { .. } => dst.fill(0),
                }
            }
            Ok(buf)
        })();
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.ensure_fd(ino) {
            Ok(node) => {
                lock(&node).pending.push(Op::Write {
                    off: offset,
                    data: data.to_vec(),
                });
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .ensure_fd(ino)
            .and_then(|node| lock(&node).sync().map_err(errno));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = (|| {
            let rel = self.path(ino)?;
            let mut v = vec![
                (ino.0, FileType::Directory, OsStr::new(".").to_os_string()),
                (1, FileType::Directory, OsStr::new("..").to_os_string()),
            ];
            for e in std::fs::read_dir(self.real(&rel)).map_err(errno)?.flatten() {
                let k = e
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                v.push((e.ino().max(2), k, e.file_name()));
            }
            Ok(v)
        })();
        match r {
            Ok(v) => {
                for (k, (i, kind, name)) in v.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(i), (k + 1) as u64, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
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
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let c = cpath(&self.root);
        // SAFETY: valid C string, zeroed out-struct.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            reply.error(errno(std::io::Error::last_os_error()));
            return;
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let node = self.ensure_fd(ino)?;
            let mut n = lock(&node);
            if mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE {
                n.pending.push(Op::Punch {
                    off: offset,
                    len: length,
                });
                Ok(())
            } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
                // Plain allocation: no data changes, goes through at once. A size
                // extension must not cut pending writes, which lie within the new size.
                // SAFETY: fallocate on an open fd.
                let r = unsafe {
                    libc::fallocate(n.fd()?.as_raw_fd(), mode, offset as i64, length as i64)
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(errno(std::io::Error::last_os_error()))
                }
            } else {
                Err(Errno::EOPNOTSUPP)
            }
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn main() {
    env_logger::init();
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: lazyfs BACKING_DIR MOUNTPOINT");
        std::process::exit(2);
    }
    let root = std::fs::canonicalize(&args[1]).expect("backing dir");
    let mnt = std::fs::canonicalize(&args[2]).expect("mountpoint");
    let seed: u64 = std::env::var("LAZYFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "lazyfs: {} on {}, seed {seed} (LAZYFS_SEED={seed})",
        root.display(),
        mnt.display()
    );
    // Signals go to the signal thread only: block them before any thread starts.
    // SAFETY: sigset manipulation on a local, pthread_sigmask on this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mut t = Table {
        paths: HashMap::new(),
        by_path: HashMap::new(),
        files: HashMap::new(),
        next: 2,
    };
    t.paths.insert(1, PathBuf::new());
    t.by_path.insert(PathBuf::new(), 1);
    let fs = LazyFs {
        root,
        t: Arc::new(Mutex::new(t)),
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("lazyfs".into()),
        MountOption::Subtype("lazyfs".into()),
    ];
    cfg.n_threads = Some(4);
    let session = fuser::Session::new(fs.clone(), &mnt, &cfg)
        .and_then(|s| s.spawn())
        .unwrap_or_else(|e| {
            eprintln!("lazyfs: mount failed: {e}");
            std::process::exit(1)
        });
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: a valid, blocked signal set.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            break;
        }
    }
    let (kept, total, files, per_file) = fs.crash(seed, sig == libc::SIGUSR1);
    eprintln!(
        "lazyfs: power loss ({}, seed {seed}): kept {kept} of {total} unsynced operations in {files} files:{per_file}",
        if sig == libc::SIGUSR1 {
            "SIGUSR1"
        } else {
            "terminated: all dropped"
        }
    );
    let c = cpath(&mnt);
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&mnt)
            .status();
    }
    let _ = std::io::stderr().flush();
    std::mem::forget(session);
    std::process::exit(0);
}
