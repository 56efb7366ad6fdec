//! FUSE adapter of the copy mount: a read-only tree of every frozen copy, each object
//! at its split-time path with its split-time attributes and xattrs. The tree is the
//! core's frozen view ([`crate::snap::view`]); this adapter only converts and replies.
//! It serves a mounted volume's [`Fs`] (`Arc<Fs>`), or any other [`Source`] of one: the
//! secondary of a replica link serves its copies from the state it last committed
//! (`crate::repl::follow`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::core::fs::Fs;
use crate::fuse::main_fs::{reply_xattr, systime};
use crate::snap::pair::FrozenKind;
use crate::snap::view::{Content, FrozenView, VIEW_ROOT, ViewAttr, ViewNode};

/// How long the kernel may keep names and attributes. A view does not change until the
/// frozen set does; then [`invalidate_on_change`] drops the kernel's cached names, so
/// this only bounds what a process that sits inside the copy mount (its working
/// directory, open files) can still see of the previous instant.
const TTL: Duration = Duration::from_secs(1);

/// Where the copy mount's file system comes from.
pub trait Source: Send + Sync + 'static {
    /// Runs `f` once with the file system to answer one request from, which stays
    /// consistent (its frozen copies' data in place) until `f` returns; an errno when
    /// no frozen copy can be served now.
    fn with_fs(&self, f: &mut dyn FnMut(&Fs)) -> Result<(), Errno>;

    /// A line about the source itself, served as [`SOURCE_XATTR`] of the copy mount's
    /// root even while no frozen copy can be served (a secondary's state); `None` for a
    /// mounted volume.
    fn describe(&self) -> Option<String> {
        None
    }
}

/// The copy mount root's extended attribute that carries [`Source::describe`].
pub const SOURCE_XATTR: &str = "user.pairfs.replica";

/// A mounted volume serves its own frozen copies.
impl Source for Arc<Fs> {
    fn with_fs(&self, f: &mut dyn FnMut(&Fs)) -> Result<(), Errno> {
        f(self);
        Ok(())
    }
}

/// The copy mount.
pub struct CopyFs {
    src: Box<dyn Source>,
}

fn file_type(k: FrozenKind) -> FileType {
    match k {
        FrozenKind::File => FileType::RegularFile,
        FrozenKind::Dir => FileType::Directory,
        FrozenKind::Symlink => FileType::Symlink,
        FrozenKind::Fifo => FileType::NamedPipe,
        FrozenKind::Socket => FileType::Socket,
        FrozenKind::CharDev => FileType::CharDevice,
        FrozenKind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &ViewAttr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: systime(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 65536,
        flags: 0,
    }
}

/// Spawns a thread that, after every change of the frozen set (split, update, resync,
/// release, error), tells the kernel to forget the copy mount's top-level names and the
/// root's attributes: the next path walk looks the new view up.
pub fn invalidate_on_change(fs: Arc<Fs>, notifier: fuser::Notifier) -> std::io::Result<()> {
    let rx = fs.engine.watch_view();
    std::thread::Builder::new()
        .name("pairfs-copy-inval".into())
        .spawn(move || {
            // Only the root's names, not the view: building a lazy instant's view walks
            // its tree, which the first copy-mount request does anyway.
            let mut old = fs.engine.top_names(&*fs);
            while rx.recv().is_ok() {
                while rx.try_recv().is_ok() {}
                let new = fs.engine.top_names(&*fs);
                invalidate(&notifier, old.iter().chain(new.iter()));
                old = new;
            }
        })?;
    Ok(())
}

/// Spawns a thread that drops the kernel's cached `names` in the copy mount's root (and
/// the root's attributes) for every list received: a [`Source`] whose frozen set
/// changed sends the top-level names of its old and new view.
pub fn invalidate_names(
    rx: std::sync::mpsc::Receiver<Vec<Vec<u8>>>,
    notifier: fuser::Notifier,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("pairfs-copy-inval".into())
        .spawn(move || {
            while let Ok(names) = rx.recv() {
                invalidate(&notifier, names.iter());
            }
        })?;
    Ok(())
}

fn invalidate<'a>(notifier: &fuser::Notifier, names: impl Iterator<Item = &'a Vec<u8>>) {
    let mut names: Vec<&[u8]> = names.map(Vec::as_slice).collect();
    names.sort();
    names.dedup();
    for n in names {
        if let Err(e) = notifier.inval_entry(INodeNo(VIEW_ROOT), OsStr::from_bytes(n))
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::debug!("copy mount: invalidate {}: {e}", String::from_utf8_lossy(n));
        }
    }
    let _ = notifier.inval_inode(INodeNo(VIEW_ROOT), -1, 0);
}

impl CopyFs {
    /// Serves the frozen copies of `src` (an `Arc<Fs>`, or another [`Source`]).
    pub fn new(src: impl Source) -> Self {
        CopyFs { src: Box::new(src) }
    }

    /// Runs `f` on the source's file system, held for its duration.
    fn run<T>(&self, f: impl FnOnce(&Fs) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut f = Some(f);
        let mut out = None;
        self.src.with_fs(&mut |fs| {
            if let Some(f) = f.take() {
                out = Some(f(fs));
            }
        })?;
        out.unwrap_or(Err(Errno::EIO))
    }

    fn view(&self) -> Result<Arc<FrozenView>, Errno> {
        self.run(|fs| Ok(fs.engine.view(fs, fs.track_size)))
    }

    /// Runs `f` on node `ino` of the current view (ENOENT if absent).
    fn with<T>(
        &self,
        ino: INodeNo,
        f: impl FnOnce(&ViewNode) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        let v = self.view()?;
        v.get(ino.0).map_or(Err(Errno::ENOENT), f)
    }
}

fn erofs() -> Errno {
    Errno::from_i32(libc::EROFS)
}

impl Filesystem for CopyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let v = match self.view() {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        match v.lookup(parent.0, name.as_bytes()) {
            Some(n) => reply.entry(&TTL, &attr(&n.attr), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(ino, |n| Ok(attr(&n.attr))) {
            Ok(a) => reply.attr(&TTL, &a),
            // The root stays reachable while nothing can be served (a secondary in a
            // sync refuses with EAGAIN), so that its `user.pairfs.replica` can say why;
            // listing it fails.
            Err(e) if ino.0 == VIEW_ROOT && e == Errno::from_i32(libc::EAGAIN) => reply.attr(
                &Duration::ZERO,
                &attr(&ViewAttr {
                    ino: VIEW_ROOT,
                    kind: FrozenKind::Dir,
                    perm: 0o555,
                    size: 4096,
                    blocks: 8,
                    nlink: 2,
                    ..ViewAttr::default()
                }),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let v = match self.view() {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        match v.get(ino.0).map(|n| &n.content) {
            Some(Content::Symlink(t)) => reply.data(t),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(erofs());
            return;
        }
        let r = self.with(ino, |n| match n.content {
            Content::File { .. } => Ok(()),
            Content::Dir(_) => Err(Errno::EISDIR),
            // FIFOs, sockets and devices of a frozen copy have nothing to open.
            _ => Err(Errno::from_i32(libc::ENXIO)),
        });
        match r {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
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
        // The view and the data under one hold of the source.
        let r = self.run(|fs| {
            let v = fs.engine.view(fs, fs.track_size);
            let (id, idx, fino) = match v.get(ino.0).map(|n| &n.content) {
                Some(Content::File { pair, idx, ino }) => (*pair, *idx, *ino),
                Some(_) => return Err(Errno::EISDIR),
                None => return Err(Errno::ENOENT),
            };
            fs.engine
                .read_frozen_of(fs, (id, idx, Some(fino)), offset, size)
                .map_err(|e| {
                    log::warn!("copy mount read: {e}");
                    Errno::from_i32(e.errno())
                })
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(ino, |n| match n.content {
            Content::Dir(_) => Ok(()),
            _ => Err(Errno::ENOTDIR),
        }) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
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
        let v = match self.view() {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let Some(n) = v.get(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let Content::Dir(d) = &n.content else {
            reply.error(Errno::ENOTDIR);
            return;
        };
        // Offsets: 1 is ".", 2 is "..", 2 + k + 1 follows entry k.
        let dots = [(ino.0, b".".as_slice()), (n.parent, b"..".as_slice())];
        for (k, (i, name)) in dots.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(*i),
                (k + 1) as u64,
                FileType::Directory,
                OsStr::from_bytes(name),
            ) {
                reply.ok();
                return;
            }
        }
        let from = (offset as usize).saturating_sub(2);
        for (k, (name, i)) in d.entries().iter().enumerate().skip(from) {
            let Some(c) = v.get(*i) else { continue };
            if reply.add(
                INodeNo(*i),
                (k + 3) as u64,
                file_type(c.attr.kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.run(|fs| Ok(fs.statfs())) {
            Ok(s) => {
                let blocks = s.tracks * s.track_size / 4096;
                reply.statfs(blocks, 0, 0, 0, 0, 4096, 255, 4096);
            }
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 == VIEW_ROOT
            && name.as_bytes() == SOURCE_XATTR.as_bytes()
            && let Some(line) = self.src.describe()
        {
            return reply_xattr(reply, size, Ok(line.into_bytes()), "getxattr");
        }
        let v = match self.view() {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let r = match v.get(ino.0) {
            Some(n) => n
                .xattr(name.as_bytes())
                .map(<[u8]>::to_vec)
                .ok_or(crate::Error::NoData),
            None => Err(crate::Error::NotFound("copy-mount inode".into())),
        };
        reply_xattr(reply, size, r, "getxattr");
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let v = match self.view() {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let r = match v.get(ino.0) {
            Some(n) => Ok(n.xattr_names()),
            None => Err(crate::Error::NotFound("copy-mount inode".into())),
        };
        reply_xattr(reply, size, r, "listxattr");
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.bits() & libc::W_OK != 0 {
            reply.error(erofs());
            return;
        }
        match self.with(ino, |_| Ok(())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
