//! The floor under pairfs' data path on this machine: a trivial passthrough FUSE file
//! system serving one file, `data`, whose bytes are those of one backing file on the
//! host, mounted the way pairfs mounts its volume (same fuser version and session
//! settings: worker threads, `clone_fd`, `default_permissions`, pairfs' data-path init
//! `pairfs::fuse::main_fs::data_path_init`, `FOPEN_DIRECT_IO |
//! FOPEN_PARALLEL_DIRECT_WRITES` for O_DIRECT opens). A read is one `pread` of the
//! backing file into a per-thread buffer and the reply; a write is one `pwrite`. No
//! extents, no locks, no metadata. `bench/run.sh` (section rand) runs the same 4 KiB
//! O_DIRECT random reads on it as on pairfs and a native directory, so pairfs' figure
//! can be set against what a FUSE file system reading a file of the same disk reaches
//! here (issue 10: "show where the floor is").
//!
//! With `--odirect`, reads of files opened with O_DIRECT use a second descriptor of the
//! backing file opened with O_DIRECT (aligned buffer; unaligned requests use the
//! buffered one): the host page cache is skipped, as a native O_DIRECT read skips it.
//!
//! ```sh
//! cargo run --release --example passthrough_floor -- BACKING MOUNTPOINT [THREADS] [--odirect]
//! ```

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL, WriteFlags,
};

const TTL: Duration = Duration::from_secs(10);
const FILE_INO: u64 = 2;
/// Alignment of O_DIRECT buffers, offsets and lengths (the logical block size of any
/// disk here divides it).
const ALIGN: usize = 4096;

struct Floor {
    file: File,
    direct: Option<File>,
}

/// A heap buffer aligned to [`ALIGN`], grown as needed, one per worker thread.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

impl AlignedBuf {
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.cap < len {
            let cap = len.next_multiple_of(ALIGN);
            let layout = std::alloc::Layout::from_size_align(cap, ALIGN).expect("layout");
            if !self.ptr.is_null() {
                let old = std::alloc::Layout::from_size_align(self.cap, ALIGN).expect("layout");
                // SAFETY: allocated with `old` below.
                unsafe { std::alloc::dealloc(self.ptr, old) };
            }
            // SAFETY: `layout` has a non-zero size.
            self.ptr = unsafe { std::alloc::alloc(layout) };
            assert!(!self.ptr.is_null(), "out of memory");
            self.cap = cap;
        }
        // SAFETY: `ptr` points to `cap >= len` bytes owned by this buffer; stale bytes are
        // only read back after a read filled them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

thread_local! {
    static BUF: RefCell<AlignedBuf> = const {
        RefCell::new(AlignedBuf { ptr: std::ptr::null_mut(), cap: 0 })
    };
}

impl Floor {
    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let (kind, perm, size, nlink) = match ino {
            1 => (FileType::Directory, 0o755, 0, 2),
            FILE_INO => {
                let m = self.file.metadata().map_err(Errno::from)?;
                (FileType::RegularFile, 0o644, m.size(), 1)
            }
            _ => return Err(Errno::ENOENT),
        };
        let t = UNIX_EPOCH + Duration::from_secs(1);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 65536,
            flags: 0,
        })
    }
}

impl Filesystem for Floor {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        pairfs::fuse::main_fs::data_path_init(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != 1 || name != "data" {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(FILE_INO) {
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

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // As pairfs answers an O_DIRECT open (`main_fs::direct_open_flags`); the handle
        // says whether the open was O_DIRECT.
        if flags.0 & libc::O_DIRECT != 0 {
            reply.opened(
                FileHandle(1),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            )
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty())
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let aligned = offset.is_multiple_of(ALIGN as u64) && size.is_multiple_of(ALIGN as u32);
        let fd = match &self.direct {
            Some(d) if fh.0 == 1 && aligned => d,
            _ => &self.file,
        };
        BUF.with_borrow_mut(|b| {
            let buf = b.get(size as usize);
            let mut n = 0;
            while n < buf.len() {
                match fd.read_at(&mut buf[n..], offset + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(Errno::from(e)),
                }
            }
            reply.data(&buf[..n])
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.file.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(Errno::from(e)),
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
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = if datasync {
            self.file.sync_data()
        } else {
            self.file.sync_all()
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty())
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        if offset == 0 {
            match self.attr(FILE_INO) {
                Ok(a) => {
                    let _ = reply.add(INodeNo(FILE_INO), 1, "data", &TTL, &a, Generation(0));
                }
                Err(e) => return reply.error(e),
            }
        }
        reply.ok()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let direct = args.iter().any(|a| a == "--odirect");
    let pos: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with("--")).collect();
    let (Some(backing), Some(mnt)) = (pos.first(), pos.get(1)) else {
        eprintln!("usage: passthrough_floor BACKING MOUNTPOINT [THREADS] [--odirect]");
        std::process::exit(2);
    };
    let threads = pos.get(2).and_then(|t| t.parse().ok()).unwrap_or(4);
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(backing)
    };
    let (file, direct) = match (open(0), direct.then(|| open(libc::O_DIRECT)).transpose()) {
        (Ok(f), Ok(d)) => (f, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("passthrough_floor: open {backing}: {e}");
            std::process::exit(1);
        }
    };
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName("passthrough_floor".into()),
        MountOption::Subtype("passthrough_floor".into()),
        MountOption::DefaultPermissions,
    ];
    c.acl = SessionACL::All;
    c.n_threads = Some(threads);
    c.clone_fd = true;
    if let Err(e) = fuser::mount(Floor { file, direct }, mnt, &c) {
        eprintln!("passthrough_floor: mount {mnt}: {e}");
        std::process::exit(1);
    }
}
