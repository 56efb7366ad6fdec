//! The block store under pairfs: a tiny [`Volume`] trait and its implementations.
//!
//! ```text
//!            +------------------+
//!  core ---> |  dyn Volume      |  read_at / write_at / discard / sync / len
//!            +------------------+
//!              |        |      \
//!        FileVolume  MemVolume  FaultVolume<V>   (image file | tests | injected EIO)
//!              \________|______/
//!                 Checked<V>: a failed write or sync poisons the handle
//! ```
//!
//! The volume image and the copy image are both `Volume`s. The core never touches a
//! `std::fs::File` directly, so tests run against memory or fault-injecting volumes and
//! a later network block device only needs one more implementation.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A fixed-size array of bytes with durable sync.
pub trait Volume: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `off`; bytes never written read as zero.
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes all of `buf` at `off`.
    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()>;
    /// Makes `[off, off+len)` read as zero and releases its space where possible.
    fn discard(&self, off: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> Result<()>;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True for a zero-sized volume.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes actually allocated on the backing store (for statistics), if known.
    fn allocated(&self) -> Option<u64> {
        None
    }
    /// The next range `[start, end)` at or after `off` that may hold data; None if all
    /// the rest reads as zeros (a replica's full sync skips holes). Default: all of it.
    fn data_after(&self, off: u64) -> Option<(u64, u64)> {
        (off < self.len()).then(|| (off, self.len()))
    }
}

/// A volume in an image file (sparse regular file or block device).
#[derive(Debug)]
pub struct FileVolume {
    file: File,
    len: u64,
    what: &'static str,
}

impl FileVolume {
    /// Opens an existing image. `what` names it in errors ("volume", "copy image").
    pub fn open(path: &Path, writable: bool, what: &'static str) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(what, e))?;
        let len = file.metadata().map_err(|e| Error::io(what, e))?.len();
        Ok(FileVolume { file, len, what })
    }

    /// Creates a sparse image of `len` bytes; fails if it exists.
    pub fn create(path: &Path, len: u64, what: &'static str) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(what, e))?;
        file.set_len(len).map_err(|e| Error::io(what, e))?;
        Ok(FileVolume { file, len, what })
    }

    /// The open file (for locking).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Volume for FileVolume {
    fn data_after(&self, off: u64) -> Option<(u64, u64)> {
        if off >= self.len {
            return None;
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a valid fd with plain integer arguments.
        let start = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                None
            } else {
                Some((off, self.len))
            };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        let end = if end < 0 {
            self.len
        } else {
            (end as u64).min(self.len)
        };
        ((start as u64) < self.len).then_some((start as u64, end))
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.what, off, buf.len() as u64, self.len)?;
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| Error::io(self.what, e))
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        check_range(self.what, off, buf.len() as u64, self.len)?;
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io(self.what, e))
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        check_range(self.what, off, len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // Block devices without discard: write zeros instead.
            let zeros = vec![0u8; (len.min(1 << 20)) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.write_at(off + done, &zeros[..n])?;
                done += n as u64;
            }
            return Ok(());
        }
        Err(Error::io(self.what, err))
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(self.what, e))
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn allocated(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
}

fn check_range(what: &'static str, off: u64, len: u64, size: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::io(
            what,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("access [{off}, +{len}) beyond the end ({size})"),
            ),
        )),
    }
}

/// An in-memory volume for tests. It also remembers what was synced, so crash tests
/// can ask for the durable image ([`MemVolume::durable_image`]).
#[derive(Debug)]
pub struct MemVolume {
    live: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
}

impl MemVolume {
    /// A zeroed volume of `len` bytes.
    pub fn new(len: usize) -> Self {
        MemVolume {
            live: Mutex::new(vec![0; len]),
            durable: Mutex::new(vec![0; len]),
        }
    }

    /// The bytes as of the last `sync` (what survives a power loss).
    pub fn durable_image(&self) -> Vec<u8> {
        self.durable.lock().unwrap().clone()
    }

    /// The bytes as written so far.
    pub fn live_image(&self) -> Vec<u8> {
        self.live.lock().unwrap().clone()
    }
}

impl Volume for MemVolume {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let live = self.live.lock().unwrap();
        check_range("memory volume", off, buf.len() as u64, live.len() as u64)?;
        buf.copy_from_slice(&live[off as usize..off as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        let mut live = self.live.lock().unwrap();
        check_range("memory volume", off, buf.len() as u64, live.len() as u64)?;
        live[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        let mut live = self.live.lock().unwrap();
        check_range("memory volume", off, len, live.len() as u64)?;
        live[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let live = self.live.lock().unwrap();
        self.durable.lock().unwrap().copy_from_slice(&live);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.live.lock().unwrap().len() as u64
    }
}

impl<V: Volume + ?Sized> Volume for std::sync::Arc<V> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        (**self).write_at(off, buf)
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        (**self).discard(off, len)
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn allocated(&self) -> Option<u64> {
        (**self).allocated()
    }
}

/// A volume for power-loss tests: it keeps the bytes as of the last `sync` and the
/// log of writes since, and builds crash images in which an arbitrary subset of the
/// unsynced writes reached the medium, in any order ([`CrashVolume::crash_image`]).
#[derive(Debug)]
pub struct CrashVolume {
    inner: Mutex<CrashInner>,
}

#[derive(Debug)]
struct CrashInner {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

impl CrashVolume {
    /// A zeroed volume, or one starting from `image`.
    pub fn new(image: Vec<u8>) -> Self {
        CrashVolume {
            inner: Mutex::new(CrashInner {
                durable: image.clone(),
                live: image,
                pending: Vec::new(),
            }),
        }
    }

    /// Number of writes not yet synced.
    pub fn unsynced(&self) -> usize {
        self.inner.lock().unwrap().pending.len()
    }

    /// The image after a power loss now: the synced bytes plus the unsynced writes for
    /// which `keep(i)` is true, applied in the order of `order` (a permutation of the
    /// kept indices is allowed: a disk may reorder unsynced writes).
    pub fn crash_image(&self, keep: &mut dyn FnMut(usize) -> bool, reverse: bool) -> Vec<u8> {
        let g = self.inner.lock().unwrap();
        let mut img = g.durable.clone();
        let mut idx: Vec<usize> = (0..g.pending.len()).filter(|&i| keep(i)).collect();
        if reverse {
            idx.reverse();
        }
        for i in idx {
            let (off, data) = &g.pending[i];
            img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        img
    }

    /// The current (live) bytes.
    pub fn live_image(&self) -> Vec<u8> {
        self.inner.lock().unwrap().live.clone()
    }
}

impl Volume for CrashVolume {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let g = self.inner.lock().unwrap();
        check_range("crash volume", off, buf.len() as u64, g.live.len() as u64)?;
        buf.copy_from_slice(&g.live[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        let mut g = self.inner.lock().unwrap();
        check_range("crash volume", off, buf.len() as u64, g.live.len() as u64)?;
        g.live[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        g.pending.push((off, buf.to_vec()));
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.write_at(off, &vec![0u8; len as usize])
    }
    fn sync(&self) -> Result<()> {
        let mut g = self.inner.lock().unwrap();
        let live = g.live.clone();
        g.durable = live;
        g.pending.clear();
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.lock().unwrap().live.len() as u64
    }
}

/// Which calls a [`FaultVolume`] fails.
#[derive(Debug, Default, Clone, Copy)]
pub struct Faults {
    /// Fail reads with EIO.
    pub read: bool,
    /// Fail writes with EIO.
    pub write: bool,
    /// Fail syncs with EIO.
    pub sync: bool,
    /// Fail writes with ENOSPC instead (a full backing store).
    pub full: bool,
}

/// Wraps a volume and fails the selected calls with `EIO` until the faults are cleared.
pub struct FaultVolume<V: Volume> {
    inner: V,
    faults: Mutex<Faults>,
    injected: AtomicU64,
}

impl<V: Volume> FaultVolume<V> {
    /// Wraps `inner` with no faults armed.
    pub fn new(inner: V) -> Self {
        FaultVolume {
            inner,
            faults: Mutex::new(Faults::default()),
            injected: AtomicU64::new(0),
        }
    }

    /// Arms (or clears) faults.
    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap() = f;
    }

    /// How many calls failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The wrapped volume.
    pub fn inner(&self) -> &V {
        &self.inner
    }

    fn fail(&self) -> Error {
        self.injected.fetch_add(1, Ordering::Relaxed);
        Error::io("volume", std::io::Error::from_raw_os_error(libc::EIO))
    }
}

impl<V: Volume> Volume for FaultVolume<V> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if self.faults.lock().unwrap().read {
            return Err(self.fail());
        }
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        let f = *self.faults.lock().unwrap();
        if f.full {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(Error::io(
                "volume",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        if f.write {
            return Err(self.fail());
        }
        self.inner.write_at(off, buf)
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        if self.faults.lock().unwrap().write {
            return Err(self.fail());
        }
        self.inner.discard(off, len)
    }
    fn sync(&self) -> Result<()> {
        if self.faults.lock().unwrap().sync {
            return Err(self.fail());
        }
        self.inner.sync()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

/// Poisons the handle after a failed write, discard or sync: a write that failed may
/// have left any part of its range changed, and a failed fsync may have dropped dirty
/// pages, so nothing written afterwards can be trusted to be durable. Every later call
/// fails with [`Error::Poisoned`] until the volume is reopened (remount).
///
/// `sync` returns Ok only if an fsync that *began after the caller's writes completed*
/// succeeded: completed writes are counted (`written`), each successful fsync records
/// the count it started from (`durable`), and fsyncs run one at a time under
/// `sync_lock`. A caller that arrives while another fsync runs waits for it, then
/// returns Ok without an fsync of its own only if that one covered its writes and
/// succeeded; if it failed, the handle is poisoned and the caller fails too.
pub struct Checked {
    inner: Box<dyn Volume>,
    poisoned: AtomicBool,
    /// Writes and discards completed (a generation number).
    written: AtomicU64,
    /// `written` as of the start of the last successful fsync. Only changed under
    /// `sync_lock`.
    durable: AtomicU64,
    sync_lock: Mutex<()>,
    what: &'static str,
}

impl Checked {
    /// Wraps a volume.
    pub fn new(inner: Box<dyn Volume>, what: &'static str) -> Self {
        Checked {
            inner,
            poisoned: AtomicBool::new(false),
            // Writes made before the handle was opened are not known durable.
            written: AtomicU64::new(1),
            durable: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            what,
        }
    }

    /// True once a write or sync failed.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Clears the poison (used after an operator-driven recovery, e.g. resync).
    pub fn clear_poison(&self) {
        self.poisoned.store(false, Ordering::Release)
    }

    fn guard(&self) -> Result<()> {
        if self.is_poisoned() {
            Err(Error::Poisoned(self.what))
        } else {
            Ok(())
        }
    }

    fn poison_on_err<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            // ENOSPC on a write is a clean refusal of that write: do not poison.
            if e.errno() != libc::ENOSPC {
                log::error!("{}: {e}; refusing further writes until remount", self.what);
                self.poisoned.store(true, Ordering::Release);
            }
        }
        r
    }
}

impl Volume for Checked {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.guard()?;
        let r = self.inner.write_at(off, buf);
        // Counted after the write landed: only an fsync that starts after this point
        // covers it. (Counting before would let a concurrent fsync that started while
        // the write was in flight count as covering it.)
        self.written.fetch_add(1, Ordering::AcqRel);
        self.poison_on_err(r)
    }
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.guard()?;
        let r = self.inner.discard(off, len);
        self.written.fetch_add(1, Ordering::AcqRel);
        self.poison_on_err(r)
    }
    fn sync(&self) -> Result<()> {
        self.guard()?;
        // Every write this caller completed is counted in `want`.
        let want = self.written.load(Ordering::Acquire);
        let _s = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        // An fsync that ran while we waited may have failed.
        self.guard()?;
        // A successful fsync began after our writes (a split or a metadata-only commit
        // then costs no fsync of the image).
        if self.durable.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let start = self.written.load(Ordering::Acquire);
        let r = self.inner.sync();
        if r.is_ok() {
            self.durable.store(start, Ordering::Release);
        }
        self.poison_on_err(r)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn allocated(&self) -> Option<u64> {
        self.inner.allocated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_volume_tracks_durable_bytes() {
        let v = MemVolume::new(8192);
        v.write_at(10, b"abc").unwrap();
        assert_eq!(&v.durable_image()[10..13], &[0, 0, 0]);
        v.sync().unwrap();
        assert_eq!(&v.durable_image()[10..13], b"abc");
        let mut b = [0u8; 3];
        assert!(v.read_at(8190, &mut b).is_err());
    }

    #[test]
    fn failed_sync_poisons_later_writes() {
        let fv = std::sync::Arc::new(FaultVolume::new(MemVolume::new(4096)));
        struct Shared(std::sync::Arc<FaultVolume<MemVolume>>);
        impl Volume for Shared {
            fn read_at(&self, o: u64, b: &mut [u8]) -> Result<()> {
                self.0.read_at(o, b)
            }
            fn write_at(&self, o: u64, b: &[u8]) -> Result<()> {
                self.0.write_at(o, b)
            }
            fn discard(&self, o: u64, l: u64) -> Result<()> {
                self.0.discard(o, l)
            }
            fn sync(&self) -> Result<()> {
                self.0.sync()
            }
            fn len(&self) -> u64 {
                self.0.len()
            }
        }
        let c = Checked::new(Box::new(Shared(fv.clone())), "volume");
        c.write_at(0, b"x").unwrap();
        fv.set_faults(Faults {
            sync: true,
            ..Faults::default()
        });
        assert_eq!(c.sync().unwrap_err().errno(), libc::EIO);
        fv.set_faults(Faults::default());
        // The fault is gone, but the handle stays poisoned.
        assert!(matches!(c.write_at(0, b"y"), Err(Error::Poisoned(_))));
        assert!(matches!(c.sync(), Err(Error::Poisoned(_))));
        assert_eq!(fv.injected(), 1);
    }

    struct Counting(MemVolume, AtomicU64);
    impl Volume for Counting {
        fn read_at(&self, o: u64, b: &mut [u8]) -> Result<()> {
            self.0.read_at(o, b)
        }
        fn write_at(&self, o: u64, b: &[u8]) -> Result<()> {
            self.0.write_at(o, b)
        }
        fn discard(&self, o: u64, l: u64) -> Result<()> {
            self.0.discard(o, l)
        }
        fn sync(&self) -> Result<()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.sync()
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
    }

    #[test]
    fn a_sync_with_no_write_since_the_last_fsync_began_costs_no_fsync() {
        let v = std::sync::Arc::new(Counting(MemVolume::new(4096), AtomicU64::new(0)));
        let c = Checked::new(Box::new(v.clone()), "volume");
        c.sync().unwrap();
        assert_eq!(
            v.1.load(Ordering::SeqCst),
            1,
            "writes before open are not known durable"
        );
        c.sync().unwrap();
        assert_eq!(v.1.load(Ordering::SeqCst), 1);
        c.write_at(0, b"x").unwrap();
        c.sync().unwrap();
        c.sync().unwrap();
        assert_eq!(v.1.load(Ordering::SeqCst), 2);
        assert_eq!(&v.0.durable_image()[..1], b"x");
    }

    #[test]
    fn file_volume_discard_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let v = FileVolume::create(&p, 1 << 20, "volume").unwrap();
        v.write_at(65536, &[7u8; 65536]).unwrap();
        v.discard(65536, 65536).unwrap();
        let mut b = vec![1u8; 65536];
        v.read_at(65536, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
}
