//! The secondary: `pairfs replica serve` (accept one primary at a time, apply its
//! records in order, ack after its own fsync) and `pairfs replica promote`.
//!
//! State on disk: the three files of an ordinary volume (`VOLUME`, `VOLUME.copy`,
//! `VOLUME.meta`) plus `super` rows `replica_of` (the primary's UUID; a volume with it
//! refuses a read-write mount), `repl_stream` and `repl_seq` (the last record durable
//! here, committed in the same transaction as the record's rows). Applying a record:
//!
//! - `Write`/`Discard`: to the image, unsynced (as the primary's own writes);
//! - `Sync`: fsync both images, commit `repl_seq`, ack;
//! - `Commit`: fsync both images, then one transaction with the rows and `repl_seq`,
//!   ack. The primary sends a `Sync` before each commit and made its own images durable
//!   before its commit, so the order "data before metadata" holds here too.
//!
//! A full sync (`SyncBegin`..`SyncEnd`) first deletes the database (a crash in the
//! middle leaves a volume that is not mountable and asks for a full sync again), writes
//! both images from zero, then installs the received database with the marker rows.
//!
//! Failback: `promote` starts the volume's persistent bitmap (`repl::bitmap`) at the
//! last record it held; `serve --rejoin` lets an old primary be taken over, sending its
//! own bitmap's marks after its `Welcome` (`RejoinMark`s, `RejoinEnd`) so the new
//! primary resyncs only those and its own (docs/replication.md, "Failover and failback").

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use crate::core::volfile::{self, Paths, REPLICA_KEY};
use crate::error::{Error, Result};
use crate::repl::capture::Applier;
use crate::repl::follow::Follower;
use crate::repl::proto::{self, Image, Key, Msg, VERSION};
use crate::store::volume::{FileVolume, Volume};

const STREAM_KEY: &str = "repl_stream";
const SEQ_KEY: &str = "repl_seq";
/// Set while an online resync runs: the images are not consistent until `ResyncEnd`.
const INCONSISTENT_KEY: &str = "repl_inconsistent";

/// What the secondary's volume is.
#[derive(Debug)]
enum Local {
    /// No volume yet, or a new empty volume (mkfs) of the given geometry.
    Fresh(Option<(String, u64, u64)>),
    /// A replica of `uuid` at `stream`/`seq`.
    Replica {
        uuid: String,
        size: u64,
        track_size: u64,
        stream: u64,
        seq: u64,
        inconsistent: bool,
    },
    /// A volume with data that is no replica: never overwritten (unless served with
    /// `--rejoin`, see [`Local::Rejoin`]).
    Foreign(String),
    /// An old primary served with `--rejoin`: its persistent out-of-sync bitmap says it
    /// was the primary of `stream`, its secondary having acked up to `floor`; `units`
    /// (per image, of `unit` bytes) may differ from what that secondary held.
    Rejoin {
        uuid: [u8; 16],
        size: u64,
        track_size: u64,
        stream: u64,
        floor: u64,
        unit: u64,
        units: [Vec<u64>; 2],
    },
    /// An old primary served with `--rejoin` whose bitmap is of no use: a full sync
    /// from a primary of the same volume (UUID) and geometry.
    RejoinFull {
        uuid: [u8; 16],
        size: u64,
        track_size: u64,
    },
}

fn super_row(c: &Connection, k: &str) -> Result<Option<String>> {
    Ok(
        c.query_row("SELECT value FROM super WHERE key = ?1", [k], |r| r.get(0))
            .optional()?,
    )
}

fn num(c: &Connection, k: &str) -> Result<u64> {
    super_row(c, k)?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Corrupt(format!("super row {k} missing or not a number")))
}

fn local_state(p: &Paths, rejoin: bool) -> Result<Local> {
    if !p.meta.exists() {
        return Ok(Local::Fresh(None));
    }
    let c = Connection::open(&p.meta)?;
    let uuid = super_row(&c, "uuid")?.unwrap_or_default();
    let size = num(&c, "volume_size")?;
    let ts = num(&c, "track_size")?;
    if let Some(of) = super_row(&c, REPLICA_KEY)? {
        return Ok(Local::Replica {
            uuid: of,
            size,
            track_size: ts,
            stream: num(&c, STREAM_KEY).unwrap_or(0),
            seq: num(&c, SEQ_KEY).unwrap_or(0),
            inconsistent: super_row(&c, INCONSISTENT_KEY)?.is_some(),
        });
    }
    let inodes: i64 = c.query_row("SELECT COUNT(*) FROM inodes", [], |r| r.get(0))?;
    let pairs: i64 = c.query_row("SELECT COUNT(*) FROM pairs", [], |r| r.get(0))?;
    if inodes <= 1 && pairs == 0 {
        return Ok(Local::Fresh(Some((uuid, size, ts))));
    }
    if rejoin {
        drop(c);
        return rejoin_state(p, &uuid, size, ts);
    }
    Ok(Local::Foreign(uuid))
}

/// An old primary served with `--rejoin`: what its persistent bitmap says, or (no
/// usable bitmap) an empty volume to be fully synced.
fn rejoin_state(p: &Paths, uuid: &str, size: u64, ts: u64) -> Result<Local> {
    let Ok(u) = uuid::Uuid::parse_str(uuid) else {
        return Err(Error::Corrupt(format!("volume uuid {uuid:?}")));
    };
    let unit = crate::repl::link::unit_for(size, ts);
    let (b, loaded) = crate::repl::bitmap::Bitmap::open(&p.meta, *u.as_bytes(), size, unit)?;
    drop(b);
    Ok(match loaded {
        Some(l) => Local::Rejoin {
            uuid: *u.as_bytes(),
            size,
            track_size: ts,
            stream: l.stream,
            floor: l.floor,
            unit,
            units: l.units,
        },
        None => {
            log::warn!(
                "replica: {} has no usable out-of-sync bitmap ({}): it rejoins by a full sync",
                p.volume.display(),
                crate::repl::bitmap::path(&p.meta).display()
            );
            Local::RejoinFull {
                uuid: *u.as_bytes(),
                size,
                track_size: ts,
            }
        }
    })
}

/// The runs of marked units, as byte ranges `(image, off, len)` within `size`.
fn mark_runs(units: &[Vec<u64>; 2], unit: u64, size: u64) -> Vec<(Image, u64, u64)> {
    let mut out = Vec::new();
    for (i, image) in [Image::Volume, Image::Copy].into_iter().enumerate() {
        let bits = &units[i];
        let n = size.div_ceil(unit);
        let marked = |u: u64| {
            bits.get((u / 64) as usize)
                .is_some_and(|w| w & (1 << (u % 64)) != 0)
        };
        let mut u = 0;
        while u < n {
            if !marked(u) {
                u += 1;
                continue;
            }
            let mut e = u + 1;
            while e < n && marked(e) {
                e += 1;
            }
            let off = u * unit;
            out.push((image, off, (e * unit).min(size) - off));
            u = e;
        }
    }
    out
}

fn hex(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

/// An open replica: images and database.
struct Open {
    vol: FileVolume,
    copy: FileVolume,
    /// Written since its last fsync (volume, copy image).
    dirty: [bool; 2],
    /// The database (absent during an online resync of a secondary that had none).
    db: Option<(Connection, Applier)>,
}

fn open_db(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    Ok(c)
}

fn open_replica(p: &Paths) -> Result<Open> {
    let db = open_db(&p.meta)?;
    let applier = Applier::new(&db)?;
    Ok(Open {
        vol: FileVolume::open(&p.volume, true, "volume")?,
        copy: FileVolume::open(&p.copy, true, "copy image")?,
        dirty: [true, true],
        db: Some((db, applier)),
    })
}

/// Sets (or deletes) `super` rows in one transaction.
fn set_rows(c: &Connection, rows: &[(&str, Option<String>)]) -> Result<()> {
    let tx = c.unchecked_transaction()?;
    for (k, v) in rows {
        match v {
            Some(v) => tx.execute(
                "INSERT OR REPLACE INTO super(key, value) VALUES (?1, ?2)",
                [k, &v.as_str()],
            )?,
            None => tx.execute("DELETE FROM super WHERE key = ?1", [k])?,
        };
    }
    tx.commit()?;
    Ok(())
}

/// A new empty image of `size` bytes at `path` (truncated in place: the volume image
/// is also the lock file).
fn blank_image(path: &Path, size: u64, what: &'static str) -> Result<FileVolume> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(what, e))?;
    f.set_len(0).map_err(|e| Error::io(what, e))?;
    f.set_len(size).map_err(|e| Error::io(what, e))?;
    drop(f);
    FileVolume::open(path, true, what)
}

fn remove_db(meta: &Path) {
    for ext in ["", "-wal", "-shm"] {
        let mut s = meta.as_os_str().to_owned();
        s.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(s));
    }
}

fn sync_dir(p: &Path) {
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

/// One connection, handshake to `Bye` or error.
struct Conn<'a> {
    p: &'a Paths,
    key: &'a Key,
    /// Held by the one authenticated session (handshakes run concurrently, so a silent
    /// or hostile peer does not hold up the primary).
    active: &'a std::sync::Mutex<()>,
    /// `--rejoin`: an old primary's volume may be taken over (by its bitmap, or fully).
    rejoin: bool,
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    peer: String,
    /// The copy mount (`--copy-mount`): commits wait for its running requests, and it
    /// serves nothing while the volume is not consistent.
    copies: Option<&'a Arc<Follower>>,
    /// The primary proved the key: errors of this side may be told to it.
    authed: bool,
    /// A `Refuse` was sent (the primary knows why the connection ends).
    refused: bool,
}

impl Conn<'_> {
    fn send(&mut self, m: &Msg) -> Result<()> {
        proto::send(&mut self.w, m)?;
        self.w.flush().map_err(|e| Error::io("replica link", e))
    }

    fn refuse(&mut self, reason: String) -> Error {
        log::warn!("replica: refusing {}: {reason}", self.peer);
        self.refused = true;
        let _ = self.send(&Msg::Refuse {
            reason: reason.clone(),
        });
        Error::invalid(reason)
    }

    fn run(&mut self) -> Result<()> {
        self.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| Error::io("replica link", e))?;
        let (np, uuid, size, ts) = match proto::recv_max(&mut self.r, proto::MAX_HANDSHAKE)? {
            Msg::Hello {
                version,
                nonce,
                uuid,
                size,
                track_size,
            } => {
                if version != VERSION {
                    return Err(self.refuse(format!(
                        "protocol version {version} is not spoken here (this secondary speaks version {VERSION}): run the same pairfs version on both nodes"
                    )));
                }
                (nonce, uuid, size, track_size)
            }
            m => return Err(self.refuse(format!("expected Hello, got {}", kind(&m)))),
        };
        let ns = proto::nonce()?;
        let mac = self.key.mac_s(&np, &ns, &uuid);
        self.send(&Msg::Challenge {
            version: VERSION,
            nonce: ns,
            mac,
        })?;
        match proto::recv_max(&mut self.r, proto::MAX_HANDSHAKE)? {
            Msg::Auth { mac } if self.key.verify_p(&np, &ns, &uuid, &mac) => self.authed = true,
            Msg::Auth { .. } => {
                return Err(self.refuse(
                    "authentication failed: the primary does not have this secondary's key (wrong --key-file)".into(),
                ));
            }
            Msg::Refuse { reason } => {
                log::warn!("replica: {} gave up: {reason}", self.peer);
                return Err(Error::invalid(reason));
            }
            m => return Err(self.refuse(format!("expected Auth, got {}", kind(&m)))),
        }
        let _active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let want = hex(&uuid);
        let mut marks = None;
        let (stream, seq, inconsistent) = match local_state(self.p, self.rejoin)? {
            Local::Rejoin {
                uuid: u,
                size: s,
                track_size: t,
                stream,
                floor,
                unit,
                units,
            } => {
                if u != uuid {
                    return Err(self.refuse(format!(
                        "{} is volume {}, not {want}: it cannot rejoin as the secondary of {want}",
                        self.p.volume.display(),
                        hex(&u)
                    )));
                }
                if (s, t) != (size, ts) {
                    return Err(self.refuse(format!(
                        "geometry differs: here {s} bytes in tracks of {t}, the primary {size} in tracks of {ts}"
                    )));
                }
                let runs = mark_runs(&units, unit, s);
                log::info!(
                    "replica: {} was the primary of stream {stream:x} (acked up to record {floor}); it rejoins as the secondary with {} marked runs ({} bytes)",
                    self.p.volume.display(),
                    runs.len(),
                    runs.iter().map(|r| r.2).sum::<u64>()
                );
                log::debug!("replica: marked runs {:?}", &runs[..runs.len().min(64)]);
                marks = Some(runs);
                (stream, floor, false)
            }
            Local::RejoinFull {
                uuid: u,
                size: s,
                track_size: t,
            } => {
                if u != uuid || (s, t) != (size, ts) {
                    return Err(self.refuse(format!(
                        "{} is volume {} of {s} bytes in tracks of {t}: it cannot rejoin as the secondary of {want} ({size} bytes in tracks of {ts})",
                        self.p.volume.display(),
                        hex(&u)
                    )));
                }
                (0, 0, false)
            }
            Local::Replica {
                uuid: of,
                size: s,
                track_size: t,
                stream,
                seq,
                inconsistent,
            } => {
                if of != want {
                    return Err(self.refuse(format!(
                        "this secondary holds a replica of volume {of}, not of {want}"
                    )));
                }
                if (s, t) != (size, ts) {
                    return Err(self.refuse(format!(
                        "geometry differs: here {s} bytes in tracks of {t}, the primary {size} in tracks of {ts}"
                    )));
                }
                (stream, seq, inconsistent)
            }
            Local::Fresh(Some((_, s, t))) if (s, t) != (size, ts) => {
                return Err(self.refuse(format!(
                    "geometry differs: the empty volume here is {s} bytes in tracks of {t}, the primary {size} in tracks of {ts}"
                )));
            }
            Local::Fresh(_) => (0, 0, false),
            Local::Foreign(u) => {
                return Err(self.refuse(format!(
                    "{} is volume {u} with data and no replica of {want}; refusing to overwrite it",
                    self.p.volume.display()
                )));
            }
        };
        log::info!(
            "replica: {} authenticated for volume {want}; here stream {stream:x} at record {seq}",
            self.peer
        );
        self.send(&Msg::Welcome {
            stream,
            seq,
            inconsistent,
            rejoin: marks.is_some(),
        })?;
        // Still an old primary until it takes the new primary's database.
        let mut rejoining = marks.is_some();
        if let Some(runs) = marks {
            let count = runs.len() as u64;
            for (image, off, len) in runs {
                proto::send(&mut self.w, &Msg::RejoinMark { image, off, len })?;
            }
            self.send(&Msg::RejoinEnd { count })?;
        }
        self.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| Error::io("replica link", e))?;
        let mut open = if stream != 0 {
            Some(open_replica(self.p)?)
        } else {
            None
        };
        let mut next = seq + 1;
        let mut resync_db: Option<(PathBuf, std::fs::File)> = None;
        // The stream a resync is for (the copied database does not name it).
        let mut resync_stream = 0u64;
        loop {
            let m = proto::recv(&mut self.r)?;
            match m {
                Msg::ResyncBegin { seq: q, stream } => {
                    // The stream restarts here (records were dropped on the primary, or it
                    // is another stream): any position.
                    if q == 0 || stream == 0 {
                        return Err(self.refuse("resync at record 0 or of stream 0".into()));
                    }
                    next = q + 1;
                    resync_stream = stream;
                    if let Some(f) = self.copies {
                        f.close_gate("an online resync runs (the images are not consistent)");
                    }
                    match open.as_mut() {
                        // An old primary's database is replaced at `ResyncMetaEnd`.
                        Some(_) if rejoining => {}
                        Some(o) => {
                            if let Some((c, _)) = &o.db {
                                set_rows(
                                    c,
                                    &[
                                        (INCONSISTENT_KEY, Some("1".into())),
                                        (STREAM_KEY, Some(stream.to_string())),
                                    ],
                                )?;
                            }
                        }
                        None => {
                            // Nothing here yet: empty images; the database comes below.
                            remove_db(&self.p.meta);
                            sync_dir(&self.p.meta);
                            open = Some(Open {
                                vol: blank_image(&self.p.volume, size, "volume")?,
                                copy: blank_image(&self.p.copy, size, "copy image")?,
                                dirty: [true, true],
                                db: None,
                            });
                        }
                    }
                    let mut tmp = self.p.meta.as_os_str().to_owned();
                    tmp.push(".repl-resync.tmp");
                    let tmp = PathBuf::from(tmp);
                    let f = std::fs::File::create(&tmp).map_err(|e| Error::io("metadata", e))?;
                    resync_db = Some((tmp, f));
                    log::info!(
                        "replica: {} resyncs stream {stream:x} from record {q}",
                        self.peer
                    );
                }
                Msg::ResyncMeta { seq: q, ref data } => {
                    let Some((_, f)) = resync_db.as_mut() else {
                        return Err(self.refuse("ResyncMeta outside a resync".into()));
                    };
                    if q != next {
                        return Err(
                            self.refuse(format!("record {q} out of order (expected {next})"))
                        );
                    }
                    next += 1;
                    f.write_all(data).map_err(|e| Error::io("metadata", e))?;
                }
                Msg::ResyncMetaEnd { seq: q } => {
                    let (Some((tmp, f)), Some(o)) = (resync_db.take(), open.as_mut()) else {
                        return Err(self.refuse("ResyncMetaEnd outside a resync".into()));
                    };
                    if q != next {
                        return Err(
                            self.refuse(format!("record {q} out of order (expected {next})"))
                        );
                    }
                    next += 1;
                    f.sync_all().map_err(|e| Error::io("metadata", e))?;
                    drop(f);
                    // Close the old database before its files are replaced.
                    o.db = None;
                    remove_db(&self.p.meta);
                    std::fs::rename(&tmp, &self.p.meta).map_err(|e| Error::io("metadata", e))?;
                    sync_dir(&self.p.meta);
                    let c = open_db(&self.p.meta)?;
                    c.execute(
                        "DELETE FROM super WHERE key IN ('volume_image', 'copy_image')",
                        [],
                    )?;
                    let stream = resync_stream;
                    set_rows(
                        &c,
                        &[
                            (REPLICA_KEY, Some(want.clone())),
                            (STREAM_KEY, Some(stream.to_string())),
                            (SEQ_KEY, Some(q.to_string())),
                            (INCONSISTENT_KEY, Some("1".into())),
                        ],
                    )?;
                    let a = Applier::new(&c)?;
                    o.db = Some((c, a));
                    if rejoining {
                        // A secondary now: the marks live on in the new primary's bitmap.
                        volfile::forget_repl_bitmap(&self.p.meta)?;
                        rejoining = false;
                        log::info!(
                            "replica: {} took the database of {}: a secondary of stream {stream:x} now",
                            self.p.volume.display(),
                            self.peer
                        );
                    }
                }
                Msg::SyncBegin { stream } => {
                    if let Some(f) = self.copies {
                        f.close_gate("a full sync runs");
                    }
                    drop(open.take());
                    rejoining = false;
                    let s = self.full_sync(stream, size, &want)?;
                    open = Some(open_replica(self.p)?);
                    if let Some(f) = self.copies {
                        f.open_gate();
                    }
                    next = s + 1;
                    self.send(&Msg::Ack { seq: s })?;
                    log::info!("replica: full sync from {} done", self.peer);
                }
                // Answered, so the primary's ack reader hears from an idle link.
                Msg::Ping => self.send(&Msg::Ping)?,
                Msg::Bye => {
                    log::info!(
                        "replica: {} ended the stream at record {}",
                        self.peer,
                        next - 1
                    );
                    return Ok(());
                }
                m => {
                    let Some(o) = open.as_mut() else {
                        return Err(self.refuse(format!("{} before a full sync", kind(&m))));
                    };
                    let q = seq_of(&m)
                        .ok_or_else(|| self.refuse(format!("unexpected {}", kind(&m))))?;
                    if q != next {
                        return Err(
                            self.refuse(format!("record {q} out of order (expected {next})"))
                        );
                    }
                    next += 1;
                    // A commit changes what the frozen copies are made of: not while
                    // the copy mount serves a request from the state before it.
                    let applied = match (self.copies, &m) {
                        // The images' fsync first, outside the gate: only the database
                        // transaction waits for (and holds off) copy-mount requests.
                        (Some(f), Msg::Commit { .. }) => {
                            sync_images(o).and_then(|()| f.change(|| apply(o, &m, size)))
                        }
                        _ => apply(o, &m, size),
                    };
                    if let Err(e) = applied {
                        let reason = format!("applying record {q} failed: {e}");
                        return Err(self.refuse(reason));
                    }
                    if matches!(
                        m,
                        Msg::Sync { .. } | Msg::Commit { .. } | Msg::ResyncEnd { .. }
                    ) {
                        self.send(&Msg::Ack { seq: q })?;
                    }
                    if matches!(m, Msg::ResyncEnd { .. }) {
                        log::info!("replica: resync from {} done at record {q}", self.peer);
                        if let Some(f) = self.copies {
                            f.open_gate();
                        }
                    }
                }
            }
        }
    }

    fn full_sync(&mut self, stream: u64, size: u64, uuid: &str) -> Result<u64> {
        if stream == 0 {
            return Err(self.refuse("full sync with stream 0".into()));
        }
        log::info!("replica: full sync from {} begins", self.peer);
        remove_db(&self.p.meta);
        // An old primary's bitmap (served with --rejoin) means nothing from here.
        volfile::forget_repl_bitmap(&self.p.meta)?;
        sync_dir(&self.p.meta);
        let vol = blank_image(&self.p.volume, size, "volume")?;
        let copy = blank_image(&self.p.copy, size, "copy image")?;
        let mut tmp = self.p.meta.as_os_str().to_owned();
        tmp.push(".repl-sync.tmp");
        let tmp = PathBuf::from(tmp);
        let mut db = std::fs::File::create(&tmp).map_err(|e| Error::io("metadata", e))?;
        let seq = loop {
            match proto::recv(&mut self.r)? {
                Msg::Chunk { image, off, data } => {
                    if off.checked_add(data.len() as u64).is_none_or(|e| e > size) {
                        return Err(self.refuse(format!("chunk at {off} beyond the volume")));
                    }
                    match image {
                        Image::Volume => vol.write_at(off, &data)?,
                        Image::Copy => copy.write_at(off, &data)?,
                    }
                }
                Msg::MetaChunk { data } => {
                    db.write_all(&data).map_err(|e| Error::io("metadata", e))?;
                }
                Msg::SyncEnd { seq } => break seq,
                m => return Err(self.refuse(format!("{} inside a full sync", kind(&m)))),
            }
        };
        vol.sync()?;
        copy.sync()?;
        db.sync_all().map_err(|e| Error::io("metadata", e))?;
        drop(db);
        std::fs::rename(&tmp, &self.p.meta).map_err(|e| Error::io("metadata", e))?;
        sync_dir(&self.p.meta);
        let c = open_db(&self.p.meta)?;
        let tx = c.unchecked_transaction()?;
        // Where the primary's images were moved to (`pairfs migrate`) names the
        // primary's files: the secondary's images are beside its metadata.
        tx.execute(
            "DELETE FROM super WHERE key IN ('volume_image', 'copy_image')",
            [],
        )?;
        for (k, v) in [
            (REPLICA_KEY, uuid.to_string()),
            (STREAM_KEY, stream.to_string()),
            (SEQ_KEY, seq.to_string()),
        ] {
            tx.execute(
                "INSERT OR REPLACE INTO super(key, value) VALUES (?1, ?2)",
                [k, &v],
            )?;
        }
        tx.commit()?;
        Ok(seq)
    }
}

fn kind(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::Challenge { .. } => "Challenge",
        Msg::Auth { .. } => "Auth",
        Msg::Welcome { .. } => "Welcome",
        Msg::Refuse { .. } => "Refuse",
        Msg::SyncBegin { .. } => "SyncBegin",
        Msg::Chunk { .. } => "Chunk",
        Msg::MetaChunk { .. } => "MetaChunk",
        Msg::SyncEnd { .. } => "SyncEnd",
        Msg::Write { .. } => "Write",
        Msg::Discard { .. } => "Discard",
        Msg::Sync { .. } => "Sync",
        Msg::Flush { .. } => "Flush",
        Msg::ResyncBegin { .. } => "ResyncBegin",
        Msg::ResyncMeta { .. } => "ResyncMeta",
        Msg::ResyncMetaEnd { .. } => "ResyncMetaEnd",
        Msg::ResyncEnd { .. } => "ResyncEnd",
        Msg::Commit { .. } => "Commit",
        Msg::Ack { .. } => "Ack",
        Msg::RejoinMark { .. } => "RejoinMark",
        Msg::RejoinEnd { .. } => "RejoinEnd",
        Msg::Ping => "Ping",
        Msg::Bye => "Bye",
    }
}

fn seq_of(m: &Msg) -> Option<u64> {
    match m {
        Msg::Write { seq, .. }
        | Msg::Discard { seq, .. }
        | Msg::Sync { seq }
        | Msg::Flush { seq }
        | Msg::ResyncEnd { seq }
        | Msg::Commit { seq, .. } => Some(*seq),
        _ => None,
    }
}

fn apply(o: &mut Open, m: &Msg, size: u64) -> Result<()> {
    let check = |off: u64, len: u64| -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::Corrupt(format!(
                "range {off}+{len} beyond the volume ({size} bytes)"
            )));
        }
        Ok(())
    };
    match m {
        Msg::Write {
            image, off, data, ..
        } => {
            check(*off, data.len() as u64)?;
            o.dirty[*image as usize] = true;
            image_of(o, *image).write_at(*off, data)
        }
        Msg::Discard {
            image, off, len, ..
        } => {
            check(*off, *len)?;
            o.dirty[*image as usize] = true;
            image_of(o, *image).discard(*off, *len)
        }
        Msg::Flush { .. } => sync_images(o),
        Msg::Sync { seq } => {
            sync_images(o)?;
            // During a resync of a secondary that had no database yet there is none to
            // record it in: a crash then leaves no volume, and the next link resyncs all.
            if let Some((c, _)) = &o.db {
                c.execute(
                    "INSERT OR REPLACE INTO super(key, value) VALUES (?1, ?2)",
                    [SEQ_KEY, &seq.to_string()],
                )?;
            }
            Ok(())
        }
        Msg::ResyncEnd { seq } => {
            sync_images(o)?;
            let Some((c, _)) = &o.db else {
                return Err(Error::Corrupt("ResyncEnd before the database".into()));
            };
            set_rows(
                c,
                &[(INCONSISTENT_KEY, None), (SEQ_KEY, Some(seq.to_string()))],
            )
        }
        Msg::Commit { seq, rows } => {
            sync_images(o)?;
            let Some((c, applier)) = &o.db else {
                return Err(Error::Corrupt("Commit before the database".into()));
            };
            let tx = c.unchecked_transaction()?;
            applier.apply(&tx, rows)?;
            tx.execute(
                "INSERT OR REPLACE INTO super(key, value) VALUES (?1, ?2)",
                [SEQ_KEY, &seq.to_string()],
            )?;
            tx.commit()?;
            Ok(())
        }
        _ => Err(Error::Corrupt("not a stream record".into())),
    }
}

/// fsync of the images written since their last fsync.
fn sync_images(o: &mut Open) -> Result<()> {
    if o.dirty[0] {
        o.vol.sync()?;
        o.dirty[0] = false;
    }
    if o.dirty[1] {
        o.copy.sync()?;
        o.dirty[1] = false;
    }
    Ok(())
}

fn image_of(o: &Open, i: Image) -> &FileVolume {
    match i {
        Image::Volume => &o.vol,
        Image::Copy => &o.copy,
    }
}

/// `pairfs replica serve VOLUME --listen ADDR --key-file FILE`: serves primaries one
/// at a time until killed. Every error of a connection (garbage, wrong key, a failed
/// apply) ends that connection only.
///
/// `rejoin`: VOLUME may be an old primary (after `replica promote` of its secondary):
/// it is taken over by the new primary, by its out-of-sync bitmap if that lines up with
/// the new primary's, else by a full sync.
///
/// `copies` (`--copy-mount`): called once the volume is locked and checked, with the
/// source the copy mount serves from; it mounts it.
pub fn serve(
    volume: &Path,
    listen: &str,
    key: &Key,
    rejoin: bool,
    copies: Option<&dyn Fn(Arc<Follower>) -> Result<()>>,
) -> Result<()> {
    let p = Paths::new(volume, None, None);
    let _lock = volfile::lock_volume(&p, true).map_err(|_| {
        Error::Locked(format!(
            "{} is in use (mounted, or served by another pairfs replica serve)",
            p.volume.display()
        ))
    })?;
    let state = local_state(&p, rejoin)?;
    if let Local::Foreign(u) = &state {
        return Err(Error::invalid(format!(
            "{} is volume {u} with data and not a replica: refusing to serve it as a secondary \
             (an old primary whose secondary was promoted: serve it with --rejoin)",
            p.volume.display()
        )));
    }
    let l = TcpListener::bind(listen).map_err(|e| Error::io("replica listen", e))?;
    let follower = match copies {
        Some(mount) => {
            let closed = match &state {
                Local::Replica {
                    inconsistent: false,
                    ..
                } => None,
                Local::Replica { .. } => Some("an online resync is not finished"),
                Local::Fresh(_) => Some("no full sync yet"),
                _ => Some("an old primary rejoining: served once it is a replica in sync"),
            };
            let f = Follower::new(p.clone(), closed);
            mount(f.clone())?;
            Some(f)
        }
        None => None,
    };
    log::info!(
        "replica: serving {} on {} ({})",
        p.volume.display(),
        l.local_addr()
            .map_or_else(|_| listen.to_string(), |a| a.to_string()),
        match &state {
            Local::Rejoin { stream, floor, .. } => format!(
                "an old primary of stream {stream:x}, acked up to record {floor}, rejoining"
            ),
            s => format!("{s:?}"),
        }
    );
    eprintln!("pairfs replica: listening on {listen}");
    let active = std::sync::Mutex::new(());
    std::thread::scope(|sc| {
        for s in l.incoming() {
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("replica: accept: {e}");
                    continue;
                }
            };
            let peer = s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
            let _ = s.set_nodelay(true);
            let (r, w) = match s.try_clone() {
                Ok(w) => (s, w),
                Err(e) => {
                    log::warn!("replica: {e}");
                    continue;
                }
            };
            let mut c = Conn {
                p: &p,
                key,
                active: &active,
                rejoin,
                r: BufReader::with_capacity(1 << 20, r),
                w: BufWriter::new(w),
                peer: peer.clone(),
                copies: follower.as_ref(),
                authed: false,
                refused: false,
            };
            let spawned = std::thread::Builder::new()
                .name("pairfs-replica".into())
                .spawn_scoped(sc, move || {
                    if let Err(e) = c.run() {
                        // A failure of this side's storage after the handshake (opening
                        // the replica or recording a resync on a disk that fails with
                        // EIO or went read-only): told to the primary, as a failed apply
                        // is, so that its status says why. Not link or protocol errors.
                        if c.authed
                            && !c.refused
                            && !matches!(
                                e,
                                Error::Invalid(_)
                                    | Error::Io {
                                        what: "replica link",
                                        ..
                                    }
                            )
                        {
                            let _ = c.refuse(e.to_string());
                        }
                        log::warn!("replica: connection from {peer} ended: {e}");
                    }
                });
            if let Err(e) = spawned {
                log::warn!("replica: thread: {e}");
            }
        }
    });
    Ok(())
}

/// `pairfs replica promote VOLUME`: the secondary becomes an ordinary volume.
pub fn promote(volume: &Path) -> Result<String> {
    let p = Paths::new(volume, None, None);
    let _lock = volfile::lock_volume(&p, true).map_err(|_| {
        Error::Locked(format!(
            "{} is in use (stop pairfs replica serve first)",
            p.volume.display()
        ))
    })?;
    if !p.meta.exists() {
        return Err(Error::NotFound(format!(
            "{} (no full sync reached this secondary)",
            p.meta.display()
        )));
    }
    let c = open_db(&p.meta)?;
    let Some(of) = super_row(&c, REPLICA_KEY)? else {
        return Err(Error::invalid(format!(
            "{} is not a replica",
            p.volume.display()
        )));
    };
    if super_row(&c, INCONSISTENT_KEY)?.is_some() {
        return Err(Error::invalid(format!(
            "{} was cut during a resync: its images are not consistent with its metadata; \
             let the primary finish the resync (serve it again) before promoting",
            p.volume.display()
        )));
    }
    let seq = num(&c, SEQ_KEY).unwrap_or(0);
    let stream = num(&c, STREAM_KEY).unwrap_or(0);
    // From here every write is to be marked (the volume mounted with --replica to the
    // old primary, served with --rejoin, resyncs by bitmap): the bitmap starts at the
    // last record this volume holds of the stream, empty, before it is a primary.
    let rejoin = if stream != 0 {
        let uuid = super_row(&c, "uuid")?.unwrap_or_default();
        let u = uuid::Uuid::parse_str(&uuid)
            .map_err(|_| Error::Corrupt(format!("volume uuid {uuid:?}")))?;
        let (size, ts) = (num(&c, "volume_size")?, num(&c, "track_size")?);
        let unit = crate::repl::link::unit_for(size, ts);
        let (b, _) = crate::repl::bitmap::Bitmap::open(&p.meta, *u.as_bytes(), size, unit)?;
        b.checkpoint(true, &|| crate::repl::bitmap::Target {
            stream,
            floor: seq,
            ..Default::default()
        })?;
        drop(b);
        "; the old primary rejoins by bitmap if this volume is mounted only with --replica \
         to it (`pairfs replica serve OLD --rejoin`) from now on"
            .to_string()
    } else {
        String::new()
    };
    let tx = c.unchecked_transaction()?;
    for k in [REPLICA_KEY, STREAM_KEY, SEQ_KEY, INCONSISTENT_KEY] {
        tx.execute("DELETE FROM super WHERE key = ?1", [k])?;
    }
    tx.commit()?;
    Ok(format!(
        "promoted {}: replica of {of} at record {seq}; it now mounts read-write{rejoin}",
        p.volume.display()
    ))
}
