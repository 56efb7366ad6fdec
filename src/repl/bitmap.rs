//! The primary's persistent out-of-sync bitmap (`META.repl-bitmap`, beside the metadata
//! database): which blocks may differ between the primary's images and what its
//! secondary holds durably, so a primary that stops or crashes while out of sync (or
//! with writes in flight) resyncs those blocks at its next mount instead of everything.
//!
//! Two levels, as DRBD's bitmap and activity log:
//!
//! - the **fine bitmap**, one bit per out-of-sync unit (the link's 4 KiB blocks) per
//!   image: the blocks whose records were dropped (`continue` mode past the buffer) or
//!   are being resynced, written by a checkpoint (every second while something changed,
//!   and at unmount);
//! - the **activity log** (AL), one bit per 4 MiB region per image: a region is marked
//!   durably *before* the first write into it can reach the image ([`Bitmap::begin`]
//!   waits for the fsync; a region already marked costs nothing), and stays marked while
//!   any write into it is in flight, any record of it is unacked, acked but not yet
//!   durable on the primary's own image (a later local sync), or the region was written
//!   since the previous checkpoint (hot regions stay marked: steady writers pay nothing).
//!   A new region right after a marked one (a sequential writer) is marked with the
//!   7 after it in the same fsync.
//!
//! So after any crash every block that may differ is under a fine bit or a marked
//! region. A checkpoint changes the file in this order, one fsync each: (1) the fine
//! bits, (2) the AL, (3) the header if its stream or floor changed. Each step alone
//! keeps the invariant: the new fine bits with the old AL cover (the old AL is a
//! superset of the new one, and every block needing a mark needs it in the new fine
//! bits or in a region of the new AL); the new AL is written only once the new fine
//! bits are durable. A new stream id is written last, after the bits that are true
//! for it; stream 0 means "trust nothing" (a full sync next time).
//!
//! Layout: a 4 KiB header (`PAIRFSB1`, volume UUID, size, unit, region size, stream,
//! floor, crc32c), then the fine bitmaps of the volume and copy images, then their
//! ALs, each a run of little-endian u64 words padded to 4 KiB pages. Only the pages
//! that changed are written. The file is trusted only if its header matches the volume
//! and its checksum; any read-write open of the volume without `--replica`, and
//! `fsck --repair`, delete it (they change the volume behind the link).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PAIRFSB1";
const PAGE: u64 = 4096;
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
/// Bytes of an AL region (or the unit, if larger).
pub const REGION: u64 = 4 << 20;
/// Regions marked ahead of a sequential writer (one fsync for 1 + this many).
const AHEAD: u64 = 7;

/// The sidecar file's path for the metadata database `meta`.
pub fn path(meta: &Path) -> PathBuf {
    crate::core::volfile::repl_bitmap_path(meta)
}

/// What the file said at mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The stream the marks are relative to (never 0 here).
    pub stream: u64,
    /// The secondary had acked every record up to here.
    pub floor: u64,
    /// Per image: out-of-sync units, the fine bits with every AL region expanded.
    pub units: [Vec<u64>; 2],
}

/// What a checkpoint writes (computed by the link under its lock).
#[derive(Debug, Default, Clone)]
pub struct Target {
    /// 0: nothing in the file is to be trusted.
    pub stream: u64,
    /// The last record the secondary acked.
    pub floor: u64,
    /// Per image: fine bits (units).
    pub fine: [Vec<u64>; 2],
    /// Per image: regions that must stay in the AL (records not yet acked or not yet
    /// durable locally).
    pub busy: [HashSet<u64>; 2],
}

/// What the file holds (header matched).
struct Stored {
    stream: u64,
    floor: u64,
    fine: [Vec<u64>; 2],
    al: [Vec<u64>; 2],
}

struct St {
    /// Marked regions per image: on disk, or about to be (a writer waiting for it).
    al: [Vec<u64>; 2],
    /// Generation at which a region was marked, while that mark may not be durable.
    set_generation: HashMap<(usize, u64), u64>,
    generation: u64,
    /// Writes in progress per region.
    inflight: HashMap<(usize, u64), u32>,
    /// Regions written since the last checkpoint.
    touched: HashSet<(usize, u64)>,
}

struct Disk {
    fine: [Vec<u64>; 2],
    al: [Vec<u64>; 2],
    stream: u64,
    floor: u64,
    /// A write failed and the file could not be removed: refuse writes.
    broken: Option<String>,
    /// The file is gone (after a failed write): nothing persists for this mount.
    removed: bool,
}

/// The open bitmap of a mount with `--replica`.
pub struct Bitmap {
    path: PathBuf,
    file: File,
    uuid: [u8; 16],
    size: u64,
    unit: u64,
    region: u64,
    units: u64,
    regions: u64,
    st: Mutex<St>,
    io: Mutex<Disk>,
    durable_generation: AtomicU64,
    /// fdatasyncs of the file since mount (by writers marking regions, and checkpoints).
    syncs: AtomicU64,
    /// Of those, by writers waiting for a new region's mark.
    write_syncs: AtomicU64,
}

fn words(bits: u64) -> usize {
    bits.div_ceil(64) as usize
}

fn pages_bytes(bits: u64) -> u64 {
    (words(bits) as u64 * 8).div_ceil(PAGE).max(1) * PAGE
}

fn get(v: &[u64], i: u64) -> bool {
    v.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set(v: &mut [u64], i: u64) {
    if let Some(w) = v.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

impl Bitmap {
    fn lock_st(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_io(&self) -> MutexGuard<'_, Disk> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Region size for a link unit.
    pub fn region_for(unit: u64) -> u64 {
        REGION.max(unit)
    }

    fn fine_off(&self, i: usize) -> u64 {
        PAGE + i as u64 * pages_bytes(self.units)
    }

    fn al_off(&self, i: usize) -> u64 {
        PAGE + 2 * pages_bytes(self.units) + i as u64 * pages_bytes(self.regions)
    }

    fn total(&self) -> u64 {
        self.al_off(2)
    }

    /// Opens (creating) the file for a volume; returns what it held if its header
    /// matches. The file is left as it was: the first [`Bitmap::checkpoint`]
    /// rewrites it.
    pub fn open(
        meta: &Path,
        uuid: [u8; 16],
        size: u64,
        unit: u64,
    ) -> Result<(Bitmap, Option<Loaded>)> {
        let path = path(meta);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("replica bitmap", e))?;
        let region = Bitmap::region_for(unit);
        let units = size.div_ceil(unit);
        let regions = size.div_ceil(region);
        let b = Bitmap {
            path,
            file,
            uuid,
            size,
            unit,
            region,
            units,
            regions,
            st: Mutex::new(St {
                al: [vec![0; words(regions)], vec![0; words(regions)]],
                set_generation: HashMap::new(),
                generation: 0,
                inflight: HashMap::new(),
                touched: HashSet::new(),
            }),
            io: Mutex::new(Disk {
                fine: [vec![0; words(units)], vec![0; words(units)]],
                al: [vec![0; words(regions)], vec![0; words(regions)]],
                stream: 0,
                floor: 0,
                broken: None,
                removed: false,
            }),
            durable_generation: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            write_syncs: AtomicU64::new(0),
        };
        let stored = b.load()?;
        let loaded = stored
            .as_ref()
            .filter(|st| st.stream != 0)
            .map(|st| Loaded {
                stream: st.stream,
                floor: st.floor,
                units: b.expand(st),
            });
        {
            let mut d = b.lock_io();
            match stored {
                Some(st) => {
                    d.stream = st.stream;
                    d.floor = st.floor;
                    d.fine = st.fine;
                    d.al = st.al;
                }
                None => {
                    // Unknown content: start from zeros (the header says nothing valid
                    // until a checkpoint writes it).
                    b.file
                        .set_len(0)
                        .and_then(|_| b.file.set_len(b.total()))
                        .and_then(|_| b.file.sync_all())
                        .map_err(|e| Error::io("replica bitmap", e))?;
                    crate::core::volfile::sync_parent(&b.path);
                }
            }
        }
        Ok((b, loaded))
    }

    fn header(&self, stream: u64, floor: u64) -> Vec<u8> {
        let mut h = vec![0u8; PAGE as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..24].copy_from_slice(&self.uuid);
        for (i, v) in [self.size, self.unit, self.region, stream, floor]
            .iter()
            .enumerate()
        {
            h[24 + i * 8..32 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let c = crc32c::crc32c(&h[..64]);
        h[64..68].copy_from_slice(&c.to_le_bytes());
        h
    }

    fn read_words(&self, off: u64, n: usize) -> Result<Vec<u64>> {
        let mut b = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut b, off)
            .map_err(|e| Error::io("replica bitmap", e))?;
        Ok(b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// The header's stream and floor and the stored bits, if the header matches.
    fn load(&self) -> Result<Option<Stored>> {
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io("replica bitmap", e))?
            .len();
        if len != self.total() {
            return Ok(None);
        }
        let mut h = vec![0u8; PAGE as usize];
        self.file
            .read_exact_at(&mut h, 0)
            .map_err(|e| Error::io("replica bitmap", e))?;
        let want = self.header(0, 0);
        let stored = u32::from_le_bytes([h[64], h[65], h[66], h[67]]);
        if h[..48] != want[..48] || stored != crc32c::crc32c(&h[..64]) {
            return Ok(None);
        }
        Ok(Some(Stored {
            stream: u64::from_le_bytes(h[48..56].try_into().unwrap_or([0; 8])),
            floor: u64::from_le_bytes(h[56..64].try_into().unwrap_or([0; 8])),
            fine: [
                self.read_words(self.fine_off(0), words(self.units))?,
                self.read_words(self.fine_off(1), words(self.units))?,
            ],
            al: [
                self.read_words(self.al_off(0), words(self.regions))?,
                self.read_words(self.al_off(1), words(self.regions))?,
            ],
        }))
    }

    /// The out-of-sync units a stored file says: its fine bits and every unit of its
    /// marked regions.
    fn expand(&self, st: &Stored) -> [Vec<u64>; 2] {
        let per = self.region / self.unit;
        let mut units = st.fine.clone();
        for (i, u) in units.iter_mut().enumerate() {
            for r in 0..self.regions {
                if get(&st.al[i], r) {
                    for x in r * per..((r + 1) * per).min(self.units) {
                        set(u, x);
                    }
                }
            }
        }
        units
    }

    fn regions_of(&self, off: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let first = off / self.region;
        let last = (off + len.max(1) - 1) / self.region;
        first..=last.min(self.regions.saturating_sub(1))
    }

    /// Before a write or discard of `[off, off + len)` of image `image` reaches it: its
    /// regions are marked durably (waits for an fsync if one is new) and counted in
    /// flight until [`Bitmap::end`].
    pub fn begin(&self, image: usize, off: u64, len: u64) -> Result<()> {
        let need = {
            let mut s = self.lock_st();
            let mut need = 0;
            for r in self.regions_of(off, len) {
                *s.inflight.entry((image, r)).or_insert(0) += 1;
                s.touched.insert((image, r));
                if !get(&s.al[image], r) {
                    s.generation += 1;
                    let g = s.generation;
                    // After the region before it (a sequential writer): the next ones
                    // too, in the same fsync.
                    let ahead = if r > 0 && get(&s.al[image], r - 1) {
                        AHEAD
                    } else {
                        0
                    };
                    for x in r..=(r + ahead).min(self.regions - 1) {
                        if !get(&s.al[image], x) {
                            set(&mut s.al[image], x);
                            s.set_generation.insert((image, x), g);
                        }
                    }
                }
                need = need.max(s.set_generation.get(&(image, r)).copied().unwrap_or(0));
            }
            need
        };
        if need > self.durable_generation.load(Ordering::Acquire) {
            let r = self.flush_al(need);
            if r.is_err() {
                self.end(image, off, len);
            }
            r?;
        }
        Ok(())
    }

    /// The write of [`Bitmap::begin`] returned (its record, if any, is queued).
    pub fn end(&self, image: usize, off: u64, len: u64) {
        let mut s = self.lock_st();
        for r in self.regions_of(off, len) {
            if let Some(n) = s.inflight.get_mut(&(image, r)) {
                *n -= 1;
                if *n == 0 {
                    s.inflight.remove(&(image, r));
                }
            }
        }
    }

    /// Writes the in-memory AL (a superset of the disk's) and waits for it.
    fn flush_al(&self, need: u64) -> Result<()> {
        let mut d = self.lock_io();
        if self.durable_generation.load(Ordering::Acquire) >= need {
            return Ok(());
        }
        let (al, generation) = {
            let s = self.lock_st();
            (s.al.clone(), s.generation)
        };
        self.write_al(&mut d, &al)?;
        self.durable(generation);
        Ok(())
    }

    fn durable(&self, generation: u64) {
        self.durable_generation
            .fetch_max(generation, Ordering::AcqRel);
        let mut s = self.lock_st();
        s.set_generation.retain(|_, g| *g > generation);
    }

    fn fail(&self, d: &mut Disk, e: Error) -> Result<()> {
        // The file no longer says the truth: remove it (the next mount does a full
        // sync) and go on without it; if even that fails, refuse writes.
        log::error!(
            "replica bitmap {}: {e}; removing it (the next mount syncs in full)",
            self.path.display()
        );
        if std::fs::remove_file(&self.path).is_ok() {
            crate::core::volfile::sync_parent(&self.path);
            d.removed = true;
            Ok(())
        } else {
            let m = format!("replica bitmap {}: {e}", self.path.display());
            d.broken = Some(m.clone());
            Err(Error::io("replica bitmap", std::io::Error::other(m)))
        }
    }

    fn check(&self, d: &Disk) -> Result<bool> {
        if let Some(m) = &d.broken {
            return Err(Error::io(
                "replica bitmap",
                std::io::Error::other(m.clone()),
            ));
        }
        Ok(!d.removed)
    }

    /// Writes the pages of `new` that differ from `old` at `off`; true if any.
    fn write_pages(&self, off: u64, old: &mut [u64], new: &[u64]) -> std::io::Result<bool> {
        let mut any = false;
        let want = |i: usize| new.get(i).copied().unwrap_or(0);
        for (p, page) in old.chunks_mut(WORDS_PER_PAGE).enumerate() {
            let base = p * WORDS_PER_PAGE;
            if page.iter().enumerate().all(|(k, w)| *w == want(base + k)) {
                continue;
            }
            let mut b = Vec::with_capacity(page.len() * 8);
            for (k, w) in page.iter_mut().enumerate() {
                *w = want(base + k);
                b.extend_from_slice(&w.to_le_bytes());
            }
            self.file.write_all_at(&b, off + p as u64 * PAGE)?;
            any = true;
        }
        Ok(any)
    }

    fn write_al(&self, d: &mut Disk, al: &[Vec<u64>; 2]) -> Result<()> {
        if !self.check(d)? {
            return Ok(());
        }
        let r = (|| -> std::io::Result<()> {
            let mut any = false;
            for (i, a) in al.iter().enumerate() {
                any |= self.write_pages(self.al_off(i), &mut d.al[i], a)?;
            }
            if any {
                self.file.sync_data()?;
                self.syncs.fetch_add(1, Ordering::Relaxed);
                self.write_syncs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })();
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.fail(d, Error::io("replica bitmap", e)),
        }
    }

    /// A checkpoint: the file becomes `t` (fine bits, then the AL: every region busy,
    /// in flight, or — unless `settle` — written since the last checkpoint, then the
    /// header), in the order the module doc gives.
    pub fn checkpoint(&self, settle: bool, view_under: &dyn Fn() -> Target) -> Result<()> {
        let mut d = self.lock_io();
        if !self.check(&d)? {
            return Ok(());
        }
        // The view and the new AL are taken together under the AL lock: no write can
        // begin between them (a write that began earlier is in flight or busy).
        let (t, al, generation) = {
            let mut s = self.lock_st();
            let t = view_under();
            let mut al = [
                vec![0u64; words(self.regions)],
                vec![0u64; words(self.regions)],
            ];
            for (&(i, r), _) in s.inflight.iter() {
                set(&mut al[i], r);
            }
            if !settle {
                for &(i, r) in s.touched.iter() {
                    set(&mut al[i], r);
                }
            }
            for (i, b) in t.busy.iter().enumerate() {
                for r in b {
                    set(&mut al[i], *r);
                }
            }
            s.touched.clear();
            s.generation += 1;
            let generation = s.generation;
            for (i, a) in al.iter().enumerate() {
                for r in 0..self.regions {
                    if get(a, r) && !get(&s.al[i], r) {
                        // Marked by this checkpoint (a busy region no write marked):
                        // not durable until it is written.
                        s.set_generation.insert((i, r), generation);
                    }
                }
            }
            s.al = al.clone();
            (t, al, generation)
        };
        let r = (|| -> std::io::Result<()> {
            let stream_changes = t.stream != d.stream;
            if stream_changes && t.stream == 0 {
                // Trust nothing first.
                self.file.write_all_at(&self.header(0, 0), 0)?;
                self.file.sync_data()?;
                self.syncs.fetch_add(1, Ordering::Relaxed);
                d.stream = 0;
                d.floor = 0;
            }
            let mut any = false;
            for i in 0..2 {
                let mut old = std::mem::take(&mut d.fine[i]);
                let w = self.write_pages(self.fine_off(i), &mut old, &t.fine[i]);
                d.fine[i] = old;
                any |= w?;
            }
            if any {
                self.file.sync_data()?;
                self.syncs.fetch_add(1, Ordering::Relaxed);
            }
            let mut any = false;
            for (i, a) in al.iter().enumerate() {
                let mut old = std::mem::take(&mut d.al[i]);
                let w = self.write_pages(self.al_off(i), &mut old, a);
                d.al[i] = old;
                any |= w?;
            }
            if any {
                self.file.sync_data()?;
                self.syncs.fetch_add(1, Ordering::Relaxed);
            }
            if t.stream != d.stream || t.floor != d.floor {
                self.file.write_all_at(&self.header(t.stream, t.floor), 0)?;
                self.file.sync_data()?;
                self.syncs.fetch_add(1, Ordering::Relaxed);
                d.stream = t.stream;
                d.floor = t.floor;
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                self.durable(generation);
                Ok(())
            }
            Err(e) => {
                let r = self.fail(&mut d, Error::io("replica bitmap", e));
                // Nothing persists now: writers need not wait for marks.
                self.durable(u64::MAX);
                r
            }
        }
    }

    /// fdatasyncs of the file since mount: all, and those writers waited for.
    pub fn syncs(&self) -> (u64, u64) {
        (
            self.syncs.load(Ordering::Relaxed),
            self.write_syncs.load(Ordering::Relaxed),
        )
    }

    /// Regions marked in the activity log on disk now (both images): what a resync after
    /// a crash would cover besides the fine bits.
    pub fn logged_regions(&self) -> u64 {
        let io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        io.al
            .iter()
            .flat_map(|w| w.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The unit and region sizes (bytes).
    pub fn geometry(&self) -> (u64, u64) {
        (self.unit, self.region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(stream: u64, floor: u64) -> Target {
        Target {
            stream,
            floor,
            ..Target::default()
        }
    }

    #[test]
    fn marks_survive_reopen_and_settle_clears_regions() {
        let d = tempfile::tempdir().unwrap();
        let meta = d.path().join("v.meta");
        let uuid = [7u8; 16];
        let size = 64 << 20;
        let (b, l) = Bitmap::open(&meta, uuid, size, 4096).unwrap();
        assert!(l.is_none());
        b.checkpoint(true, &|| target(5, 3)).unwrap();
        // A write in region 2 of the copy image, and fine bits 1 and 100 of the volume.
        b.begin(1, 2 * REGION + 10, 4096).unwrap();
        b.end(1, 2 * REGION + 10, 4096);
        drop(b);
        let (b, l) = Bitmap::open(&meta, uuid, size, 4096).unwrap();
        let l = l.unwrap();
        assert_eq!((l.stream, l.floor), (5, 3));
        let per = REGION / 4096;
        let n: u32 = l.units[1].iter().map(|w| w.count_ones()).sum();
        assert_eq!(n as u64, per);
        assert!(get(&l.units[1], 2 * per));
        let mut t = target(5, 9);
        t.fine[0] = vec![0; words(size / 4096)];
        set(&mut t.fine[0], 1);
        set(&mut t.fine[0], 100);
        let t2 = t.clone();
        // Not settled: the region written since the last checkpoint stays; settled: gone.
        b.checkpoint(false, &|| t2.clone()).unwrap();
        b.checkpoint(true, &|| t2.clone()).unwrap();
        drop(b);
        let (_, l) = Bitmap::open(&meta, uuid, size, 4096).unwrap();
        let l = l.unwrap();
        assert_eq!((l.stream, l.floor), (5, 9));
        let n: u32 = l.units[1].iter().map(|w| w.count_ones()).sum();
        assert_eq!(n, 0);
        let n: u32 = l.units[0].iter().map(|w| w.count_ones()).sum();
        assert_eq!(n, 2);
        // Another volume's file is not trusted.
        let (_, l) = Bitmap::open(&meta, [8u8; 16], size, 4096).unwrap();
        assert!(l.is_none());
    }

    #[test]
    fn a_sequential_writer_marks_regions_ahead_in_one_fsync() {
        let d = tempfile::tempdir().unwrap();
        let meta = d.path().join("v.meta");
        let (b, _) = Bitmap::open(&meta, [3u8; 16], 64 << 20, 4096).unwrap();
        b.checkpoint(true, &|| target(4, 0)).unwrap();
        let base = b.syncs().1;
        for r in 0..10u64 {
            b.begin(0, r * REGION, REGION).unwrap();
            b.end(0, r * REGION, REGION);
        }
        // Region 0, then 1..=8 together, then 9..=15 (the volume's last).
        assert_eq!(b.syncs().1 - base, 3);
        let s = b.lock_st();
        assert!((0..16).all(|r| get(&s.al[0], r)));
    }

    #[test]
    fn a_write_in_flight_keeps_its_region_and_stream_zero_trusts_nothing() {
        let d = tempfile::tempdir().unwrap();
        let meta = d.path().join("v.meta");
        let uuid = [1u8; 16];
        let (b, _) = Bitmap::open(&meta, uuid, 32 << 20, 4096).unwrap();
        b.checkpoint(true, &|| target(9, 1)).unwrap();
        b.begin(0, 0, 8192).unwrap();
        b.checkpoint(true, &|| target(9, 1)).unwrap();
        let (_, l) = Bitmap::open(&meta, uuid, 32 << 20, 4096).unwrap();
        assert!(get(&l.unwrap().units[0], 0));
        b.end(0, 0, 8192);
        b.checkpoint(true, &|| target(0, 0)).unwrap();
        let (_, l) = Bitmap::open(&meta, uuid, 32 << 20, 4096).unwrap();
        assert!(l.is_none());
    }

    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        /// A write of one 4 KiB block begins (its record is queued when it ends).
        Begin(usize, u64),
        /// The oldest write in flight ends: its block is busy (record unacked).
        End,
        /// A busy block's record is acked and synced locally: it no longer differs.
        Ack(usize),
        /// A busy block's record is dropped: out of sync (a fine bit).
        Drop(usize),
        /// An out-of-sync block is resynced.
        Resynced(usize),
        Checkpoint,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..2usize, 0..(48u64 << 20) / 4096).prop_map(|(i, u)| Op::Begin(i, u)),
            3 => Just(Op::End),
            2 => (0..64usize).prop_map(Op::Ack),
            1 => (0..64usize).prop_map(Op::Drop),
            1 => (0..64usize).prop_map(Op::Resynced),
            2 => Just(Op::Checkpoint),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// After every step, the file (as a crash would leave it) covers every block that
        /// may differ: in flight, unacked, or out of sync.
        #[test]
        fn the_file_always_covers_what_may_differ(ops in proptest::collection::vec(op(), 1..60)) {
            let d = tempfile::tempdir().unwrap();
            let meta = d.path().join("v.meta");
            let (uuid, size) = ([9u8; 16], 48u64 << 20);
            let (b, _) = Bitmap::open(&meta, uuid, size, 4096).unwrap();
            b.checkpoint(true, &|| target(5, 0)).unwrap();
            let mut inflight: Vec<(usize, u64)> = vec![];
            let mut busy: Vec<(usize, u64)> = vec![];
            let mut fine: Vec<(usize, u64)> = vec![];
            for o in ops {
                match o {
                    Op::Begin(i, u) => {
                        b.begin(i, u * 4096, 4096).unwrap();
                        inflight.push((i, u));
                    }
                    Op::End => {
                        if !inflight.is_empty() {
                            let (i, u) = inflight.remove(0);
                            busy.push((i, u));
                            b.end(i, u * 4096, 4096);
                        }
                    }
                    Op::Ack(k) => {
                        if !busy.is_empty() {
                            busy.remove(k % busy.len());
                        }
                    }
                    Op::Drop(k) => {
                        if !busy.is_empty() {
                            let x = busy.remove(k % busy.len());
                            fine.push(x);
                        }
                    }
                    Op::Resynced(k) => {
                        if !fine.is_empty() {
                            fine.remove(k % fine.len());
                        }
                    }
                    Op::Checkpoint => {
                        let mut t = target(5, 1);
                        for &(i, u) in &fine {
                            if t.fine[i].is_empty() {
                                t.fine[i] = vec![0; words(size / 4096)];
                            }
                            set(&mut t.fine[i], u);
                        }
                        for &(i, u) in &busy {
                            t.busy[i].insert(u * 4096 / REGION);
                        }
                        let settle = inflight.is_empty();
                        b.checkpoint(settle, &|| t.clone()).unwrap();
                    }
                }
                let (_, l) = Bitmap::open(&meta, uuid, size, 4096).unwrap();
                let l = l.unwrap();
                let need: BTreeSet<_> = inflight.iter().chain(&busy).chain(&fine).collect();
                for &&(i, u) in &need {
                    prop_assert!(get(&l.units[i], u), "block {u} of image {i} not covered");
                }
            }
        }
    }
}
