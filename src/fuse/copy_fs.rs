//! FUSE adapter of the copy mount: a read-only tree of every frozen copy, each object
//! at its split-time path with its split-time attributes. Directories that are not
//! themselves frozen (the parents of a frozen file) are synthesized, mode 0555.
//!
//! The tree is rebuilt whenever the set of frozen copies changes (split, update,
//! resync, release, error); inode numbers stay stable per path.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::core::fs::Fs;
use crate::fuse::main_fs::systime;
use crate::snap::pair::{Frozen, FrozenKind, PairId};

const TTL: Duration = Duration::ZERO;

#[derive(Debug, Clone)]
enum Node {
    Dir(BTreeMap<Vec<u8>, u64>),
    File(PairId, usize, u64),
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Entry {
    node: Node,
    attr: FileAttr,
    parent: u64,
}

#[derive(Default)]
struct Tree {
    stamp: Vec<(PairId, i64, usize)>,
    nodes: HashMap<u64, Entry>,
    inos: HashMap<String, u64>,
    next: u64,
}

/// The copy mount.
pub struct CopyFs {
    fs: Arc<Fs>,
    tree: Mutex<Tree>,
}

fn dir_attr(ino: u64, t: i64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 4096,
        blocks: 8,
        atime: systime(t),
        mtime: systime(t),
        ctime: systime(t),
        crtime: systime(t),
        kind: FileType::Directory,
        perm: 0o555,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 65536,
        flags: 0,
    }
}

impl CopyFs {
    /// Serves the frozen copies of `fs`.
    pub fn new(fs: Arc<Fs>) -> Self {
        CopyFs {
            fs,
            tree: Mutex::new(Tree {
                next: 2,
                ..Tree::default()
            }),
        }
    }

    fn with_tree<T>(&self, f: impl FnOnce(&Tree) -> T) -> T {
        let objs = self.fs.engine.frozen_objects();
        let mut stamp: Vec<(PairId, i64, usize)> = Vec::new();
        for (id, _, fz) in &objs {
            if stamp.last().is_none_or(|s| s.0 != *id) {
                stamp.push((*id, fz.attr.ctime, 0));
            }
            stamp.last_mut().expect("pushed").2 += 1;
        }
        let splits: Vec<(PairId, i64)> = self
            .fs
            .engine
            .all_status(&self.fs)
            .iter()
            .map(|s| (s.id, s.split_ns))
            .collect();
        for s in stamp.iter_mut() {
            s.1 = splits.iter().find(|x| x.0 == s.0).map_or(0, |x| x.1);
        }
        let mut t = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        if t.nodes.is_empty() || t.stamp != stamp {
            Self::rebuild(&mut t, &objs, self.fs.ts);
            t.stamp = stamp;
        }
        f(&t)
    }

    fn rebuild(t: &mut Tree, objs: &[(PairId, usize, Frozen)], ts: u64) {
        t.nodes.clear();
        let newest = objs.iter().map(|o| o.2.attr.ctime).max().unwrap_or(0);
        t.nodes.insert(
            1,
            Entry {
                node: Node::Dir(BTreeMap::new()),
                attr: dir_attr(1, newest),
                parent: 1,
            },
        );
        for (id, idx, f) in objs {
            let parts: Vec<&str> = f.path.split('/').filter(|p| !p.is_empty()).collect();
            let mut cur = 1u64;
            let mut path = String::new();
            for (k, part) in parts.iter().enumerate() {
                path.push('/');
                path.push_str(part);
                let last = k + 1 == parts.len();
                let ino = match t.inos.get(&path) {
                    Some(&i) => i,
                    None => {
                        let i = t.next;
                        t.next += 1;
                        t.inos.insert(path.clone(), i);
                        i
                    }
                };
                if let std::collections::hash_map::Entry::Vacant(v) = t.nodes.entry(ino) {
                    v.insert(Entry {
                        node: Node::Dir(BTreeMap::new()),
                        attr: dir_attr(ino, f.attr.ctime),
                        parent: cur,
                    });
                    if let Some(Entry {
                        node: Node::Dir(ch),
                        ..
                    }) = t.nodes.get_mut(&cur)
                    {
                        ch.insert(part.as_bytes().to_vec(), ino);
                    }
                }
                if last {
                    let e = t.nodes.get_mut(&ino).expect("inserted");
                    let a = &f.attr;
                    e.attr = FileAttr {
                        ino: INodeNo(ino),
                        size: a.size,
                        blocks: f.extents.tracks() * ts / 512,
                        atime: systime(a.atime),
                        mtime: systime(a.mtime),
                        ctime: systime(a.ctime),
                        crtime: systime(a.ctime),
                        kind: match a.kind {
                            FrozenKind::File => FileType::RegularFile,
                            FrozenKind::Dir => FileType::Directory,
                            FrozenKind::Symlink => FileType::Symlink,
                        },
                        perm: a.perm as u16,
                        nlink: if a.kind == FrozenKind::Dir { 2 } else { 1 },
                        uid: a.uid,
                        gid: a.gid,
                        rdev: 0,
                        blksize: 65536,
                        flags: 0,
                    };
                    match a.kind {
                        FrozenKind::File => e.node = Node::File(*id, *idx, f.ino),
                        FrozenKind::Symlink => e.node = Node::Symlink(f.target.clone()),
                        FrozenKind::Dir => {}
                    }
                }
                cur = ino;
            }
        }
    }

    fn get(&self, ino: u64) -> Option<Entry> {
        self.with_tree(|t| t.nodes.get(&ino).cloned())
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
        let r = self.with_tree(|t| match t.nodes.get(&parent.0).map(|e| &e.node) {
            Some(Node::Dir(ch)) => ch
                .get(name.as_bytes())
                .and_then(|i| t.nodes.get(i))
                .map(|e| e.attr),
            _ => None,
        });
        match r {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.get(ino.0) {
            Some(e) => reply.attr(&TTL, &e.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.get(ino.0).map(|e| e.node) {
            Some(Node::Symlink(t)) => reply.data(&t),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(erofs());
            return;
        }
        match self.get(ino.0).map(|e| e.node) {
            Some(Node::File(..)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
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
        match self.get(ino.0).map(|e| e.node) {
            Some(Node::File(id, idx, fino)) => {
                match self
                    .fs
                    .engine
                    .read_frozen_of(&self.fs, (id, idx, Some(fino)), offset, size)
                {
                    Ok(d) => reply.data(&d),
                    Err(e) => {
                        log::warn!("copy mount read: {e}");
                        reply.error(Errno::from_i32(e.errno()))
                    }
                }
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
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
        match self.get(ino.0).map(|e| e.node) {
            Some(Node::Dir(_)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
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
        let entries = self.with_tree(|t| {
            let e = t.nodes.get(&ino.0)?;
            let Node::Dir(ch) = &e.node else { return None };
            let mut v = vec![
                (ino.0, FileType::Directory, b".".to_vec()),
                (e.parent, FileType::Directory, b"..".to_vec()),
            ];
            for (n, i) in ch {
                if let Some(c) = t.nodes.get(i) {
                    v.push((*i, c.attr.kind, n.clone()));
                }
            }
            Some(v)
        });
        let Some(entries) = entries else {
            reply.error(Errno::ENOTDIR);
            return;
        };
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), (k + 1) as u64, kind, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        let blocks = s.tracks * s.track_size / 4096;
        reply.statfs(blocks, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.bits() & libc::W_OK != 0 {
            reply.error(erofs());
            return;
        }
        match self.get(ino.0) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}
