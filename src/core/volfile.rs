//! The files of a volume (image, copy image, metadata database): naming, `mkfs`, the
//! image headers, the mount lock and opening everything into an [`Fs`].
//!
//! Image header (track 0 of the volume and of the copy image, 64 bytes, little endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `PAIRFSV1` (volume) or `PAIRFSC1` (copy image) |
//! | 8 | 16 | volume UUID |
//! | 24 | 8 | volume size in bytes |
//! | 32 | 8 | track size in bytes |
//! | 40 | 8 | FNV-1a hash of bytes 0..40 |
//!
//! Track 0 is never allocated to a file and never copied.
//!
//! An image is a path (file or block device) or an NBD URI ([`crate::store::nbd`]).
//! Nothing sits "beside" a URI, so a volume on NBD names its metadata (`--meta`) and
//! copy image (`--copy`) explicitly ([`Paths::resolve`]), and `flock` on an export is
//! impossible: the mount lock is then taken on `META.lock`, a file beside the metadata
//! (and `META.copy.lock` for a snapshot mount of an NBD copy image). That protects
//! against two mounts on this host using the same metadata; it cannot stop another
//! host from mounting the same export (the server's own access control must).

use std::path::{Path, PathBuf};

use crate::core::fs::{Fs, Options, now_ns};
use crate::error::{Error, Result};
use crate::meta::{Geometry, Meta};
use crate::store::lock::lock;
pub use crate::store::lock::{VolumeLock, lock_copy_for_rewrite};
use crate::store::nbd::{self, NbdVolume};
use crate::store::volume::{FileVolume, Volume};

const MAGIC_VOL: &[u8; 8] = b"PAIRFSV1";
const MAGIC_COPY: &[u8; 8] = b"PAIRFSC1";

/// Paths of the three files of a volume.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The volume image.
    pub volume: PathBuf,
    /// The metadata database (default `VOLUME.meta`).
    pub meta: PathBuf,
    /// The copy image (default `VOLUME.copy`).
    pub copy: PathBuf,
}

impl Paths {
    /// Defaults beside `volume`, overridden where given.
    pub fn new(volume: &Path, meta: Option<&Path>, copy: Option<&Path>) -> Paths {
        let beside = |ext: &str| {
            let mut s = volume.as_os_str().to_owned();
            s.push(ext);
            PathBuf::from(s)
        };
        Paths {
            volume: volume.to_path_buf(),
            meta: meta.map_or_else(|| beside(".meta"), Path::to_path_buf),
            copy: copy.map_or_else(|| beside(".copy"), Path::to_path_buf),
        }
    }
}

impl Paths {
    /// Like [`Paths::new`], but an NBD URI volume needs `meta` and `copy` given.
    pub fn resolve(volume: &Path, meta: Option<&Path>, copy: Option<&Path>) -> Result<Paths> {
        if is_uri(volume) {
            let missing: Vec<&str> = [
                (meta.is_none(), "--meta FILE"),
                (copy.is_none(), "--copy PATH|URI"),
            ]
            .into_iter()
            .filter_map(|(m, f)| m.then_some(f))
            .collect();
            if !missing.is_empty() {
                return Err(Error::invalid(format!(
                    "the volume {} is an NBD URI: give {} (nothing sits beside a URI)",
                    volume.display(),
                    missing.join(" and ")
                )));
            }
        }
        if meta.is_some_and(is_uri) {
            return Err(Error::invalid(
                "--meta must be a local file (SQLite), not an NBD URI",
            ));
        }
        Ok(Paths::new(volume, meta, copy))
    }
}

/// True if the image is named by an NBD URI rather than a path.
pub fn is_uri(image: &Path) -> bool {
    nbd::is_uri(image.as_os_str())
}

fn uri_str(image: &Path) -> Result<&str> {
    image
        .to_str()
        .ok_or_else(|| Error::invalid(format!("NBD URI {} is not UTF-8", image.display())))
}

/// Opens an image: a file or block device, or an NBD export.
pub fn open_image(image: &Path, writable: bool, what: &'static str) -> Result<Box<dyn Volume>> {
    if is_uri(image) {
        Ok(Box::new(NbdVolume::open(uri_str(image)?, writable, what)?))
    } else {
        Ok(Box::new(FileVolume::open(image, writable, what)?))
    }
}

/// mkfs of one image: a new sparse file, or an existing NBD export of at least `size`
/// bytes, zeroed (a pairfs header already there needs `force`).
fn create_image(
    image: &Path,
    size: u64,
    force: bool,
    what: &'static str,
) -> Result<Box<dyn Volume>> {
    if !is_uri(image) {
        return Ok(Box::new(FileVolume::create(image, size, what)?));
    }
    let v = NbdVolume::open(uri_str(image)?, true, what)?;
    if v.len() < size {
        return Err(Error::invalid(format!(
            "{what} {}: the export is {} bytes, smaller than the volume size {size}",
            image.display(),
            v.len()
        )));
    }
    let mut h = [0u8; 8];
    v.read_at(0, &mut h)?;
    if !force && (&h == MAGIC_VOL || &h == MAGIC_COPY) {
        return Err(Error::Exists(format!(
            "{what} {} already holds a pairfs image (use --force to overwrite)",
            image.display()
        )));
    }
    v.discard(0, size)?;
    Ok(Box::new(v))
}

/// The size `mkfs` gives a volume when `--size` is not given: that of the volume's NBD
/// export (and no more than the copy image's, if that is an export too).
pub fn default_size(p: &Paths) -> Result<u64> {
    if !is_uri(&p.volume) {
        return Err(Error::invalid(
            "--size is required unless the volume is an NBD URI",
        ));
    }
    let mut size = open_image(&p.volume, false, "volume")?.len();
    if is_uri(&p.copy) {
        size = size.min(open_image(&p.copy, false, "copy image")?.len());
    }
    Ok(size)
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn uuid_bytes(hex: &str) -> Result<[u8; 16]> {
    let u = uuid::Uuid::parse_str(hex).map_err(|_| Error::Corrupt(format!("bad uuid {hex:?}")))?;
    Ok(*u.as_bytes())
}

/// Encodes an image header.
pub fn header(magic: &[u8; 8], g: &Geometry) -> Result<[u8; 64]> {
    let mut h = [0u8; 64];
    h[0..8].copy_from_slice(magic);
    h[8..24].copy_from_slice(&uuid_bytes(&g.uuid)?);
    h[24..32].copy_from_slice(&g.size.to_le_bytes());
    h[32..40].copy_from_slice(&g.track_size.to_le_bytes());
    let sum = fnv(&h[0..40]);
    h[40..48].copy_from_slice(&sum.to_le_bytes());
    Ok(h)
}

/// Checks an image header against the geometry from the database.
pub fn check_header(h: &[u8], magic: &[u8; 8], g: &Geometry, what: &str) -> Result<()> {
    if h.len() < 48 || &h[0..8] != magic {
        return Err(Error::Corrupt(format!(
            "{what} is not a pairfs {what} (bad magic)"
        )));
    }
    let sum = u64::from_le_bytes(h[40..48].try_into().expect("8 bytes"));
    if sum != fnv(&h[0..40]) {
        return Err(Error::Corrupt(format!("{what} header checksum mismatch")));
    }
    if h[8..24] != uuid_bytes(&g.uuid)? {
        return Err(Error::Corrupt(format!(
            "{what} belongs to another volume (UUID differs from the metadata's {})",
            g.uuid
        )));
    }
    let size = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
    let ts = u64::from_le_bytes(h[32..40].try_into().expect("8 bytes"));
    if size != g.size || ts != g.track_size {
        return Err(Error::Corrupt(format!(
            "{what} geometry ({size} bytes, {ts}-byte tracks) differs from the metadata ({} bytes, {}-byte tracks)",
            g.size, g.track_size
        )));
    }
    Ok(())
}

/// `pairfs mkfs`: creates the image, the copy image and the database.
pub fn mkfs(p: &Paths, size: u64, track_size: u64, force: bool) -> Result<Geometry> {
    if !track_size.is_power_of_two() || !(4096..=1 << 20).contains(&track_size) {
        return Err(Error::invalid(format!(
            "track size {track_size} must be a power of two between 4K and 1M"
        )));
    }
    let size = size / track_size * track_size;
    if size < 16 * track_size {
        return Err(Error::invalid(format!(
            "volume size must be at least 16 tracks ({} bytes)",
            16 * track_size
        )));
    }
    for f in [&p.volume, &p.meta, &p.copy] {
        if !is_uri(f) && f.exists() && !force {
            return Err(Error::Exists(format!(
                "{} (use --force to overwrite)",
                f.display()
            )));
        }
    }
    if force {
        for f in [&p.volume, &p.meta, &p.copy] {
            if is_uri(f) {
                continue;
            }
            let is_blockdev = std::fs::metadata(f)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false);
            if !is_blockdev {
                let _ = std::fs::remove_file(f);
            }
        }
        for ext in ["-wal", "-shm", ".snapshot"] {
            let mut s = p.meta.as_os_str().to_owned();
            s.push(ext);
            let _ = std::fs::remove_file(PathBuf::from(s));
        }
    }
    let g = Geometry {
        uuid: uuid::Uuid::new_v4().simple().to_string(),
        size,
        track_size,
    };
    let vol = create_image(&p.volume, size, force, "volume")?;
    vol.write_at(0, &header(MAGIC_VOL, &g)?)?;
    vol.sync()?;
    let copy = create_image(&p.copy, size, force, "copy image")?;
    copy.write_at(0, &header(MAGIC_COPY, &g)?)?;
    copy.sync()?;
    Meta::create(&p.meta, &g, now_ns())?;
    Ok(g)
}

/// The file to `flock` for `image`: the image itself, or for an NBD URI the metadata's
/// path plus `suffix`.
fn lock_path(p: &Paths, image: &Path, suffix: &str) -> PathBuf {
    image_lock_path(&p.meta, image, suffix)
}

/// The file to `flock` for `image` of the volume whose metadata is `meta`: the image
/// itself, or for an NBD URI the metadata's path plus `suffix`.
pub fn image_lock_path(meta: &Path, image: &Path, suffix: &str) -> PathBuf {
    if is_uri(image) {
        let mut s = meta.to_path_buf().into_os_string();
        s.push(suffix);
        s.into()
    } else {
        image.to_path_buf()
    }
}

/// The paths with the image locations recorded in the metadata by a migration
/// (`pairfs migrate`) in place of those of the command line, each change logged. A
/// database that does not exist (yet) changes nothing.
pub fn follow_locations(p: &Paths) -> Result<Paths> {
    if !p.meta.exists() {
        return Ok(p.clone());
    }
    let meta = Meta::open(&p.meta, true)?;
    let mut q = p.clone();
    for (key, place, what) in [
        (
            crate::core::migrate::KEY_VOLUME,
            &mut q.volume,
            "volume image",
        ),
        (crate::core::migrate::KEY_COPY, &mut q.copy, "copy image"),
    ] {
        if let Some(v) = meta.super_value(key)?
            && Path::new(&v) != place.as_path()
        {
            log::info!(
                "{what}: at {v} since a migration (recorded in {}), not {}",
                p.meta.display(),
                place.display()
            );
            *place = PathBuf::from(v);
        }
    }
    Ok(q)
}

/// The file whose `flock` is the volume's mount lock: the image, or `META.lock` for an
/// NBD volume. The mount's FUSE source names it, so `pairfs umount` can wait for it.
pub fn lock_file(p: &Paths) -> PathBuf {
    lock_path(p, &p.volume, ".lock")
}

/// Takes the mount lock of the volume: exclusive for a read-write mount or fsck,
/// shared for a read-only one.
pub fn lock_volume(p: &Paths, exclusive: bool) -> Result<VolumeLock> {
    lock(&lock_file(p), exclusive)
}

/// Opens a volume for mounting (or for fsck): checks lock, headers and geometry.
pub fn open(p: &Paths, opts: Options) -> Result<(Fs, VolumeLock)> {
    if !is_uri(&p.volume) && !p.volume.exists() {
        return Err(Error::NotFound(format!(
            "volume image {}",
            p.volume.display()
        )));
    }
    let lk = lock_volume(p, !opts.readonly)?;
    Ok((open_unlocked(p, opts)?, lk))
}

/// [`open`] without the mount lock: for a caller that holds it already (the secondary's
/// copy mount, `repl::follow`, opens its volume read-only at each committed state while
/// `replica serve` holds the lock and writes it).
pub fn open_unlocked(p: &Paths, mut opts: Options) -> Result<Fs> {
    if !is_uri(&p.volume) && !p.volume.exists() {
        return Err(Error::NotFound(format!(
            "volume image {}",
            p.volume.display()
        )));
    }
    let mut meta = Meta::open(&p.meta, opts.readonly)?;
    if !opts.readonly
        && let Some(of) = meta.super_value(REPLICA_KEY)?
    {
        return Err(Error::invalid(format!(
            "{} is a replica of volume {of} (pairfs replica serve): it mounts read-write only \
             after `pairfs replica promote {}`",
            p.volume.display(),
            p.volume.display()
        )));
    }
    if !opts.readonly && opts.replica.is_none() {
        if meta.super_value(RESUME_KEYS[0])?.is_some() {
            // Changed without the replica: it can no longer resume where it was.
            meta.set_super_values(&[(RESUME_KEYS[0], None), (RESUME_KEYS[1], None)])?;
        }
        // Nor resync by its out-of-sync bitmap: gone before anything changes.
        forget_repl_bitmap(&p.meta)?;
    }
    let g = meta.geometry().clone();
    let vol = open_image(&p.volume, !opts.readonly, "volume")?;
    if vol.len() < g.size {
        return Err(Error::Corrupt(format!(
            "volume image is {} bytes, the metadata says {} (truncated image?)",
            vol.len(),
            g.size
        )));
    }
    let mut h = [0u8; 64];
    vol.read_at(0, &mut h)?;
    check_header(&h, MAGIC_VOL, &g, "volume image")?;
    if !is_uri(&p.copy) && !p.copy.exists() {
        return Err(Error::NotFound(format!(
            "copy image {} (pairfs mkfs makes it; restore it or point --copy at it)",
            p.copy.display()
        )));
    }
    let copy = open_image(&p.copy, !opts.readonly, "copy image")?;
    // An NBD export may be larger than the volume; a file copy image is exactly its size.
    if copy.len() < g.size || (!is_uri(&p.copy) && copy.len() != g.size) {
        return Err(Error::Corrupt(format!(
            "copy image {} is {} bytes, the volume is {} bytes",
            p.copy.display(),
            copy.len(),
            g.size
        )));
    }
    copy.read_at(0, &mut h)?;
    check_header(&h, MAGIC_COPY, &g, "copy image")?;
    let (vol, copy, sink) = match opts.replica.clone() {
        Some(r) if !opts.readonly => {
            let (v, c, s) = r.0.attach(&mut meta, &p.meta, vol, copy)?;
            (v, c, Some(s))
        }
        _ => (vol, copy, None),
    };
    let loaded = meta.load_with(!(opts.readonly && opts.no_allocator))?;
    if !opts.readonly {
        meta.set_clean(false)?;
    }
    opts.meta_path = Some(p.meta.clone());
    opts.volume_image = Some(p.volume.clone());
    opts.copy_image = Some(p.copy.clone());
    // The lock a snapshot mount takes on the copy image (a file beside the metadata
    // for an NBD copy image).
    opts.copy_path = Some(lock_path(p, &p.copy, ".copy.lock"));
    let fs = Fs::new(meta, loaded, vol, copy, opts)?;
    if let Some(s) = sink {
        fs.durability.add_sink(s);
    }
    Ok(fs)
}

/// `super` rows of a primary whose replica link ended cleanly in sync (`repl::link`):
/// any other read-write open deletes them, so the next `--replica` mount does a full sync.
pub const RESUME_KEYS: [&str; 2] = ["repl_peer_stream", "repl_peer_seq"];

/// The primary's persistent out-of-sync bitmap (`repl::bitmap`) beside the metadata
/// database `meta`.
pub fn repl_bitmap_path(meta: &Path) -> PathBuf {
    let mut s = meta.as_os_str().to_owned();
    s.push(".repl-bitmap");
    s.into()
}

/// Deletes the replica bitmap of the volume whose metadata is `meta` (durably): the
/// volume is about to change without its replica link, so the next `--replica` mount
/// must not trust it.
pub fn forget_repl_bitmap(meta: &Path) -> Result<()> {
    let b = repl_bitmap_path(meta);
    match std::fs::remove_file(&b) {
        Ok(()) => {
            sync_parent(&b);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("replica bitmap", e)),
    }
}

/// fsync of the directory holding `p` (best effort: a create, rename or remove there
/// becomes durable).
pub fn sync_parent(p: &Path) {
    if let Some(d) = p.parent()
        && let Ok(f) = std::fs::File::open(if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        })
    {
        let _ = f.sync_all();
    }
}

/// The `super` row that marks a replica (`pairfs replica serve`): the primary's UUID.
/// A volume with it refuses a read-write mount until `pairfs replica promote`.
pub const REPLICA_KEY: &str = "replica_of";

/// Where `mount-snapshot` copies the metadata database for daemon `pid`: beside the
/// database (same file system, same space), removed once opened.
fn snapshot_copy_path(p: &Paths, pid: u32) -> PathBuf {
    let mut s = p.meta.clone().into_os_string();
    s.push(format!(".snapshot-{pid}"));
    s.into()
}

/// Removes the metadata copies left by `mount-snapshot` daemons that died between
/// writing and opening theirs (a live one's copy is its own), and the fixed-name
/// snapshot older versions wrote at every whole-volume split.
fn sweep_snapshot_copies(p: &Paths) {
    let Some(dir) = p.meta.parent().map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    }) else {
        return;
    };
    let Some(base) = p.meta.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let _ = std::fs::remove_file(dir.join(format!("{base}.snapshot")));
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{base}.snapshot-");
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|v| v.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Opens the whole volume as of its last root split, read-only (`mount-snapshot`): the
/// copy image holds the data; the metadata comes from a consistent copy of the live
/// database taken now, served as the root pair's frozen view (the records of what
/// changed since the instant plus the unchanged rows, exactly as the copy mount serves
/// it). Refused until the root pair is `split` (every track copied).
///
/// A split writes nothing for this (it stays O(1)); the copy costs O(database) here, in
/// one SQLite read transaction of the live database (`VACUUM INTO`), which neither
/// stalls nor waits for the live daemon. Every committed state of the database gives the
/// instant exactly: a member's record is committed in the same transaction as its first
/// change after the instant, or an earlier one (design rule 8a), so a member without a
/// record is unchanged.
pub fn open_snapshot(p: &Paths) -> Result<(Fs, VolumeLock)> {
    // Shared lock on the copy image first: from here on the live mount refuses update,
    // resync and release of the root pair, so the state checked below stays true.
    let lk = lock(&lock_path(p, &p.copy, ".copy.lock"), false).map_err(|_| {
        Error::Busy(format!(
            "{} is being rewritten (update, resync or release of the root pair); try again",
            p.copy.display()
        ))
    })?;
    sweep_snapshot_copies(p);
    let copy_path = snapshot_copy_path(p, std::process::id());
    // A copy that just finished is visible in `getfattr` a moment before its state row
    // is committed: allow it 3 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let (meta, loaded) = loop {
        let t = std::time::Instant::now();
        Meta::open(&p.meta, true)?.snapshot_to(&copy_path)?;
        let took = t.elapsed();
        let opened = Meta::open_immutable(&copy_path);
        let meta = match opened {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&copy_path);
                return Err(e);
            }
        };
        let loaded = match meta.load() {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&copy_path);
                return Err(e);
            }
        };
        let state = loaded
            .pairs
            .iter()
            .find(|x| x.scope == crate::snap::pair::Scope::Root)
            .map(|r| r.state);
        let copying = matches!(
            state,
            Some(crate::snap::pair::PairState::Splitting | crate::snap::pair::PairState::Updating)
        );
        if state == Some(crate::snap::pair::PairState::Split) {
            log::info!(
                "metadata of the whole-volume instant copied in {} ms",
                took.as_millis()
            );
            break (meta, loaded);
        }
        drop(meta);
        let _ = std::fs::remove_file(&copy_path);
        let Some(state) = state else {
            return Err(Error::invalid(
                "the volume has no whole-volume (root) pair (pair and split the mount root)",
            ));
        };
        if !copying || std::time::Instant::now() >= deadline {
            return Err(Error::Busy(format!(
                "the whole-volume copy is {} (wait for `pairfs split --wait MOUNTPOINT`)",
                state.name()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let r = open_snapshot_fs(p, meta, loaded);
    // The daemon holds its connections open; the name is no longer needed.
    let _ = std::fs::remove_file(&copy_path);
    Ok((r?, lk))
}

/// The read-only file system of `mount-snapshot` over the copied metadata `meta`.
fn open_snapshot_fs(p: &Paths, meta: Meta, mut loaded: crate::meta::Loaded) -> Result<Fs> {
    // The copy was taken from a mounted volume, so its clean flag is off; nothing here
    // copies or recovers (the root pair is `split`, every read goes to the copy image),
    // so the walk an unclean mount makes of every pair's scope is skipped.
    loaded.clean = true;
    // Named generations read unsaved tracks from the volume, which the live daemon goes
    // on changing (saving first, in rows this copy does not have): not offered here.
    loaded.gens.clear();
    // The root pair's instant only: another pair in the snapshot (a file split on its own
    // inside the volume, `snap::group`) is not offered here (its copy is not complete on
    // the copy image, and the volume is not read), and its file keeps that pair as its
    // membership, so the root's view leaves it out: it was not in the root's instant.
    for q in loaded
        .pairs
        .iter_mut()
        .filter(|x| x.scope != crate::snap::pair::Scope::Root)
    {
        q.frozen.clear();
        q.frozen_at.clear();
        q.frozen_saved = 0;
        q.lazy = None;
        q.forming = crate::core::trackset::TrackSet::new();
        q.split_diff = crate::core::trackset::TrackSet::new();
        q.update_diff = crate::core::trackset::TrackSet::new();
        q.state = crate::snap::pair::PairState::Formed;
    }
    let g = meta.geometry().clone();
    let copy = open_image(&p.copy, false, "copy image")?;
    if copy.len() < g.size || (!is_uri(&p.copy) && copy.len() != g.size) {
        return Err(Error::Corrupt(
            "copy image size differs from the snapshot".into(),
        ));
    }
    let mut h = [0u8; 64];
    copy.read_at(0, &mut h)?;
    check_header(&h, MAGIC_COPY, &g, "copy image")?;
    let opts = Options {
        readonly: true,
        ..Options::default()
    };
    // Served as the frozen view of the root pair: its reads go to the copy image
    // whichever image the pair's bits point them at.
    let copy2 = open_image(&p.copy, false, "copy image")?;
    Fs::new(meta, loaded, copy, copy2, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_mismatch() {
        let g = Geometry {
            uuid: uuid::Uuid::new_v4().simple().to_string(),
            size: 1 << 30,
            track_size: 65536,
        };
        let h = header(MAGIC_VOL, &g).unwrap();
        check_header(&h, MAGIC_VOL, &g, "volume").unwrap();
        assert!(check_header(&h, MAGIC_COPY, &g, "copy").is_err());
        let mut other = g.clone();
        other.uuid = uuid::Uuid::new_v4().simple().to_string();
        assert!(check_header(&h, MAGIC_VOL, &other, "volume").is_err());
        let mut bad = h;
        bad[30] ^= 1;
        assert!(check_header(&bad, MAGIC_VOL, &g, "volume").is_err());
    }

    #[test]
    fn mkfs_refuses_overwrite_and_open_refuses_second_mount() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(&d.path().join("v.img"), None, None);
        mkfs(&p, 64 << 20, 65536, false).unwrap();
        assert!(matches!(
            mkfs(&p, 64 << 20, 65536, false),
            Err(Error::Exists(_))
        ));
        let (_fs, _lk) = open(&p, Options::default()).unwrap();
        assert!(matches!(
            open(&p, Options::default()),
            Err(Error::Locked(_))
        ));
    }
}
