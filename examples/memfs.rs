//! The floor under any FUSE file system on this machine: a trivial in-memory file
//! system mounted the way pairfs mounts its volume (same fuser version and session
//! configuration: worker threads, `clone_fd`, `default_permissions`, pairfs' own
//! data-path init `pairfs::fuse::main_fs::data_path_init`, a 10 s TTL) that does no
//! work beyond a hash-map update per request — no storage, no durability, no metadata
//! store. `bench/run.sh` runs the same metadata and sequential-write work on it, so
//! each pairfs figure can be set against what FUSE itself allows here (issue 10: "show where the floor is").
//!
//! ```sh
//! cargo run --release --example memfs -- MOUNTPOINT [THREADS]   # until unmounted
//! ```

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite,
    Request, SessionACL, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(10);

struct Node {
    attr: FileAttr,
    data: Vec<u8>,
    entries: BTreeMap<Vec<u8>, u64>,
}

struct State {
    nodes: HashMap<u64, Node>,
    next: u64,
}

struct MemFs(Mutex<State>);

fn attr(ino: u64, kind: FileType, perm: u16, req: &Request) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: req.uid(),
        gid: req.gid(),
        rdev: 0,
        blksize: 65536,
        flags: 0,
    }
}

impl MemFs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: FileType,
        perm: u16,
    ) -> Result<FileAttr, Errno> {
        let mut st = self.state();
        let ino = st.next;
        let p = st.nodes.get_mut(&parent.0).ok_or(Errno::ENOENT)?;
        if p.entries.contains_key(name.as_bytes()) {
            return Err(Errno::EEXIST);
        }
        p.entries.insert(name.as_bytes().to_vec(), ino);
        let a = attr(ino, kind, perm, req);
        st.next += 1;
        st.nodes.insert(
            ino,
            Node {
                attr: a,
                data: Vec::new(),
                entries: BTreeMap::new(),
            },
        );
        Ok(a)
    }
}

impl Filesystem for MemFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // pairfs' own data-path settings, so the floor is mounted as pairfs is.
        pairfs::fuse::main_fs::data_path_init(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let st = self.state();
        match st
            .nodes
            .get(&parent.0)
            .and_then(|p| p.entries.get(name.as_bytes()))
            .and_then(|i| st.nodes.get(i))
        {
            Some(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().nodes.get(&ino.0) {
            Some(n) => reply.attr(&TTL, &n.attr),
            None => reply.error(Errno::ENOENT),
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
        let mut st = self.state();
        let Some(n) = st.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let t = |x: TimeOrNow| match x {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => SystemTime::now(),
        };
        if let Some(m) = mode {
            n.attr.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            n.attr.uid = u;
        }
        if let Some(g) = gid {
            n.attr.gid = g;
        }
        if let Some(s) = size {
            n.data.resize(s as usize, 0);
            n.attr.size = s;
        }
        if let Some(a) = atime {
            n.attr.atime = t(a);
        }
        if let Some(m) = mtime {
            n.attr.mtime = t(m);
        }
        n.attr.ctime = SystemTime::now();
        reply.attr(&TTL, &n.attr);
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
        let perm = (mode & !umask & 0o7777) as u16;
        match self.make(req, parent, name, FileType::Directory, perm) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        match self.make(req, parent, name, FileType::RegularFile, perm) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.state();
        let ino = st
            .nodes
            .get_mut(&parent.0)
            .and_then(|p| p.entries.remove(name.as_bytes()));
        match ino {
            Some(i) => {
                st.nodes.remove(&i);
                reply.ok()
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink(req, parent, name, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        let Some(ino) = st
            .nodes
            .get_mut(&parent.0)
            .and_then(|p| p.entries.remove(name.as_bytes()))
        else {
            return reply.error(Errno::ENOENT);
        };
        let old = st
            .nodes
            .get_mut(&newparent.0)
            .and_then(|p| p.entries.insert(newname.as_bytes().to_vec(), ino));
        if let Some(o) = old {
            st.nodes.remove(&o);
        }
        reply.ok()
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty())
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
        let st = self.state();
        let Some(n) = st.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let start = (offset as usize).min(n.data.len());
        let end = (start + size as usize).min(n.data.len());
        reply.data(&n.data[start..end])
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
        let mut st = self.state();
        let Some(n) = st.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let end = offset as usize + data.len();
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        n.attr.size = n.data.len() as u64;
        n.attr.mtime = SystemTime::now();
        reply.written(data.len() as u32)
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // As pairfs: no FLUSH wanted (the kernel stops sending it).
        reply.error(Errno::ENOSYS)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty())
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.state();
        let Some(n) = st.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (name, child)) in n.entries.iter().enumerate().skip(offset as usize) {
            let kind = st
                .nodes
                .get(child)
                .map_or(FileType::RegularFile, |c| c.attr.kind);
            if reply.add(INodeNo(*child), i as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let st = self.state();
        let Some(n) = st.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (name, child)) in n.entries.iter().enumerate().skip(offset as usize) {
            let Some(c) = st.nodes.get(child) else {
                continue;
            };
            let name = OsStr::from_bytes(name);
            if reply.add(
                INodeNo(*child),
                i as u64 + 1,
                name,
                &TTL,
                &c.attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(mnt) = args.get(1) else {
        eprintln!("usage: memfs MOUNTPOINT [THREADS]");
        std::process::exit(2);
    };
    let threads = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(4);
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName("memfs".into()),
        MountOption::Subtype("memfs".into()),
        MountOption::DefaultPermissions,
    ];
    c.acl = SessionACL::All;
    c.n_threads = Some(threads);
    c.clone_fd = true;
    let req_root = FileAttr {
        ino: INodeNo(1),
        size: 0,
        blocks: 0,
        atime: SystemTime::now(),
        mtime: SystemTime::now(),
        ctime: SystemTime::now(),
        crtime: SystemTime::now(),
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 65536,
        flags: 0,
    };
    let mut nodes = HashMap::new();
    nodes.insert(
        1,
        Node {
            attr: req_root,
            data: Vec::new(),
            entries: BTreeMap::new(),
        },
    );
    let fs = MemFs(Mutex::new(State { nodes, next: 2 }));
    if let Err(e) = fuser::mount(fs, mnt, &c) {
        eprintln!("memfs: mount {mnt}: {e}");
        std::process::exit(1);
    }
}
