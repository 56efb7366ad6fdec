//! The primary's side of a replica link: the record stream, the image wrapper that
//! feeds it, the durability sink that waits for acks, reconnection and replay.
//!
//! Every change the primary makes durable becomes a numbered **record** in one stream,
//! in the order the primary made it: image writes and discards ([`Tapped`], under a
//! per-track stripe lock so two writes to the same bytes enter the stream in the order
//! they reached the image), syncs ([`Sink::sync_data`], one per durability point) and
//! committed metadata transactions (`LinkTap`, under the metadata lock, so in commit
//! order). Records are kept, encoded, until the secondary acknowledges them; an ack of
//! record N means every record up to N is durable on the secondary (it fsyncs its
//! images and commits `repl_seq = N` before acking), so after a lost connection the
//! link reconnects and replays from the secondary's `repl_seq + 1`.
//!
//! `sync` mode: a durability point returns only once its record is acked. `async`:
//! it returns at once; the stream drains behind. While disconnected, `block` makes
//! durability points (and writers, once 256 MiB are buffered) wait for the link;
//! `continue` lets them return and keeps buffering; past the buffer the link drops the
//! stream and is *out of sync*: written blocks are marked (`Oos`) and resynced online
//! once the secondary is back (`Link::resync`; every block if the secondary cannot
//! continue the stream).
//!
//! The first connection of a mount sends a **full sync** (both images, skipping
//! all-zero MiBs, and a `VACUUM INTO` copy of the database) before the volume is
//! served, so nothing changes under it.

use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::core::durability::{Attach, DurabilitySink};
use crate::error::{Error, Result};
use crate::meta::{CommitTap, Meta};
use crate::repl::bitmap::{self, Bitmap};
use crate::repl::capture;
use crate::repl::proto::{self, Image, Key, MAX_DATA, Msg, VERSION};
use crate::store::volume::Volume;

/// `sync` or `async`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Durability points wait for the secondary's ack.
    Sync,
    /// They do not.
    Async,
}

/// What a lost link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Durability points wait for the link to come back.
    Block,
    /// The primary goes on; the stream is buffered, then dropped (out of sync).
    Continue,
}

/// How to reach the secondary.
#[derive(Debug)]
pub struct Config {
    /// `HOST:PORT`.
    pub addr: String,
    /// The shared key.
    pub key: Key,
    /// `sync` or `async`.
    pub mode: Mode,
    /// `block` or `continue`.
    pub on_disconnect: OnDisconnect,
}

/// `super` rows of a primary that stopped cleanly with its secondary in sync: the
/// secondary's stream and last record. The next mount with `--replica` resumes that
/// stream instead of a full sync if the secondary reports exactly this point.
pub const RESUME_STREAM: &str = crate::core::volfile::RESUME_KEYS[0];
/// See [`RESUME_STREAM`].
pub const RESUME_SEQ: &str = crate::core::volfile::RESUME_KEYS[1];

/// Records buffered before writers wait (`block`, or while connected) or the stream is
/// dropped (`continue`, disconnected).
const BUFFER: u64 = 256 << 20;

/// A `Sync` record is added after this many bytes of writes without one.
const ACK_EVERY: u64 = 32 << 20;

/// A buffered record: number, encoded frame, the image range it writes (to mark it
/// out of sync if the record is dropped).
struct Rec {
    seq: u64,
    frame: Arc<Vec<u8>>,
    range: Option<(Image, u64, u64)>,
}

/// A connected, authenticated secondary and what its `Welcome` said.
struct Peer {
    s: TcpStream,
    stream: u64,
    seq: u64,
    inconsistent: bool,
    /// An old primary rejoining (`replica serve --rejoin`): its out-of-sync marks.
    rejoin: Option<Oos>,
}

/// Tracks out of sync (changed on the primary and not sent), per image.
#[derive(Default, Clone)]
struct Oos {
    /// Every track (the secondary's stream is unknown or its resync was cut).
    all: bool,
    bits: [Vec<u64>; 2],
    count: u64,
}

impl Oos {
    fn mark(&mut self, image: Image, first: u64, last: u64, tracks: u64) {
        let b = &mut self.bits[image as usize];
        if b.is_empty() {
            b.resize(tracks.div_ceil(64) as usize, 0);
        }
        for t in first..=last.min(tracks.saturating_sub(1)) {
            let (w, m) = ((t / 64) as usize, 1u64 << (t % 64));
            if b[w] & m == 0 {
                b[w] |= m;
                self.count += 1;
            }
        }
    }

    /// Adds `o`'s marks (per unit bits of the same geometry).
    fn merge(&mut self, o: &Oos) {
        self.all |= o.all;
        for i in 0..2 {
            let (a, b) = (&mut self.bits[i], &o.bits[i]);
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x |= *y;
            }
        }
        self.count = self
            .bits
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum();
    }
}

struct State {
    stream: u64,
    next_seq: u64,
    /// Records not yet acked.
    buf: VecDeque<Rec>,
    buf_bytes: u64,
    /// Highest record written on the current connection.
    sent: u64,
    acked: u64,
    connected: bool,
    /// The stream was dropped (continue mode over the buffer, or the secondary diverged):
    /// writes only mark `oos` until a reconnection resyncs them.
    out_of_sync: bool,
    oos: Oos,
    /// A resync is running: tracks left to send.
    resync_left: Option<u64>,
    /// The marks a resync took, until its `ResyncEnd` is acked (the persistent bitmap
    /// keeps them; a dropped stream puts them back).
    resync_marks: Option<Oos>,
    /// The `ResyncEnd` record of that resync, once pushed.
    resync_end: u64,
    /// Image ranges of acked records not yet durable on the primary's own image (a
    /// power loss could undo them there): their regions stay in the activity log.
    acked_unsynced: Vec<(u64, Image, u64, u64)>,
    /// Per image: every record below this number that writes it is durable locally.
    local_durable: [u64; 2],
    /// Bumped whenever the stream is dropped (a running resync stops).
    drops: u64,
    /// The link ended with every record acked and `Bye` sent: the secondary holds exactly
    /// the primary's volume (recorded for the next mount, [`RESUME_STREAM`]).
    clean_end: bool,
    /// Mounted while the secondary was unreachable: where the secondary stands in
    /// `stream` past `acked` (the bitmap's floor) is unknown, so a secondary of this
    /// stream at any record from `acked` on lacks only the marked blocks.
    tip_unknown: bool,
    dropped_bytes: u64,
    /// Bytes of records acked since mount.
    acked_bytes: u64,
    /// Bytes pushed since the last record the secondary acks.
    since_ack_point: u64,
    /// The last record pushed that the secondary acks (`Sync`, `Commit`, `ResyncEnd`).
    ack_point: u64,
    closing: bool,
    last_error: Option<String>,
    reconnects: u64,
}

impl State {
    /// The stream goes on at record `seq` of `stream`, where the secondary is: nothing
    /// before it is owed, the next record is `seq + 1`.
    fn resume_at(&mut self, stream: u64, seq: u64) {
        self.stream = stream;
        self.next_seq = seq + 1;
        self.acked = seq;
        self.sent = seq;
        self.connected = true;
    }

    /// Appends a `Sync` record (one the secondary acks), so the buffer ahead of it can
    /// drain.
    fn push_sync(&mut self) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = Arc::new(proto::frame(&Msg::Sync { seq }));
        self.buf_bytes += frame.len() as u64;
        self.buf.push_back(Rec {
            seq,
            frame,
            range: None,
        });
        self.since_ack_point = 0;
        self.ack_point = seq;
    }
}

/// The link (shared by the image wrappers, the tap, the sink and its threads).
pub struct Link {
    cfg: Config,
    uuid: [u8; 16],
    size: u64,
    track_size: u64,
    /// The out-of-sync bitmap's unit: 4 KiB, or larger so a bitmap stays within 16 MiB
    /// per image; a divisor of the track size.
    unit: u64,
    st: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
    /// Records buffered before writers wait or the stream is dropped.
    buffer: u64,
    /// The images (for a resync: read a track under its stripe lock).
    taps: Mutex<Vec<Arc<TapShared>>>,
    /// The metadata store (for a resync's copy of the database).
    meta: std::sync::OnceLock<Arc<Mutex<Meta>>>,
    meta_path: std::path::PathBuf,
    /// The persistent out-of-sync bitmap and activity log (`repl::bitmap`).
    bitmap: Bitmap,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv
            .wait_timeout(g, Duration::from_millis(200))
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    /// Out-of-sync units of an image.
    fn units(&self) -> u64 {
        self.size.div_ceil(self.unit)
    }

    fn mark(&self, g: &mut State, image: Image, off: u64, len: u64) {
        let first = off / self.unit;
        let last = (off + len.max(1) - 1) / self.unit;
        g.oos.mark(image, first, last, self.units());
    }

    /// Drops the stream: every buffered record's range becomes out of sync.
    fn drop_stream(&self, g: &mut State, why: &str) {
        log::error!(
            "replica {}: {why}: dropping the stream ({} MiB buffered); the changed tracks are \
             resynced when the secondary is reachable",
            self.cfg.addr,
            g.buf_bytes >> 20
        );
        g.out_of_sync = true;
        g.drops += 1;
        g.resync_left = None;
        // A resync cut short: its marks are out of sync again.
        if let Some(m) = g.resync_marks.take() {
            g.oos.merge(&m);
        }
        g.resync_end = 0;
        g.dropped_bytes += g.buf_bytes;
        let recs: Vec<Rec> = g.buf.drain(..).collect();
        for r in recs {
            if let Some((i, o, l)) = r.range {
                self.mark(g, i, o, l);
            }
        }
        g.buf_bytes = 0;
        // Keep the cause (the secondary's refusal, the link's error) beside it.
        g.last_error = Some(match g.last_error.take() {
            Some(e) if !e.starts_with(why) => format!("{why} (after: {e})"),
            Some(e) => e,
            None => why.to_string(),
        });
        self.cv.notify_all();
    }

    /// Appends one record made by `make(seq)`; returns its number. `range` is the image
    /// range it writes, if any.
    fn push(&self, make: &dyn Fn(u64) -> Msg, range: Option<(Image, u64, u64)>) -> u64 {
        self.push_in(self.lock(), make, range).1
    }

    /// [`Link::push`] with the state already locked (given back).
    fn push_in<'a>(
        &self,
        mut g: MutexGuard<'a, State>,
        make: &dyn Fn(u64) -> Msg,
        range: Option<(Image, u64, u64)>,
    ) -> (MutexGuard<'a, State>, u64) {
        loop {
            if g.out_of_sync || g.closing {
                let seq = g.next_seq;
                g.next_seq += 1;
                if let Some((i, o, l)) = range {
                    self.mark(&mut g, i, o, l);
                }
                g.dropped_bytes += proto::encode(&make(seq)).len() as u64;
                return (g, seq);
            }
            if g.buf_bytes < self.buffer {
                break;
            }
            if !g.connected && self.cfg.on_disconnect == OnDisconnect::Continue {
                self.drop_stream(&mut g, "link down and the buffer full");
                continue;
            }
            if g.since_ack_point > 0 {
                // The buffer drains only by acks: end it with a record that gets one.
                g.push_sync();
                self.cv.notify_all();
            }
            g = self.wait(g);
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        let m = make(seq);
        let acked = matches!(
            m,
            Msg::Sync { .. } | Msg::Commit { .. } | Msg::ResyncEnd { .. }
        );
        let f = Arc::new(proto::frame(&m));
        let n = f.len() as u64;
        g.buf_bytes += n;
        g.buf.push_back(Rec {
            seq,
            frame: f,
            range,
        });
        g.since_ack_point = if acked { 0 } else { g.since_ack_point + n };
        if acked {
            g.ack_point = seq;
        }
        if g.since_ack_point > ACK_EVERY.min(self.buffer / 4) {
            // Writes without a durability point (async mode, or long runs between
            // fsyncs) still get acked, so the buffer drains.
            g.push_sync();
        }
        self.cv.notify_all();
        (g, seq)
    }

    /// Waits (in `sync` mode) until record `seq` is acked, within the disconnect policy.
    fn wait_acked(&self, seq: u64) -> Result<()> {
        if self.cfg.mode == Mode::Async {
            return Ok(());
        }
        let mut g = self.lock();
        loop {
            if g.acked >= seq || g.out_of_sync {
                return Ok(());
            }
            if g.closing && !g.connected {
                return Err(Error::io(
                    "replica link",
                    std::io::Error::other("the link closed before the secondary acknowledged"),
                ));
            }
            if !g.connected && self.cfg.on_disconnect == OnDisconnect::Continue {
                return Ok(());
            }
            g = self.wait(g);
        }
    }

    /// One status line for `pairfs status` (`user.pairfs.replica`).
    pub fn status_line(&self) -> String {
        let g = self.lock();
        let state = if g.out_of_sync {
            "out_of_sync"
        } else if g.resync_left.is_some() {
            "resyncing"
        } else if g.connected {
            if g.buf.is_empty() {
                "in_sync"
            } else {
                "connected"
            }
        } else {
            "disconnected"
        };
        let mut s = format!(
            "{state} peer={} mode={} on_disconnect={} queued_bytes={} queued_records={} out_of_sync_bytes={} out_of_sync_blocks={} resync_blocks_left={} block_size={} acked_seq={} next_seq={} acked_bytes={} reconnects={}",
            self.cfg.addr,
            if self.cfg.mode == Mode::Sync {
                "sync"
            } else {
                "async"
            },
            if self.cfg.on_disconnect == OnDisconnect::Block {
                "block"
            } else {
                "continue"
            },
            g.buf_bytes,
            g.buf.len(),
            g.dropped_bytes,
            if g.oos.all {
                2 * self.units()
            } else {
                g.oos.count
            },
            g.resync_left.unwrap_or(0),
            self.unit,
            g.acked,
            g.next_seq,
            g.acked_bytes,
            g.reconnects,
        );
        let (syncs, write_syncs) = self.bitmap.syncs();
        s.push_str(&format!(
            " bitmap_syncs={syncs} bitmap_write_syncs={write_syncs} bitmap_regions={}",
            self.bitmap.logged_regions()
        ));
        if let Some(e) = &g.last_error {
            s.push_str(&format!(" error={e:?}"));
        }
        s.push('\n');
        s
    }

    /// Connects and authenticates; returns the stream and the secondary's position (and,
    /// from a rejoining old primary, its out-of-sync marks).
    fn connect(&self) -> Result<Peer> {
        let mut s = TcpStream::connect(&self.cfg.addr)
            .map_err(|e| Error::io("replica link (connect)", e))?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| Error::io("replica link", e))?;
        let np = proto::nonce()?;
        proto::send(
            &mut s,
            &Msg::Hello {
                version: VERSION,
                nonce: np,
                uuid: self.uuid,
                size: self.size,
                track_size: self.track_size,
            },
        )?;
        let refused =
            |r: String| Error::invalid(format!("replica {}: refused: {r}", self.cfg.addr));
        let (ns, mac) = match proto::recv_max(&mut s, proto::MAX_HANDSHAKE)? {
            Msg::Challenge {
                version,
                nonce,
                mac,
            } => {
                if version != VERSION {
                    return Err(refused(format!(
                        "it speaks protocol version {version}, this primary {VERSION}"
                    )));
                }
                (nonce, mac)
            }
            Msg::Refuse { reason } => return Err(refused(reason)),
            m => return Err(refused(format!("unexpected answer {m:?}"))),
        };
        if !self.cfg.key.verify_s(&np, &ns, &self.uuid, &mac) {
            let _ = proto::send(
                &mut s,
                &Msg::Refuse {
                    reason: "authentication failed: the secondary does not have this key".into(),
                },
            );
            return Err(Error::invalid(format!(
                "replica {}: authentication failed: the secondary does not have this key \
                 (wrong --key-file on one side)",
                self.cfg.addr
            )));
        }
        proto::send(
            &mut s,
            &Msg::Auth {
                mac: self.cfg.key.mac_p(&np, &ns, &self.uuid),
            },
        )?;
        match proto::recv_max(&mut s, proto::MAX_HANDSHAKE)? {
            Msg::Welcome {
                stream,
                seq,
                inconsistent,
                rejoin,
            } => {
                let rejoin = if rejoin {
                    Some(self.read_rejoin_marks(&mut s)?)
                } else {
                    None
                };
                Ok(Peer {
                    s,
                    stream,
                    seq,
                    inconsistent,
                    rejoin,
                })
            }
            Msg::Refuse { reason } => Err(refused(reason)),
            m => Err(refused(format!("unexpected answer {m:?}"))),
        }
    }

    /// A rejoining old primary's marks (`RejoinMark`s up to `RejoinEnd`), as units.
    fn read_rejoin_marks(&self, s: &mut TcpStream) -> Result<Oos> {
        let mut marks = Oos::default();
        let mut n = 0u64;
        loop {
            match proto::recv(s)? {
                Msg::RejoinMark { image, off, len } => {
                    if len == 0 || off.checked_add(len).is_none_or(|e| e > self.size) {
                        return Err(Error::invalid(format!(
                            "replica {}: rejoin mark {off}+{len} beyond the volume",
                            self.cfg.addr
                        )));
                    }
                    marks.mark(
                        image,
                        off / self.unit,
                        (off + len - 1) / self.unit,
                        self.units(),
                    );
                    n += 1;
                }
                Msg::RejoinEnd { count } if count == n => return Ok(marks),
                m => {
                    return Err(Error::invalid(format!(
                        "replica {}: unexpected message among the rejoin marks: {m:?}",
                        self.cfg.addr
                    )));
                }
            }
        }
    }

    /// Sends both images and the database; the stream starts after it.
    fn full_sync(
        &self,
        s: &mut TcpStream,
        meta: &Meta,
        meta_path: &std::path::Path,
        vol: &dyn Volume,
        copy: &dyn Volume,
    ) -> Result<u64> {
        let stream = loop {
            let n = proto::nonce()?;
            let v = u64::from_le_bytes([n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]]);
            if v != 0 {
                break v;
            }
        };
        let t0 = Instant::now();
        let mut w = BufWriter::with_capacity(
            1 << 20,
            s.try_clone().map_err(|e| Error::io("replica link", e))?,
        );
        proto::send(&mut w, &Msg::SyncBegin { stream })?;
        let mut sent = 0u64;
        let step = 1u64 << 20;
        let mut buf = vec![0u8; step as usize];
        for (img, v) in [(Image::Volume, vol), (Image::Copy, copy)] {
            // Holes (and all-zero MiBs) are not sent: the secondary starts from zeros.
            let mut off = 0;
            while let Some((start, end)) = v.data_after(off) {
                let end = end.min(self.size);
                off = start;
                while off < end {
                    let n = step.min(end - off) as usize;
                    v.read_at(off, &mut buf[..n])?;
                    if buf[..n].iter().any(|b| *b != 0) {
                        proto::send(
                            &mut w,
                            &Msg::Chunk {
                                image: img,
                                off,
                                data: buf[..n].to_vec(),
                            },
                        )?;
                        sent += n as u64;
                    }
                    off += n as u64;
                }
                if off >= self.size {
                    break;
                }
            }
        }
        let mut tmp = meta_path.as_os_str().to_owned();
        tmp.push(".repl-sync.tmp");
        let tmp = std::path::PathBuf::from(tmp);
        meta.snapshot_to(&tmp)?;
        let db = std::fs::read(&tmp).map_err(|e| Error::io("metadata", e));
        let _ = std::fs::remove_file(&tmp);
        let db = db?;
        for c in db.chunks(MAX_DATA) {
            proto::send(&mut w, &Msg::MetaChunk { data: c.to_vec() })?;
        }
        sent += db.len() as u64;
        proto::send(&mut w, &Msg::SyncEnd { seq: 0 })?;
        w.flush().map_err(|e| Error::io("replica link", e))?;
        drop(w);
        s.set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(|e| Error::io("replica link", e))?;
        match proto::recv(s)? {
            Msg::Ack { seq: 0 } => {}
            Msg::Refuse { reason } => {
                return Err(Error::invalid(format!(
                    "replica {}: full sync refused: {reason}",
                    self.cfg.addr
                )));
            }
            m => {
                return Err(Error::invalid(format!(
                    "replica {}: unexpected answer to the full sync: {m:?}",
                    self.cfg.addr
                )));
            }
        }
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| Error::io("replica link", e))?;
        log::info!(
            "replica {}: full sync done: {} MiB sent in {:.1} s",
            self.cfg.addr,
            sent >> 20,
            t0.elapsed().as_secs_f64()
        );
        Ok(stream)
    }

    /// Runs one connection: an ack reader thread and the sender (this thread) until
    /// either fails or the link closes.
    fn run_connection(self: &Arc<Self>, s: TcpStream) {
        let r = match s.try_clone() {
            Ok(r) => r,
            Err(e) => {
                self.lock().last_error = Some(e.to_string());
                return;
            }
        };
        let me = self.clone();
        let reader = std::thread::Builder::new()
            .name("pairfs-repl-ack".into())
            .spawn(move || me.read_acks(r));
        let mut w = BufWriter::with_capacity(1 << 20, &s);
        let mut last_send = Instant::now();
        let link_err = |e: std::io::Error| Some(e.to_string());
        let err: Option<String> = loop {
            let item = {
                let mut g = self.lock();
                if !g.connected {
                    break g.last_error.clone();
                }
                // Records in `buf` are numbered without gaps from the oldest unacked one.
                let next = g.buf.front().and_then(|first| {
                    let i = (g.sent + 1).checked_sub(first.seq)? as usize;
                    g.buf.get(i).map(|r| (r.seq, r.frame.clone()))
                });
                if let Some((q, _)) = &next {
                    g.sent = *q;
                }
                next
            };
            if let Some((_, f)) = item {
                if let Err(e) = w.write_all(&f) {
                    break link_err(e);
                }
                last_send = Instant::now();
                continue;
            }
            if let Err(e) = w.flush() {
                break link_err(e);
            }
            let mut g = self.lock();
            let all_sent = g.buf.back().is_none_or(|r| r.seq <= g.sent);
            if g.closing && all_sent {
                // Every record is sent: wait for the last ack, then say goodbye.
                let until = Instant::now() + Duration::from_secs(30);
                while !g.buf.is_empty() && g.connected && Instant::now() < until {
                    g = self.wait(g);
                }
                let all_acked = g.buf.is_empty() && !g.out_of_sync && g.resync_left.is_none();
                drop(g);
                let bye = proto::send(&mut w, &Msg::Bye)
                    .and_then(|_| w.flush().map_err(|e| Error::io("replica link", e)));
                if all_acked && bye.is_ok() {
                    self.lock().clean_end = true;
                }
                break None;
            }
            if all_sent && g.connected {
                g = self.wait(g);
            }
            drop(g);
            if last_send.elapsed() > Duration::from_secs(5) {
                if let Err(e) = proto::send(&mut w, &Msg::Ping) {
                    break Some(e.to_string());
                }
                last_send = Instant::now();
            }
        };
        drop(w);
        let _ = s.shutdown(Shutdown::Both);
        if let Ok(h) = reader {
            let _ = h.join();
        }
        let mut g = self.lock();
        g.connected = false;
        if let Some(e) = err {
            g.last_error = Some(e);
        }
        self.cv.notify_all();
    }

    fn read_acks(&self, mut r: TcpStream) {
        loop {
            match proto::recv(&mut r) {
                Ok(Msg::Ack { seq }) => {
                    let mut g = self.lock();
                    if seq > g.acked {
                        g.acked = seq;
                    }
                    while g.buf.front().is_some_and(|r| r.seq <= seq) {
                        if let Some(r) = g.buf.pop_front() {
                            g.buf_bytes -= r.frame.len() as u64;
                            g.acked_bytes += r.frame.len() as u64;
                            if let Some((i, o, l)) = r.range
                                && r.seq >= g.local_durable[i as usize]
                            {
                                g.acked_unsynced.push((r.seq, i, o, l));
                            }
                        }
                    }
                    if g.resync_end != 0 && seq >= g.resync_end {
                        g.resync_marks = None;
                        g.resync_end = 0;
                    }
                    self.cv.notify_all();
                }
                Ok(Msg::Refuse { reason }) => {
                    log::error!("replica {}: the secondary stopped: {reason}", self.cfg.addr);
                    let mut g = self.lock();
                    g.connected = false;
                    g.last_error = Some(reason);
                    self.cv.notify_all();
                    let _ = r.shutdown(Shutdown::Both);
                    return;
                }
                Ok(Msg::Ping) => {}
                Ok(m) => {
                    log::error!("replica {}: unexpected message {m:?}", self.cfg.addr);
                }
                Err(e) => {
                    let mut g = self.lock();
                    if g.connected && !g.closing {
                        log::warn!("replica {}: link lost: {e}", self.cfg.addr);
                    }
                    g.connected = false;
                    g.last_error.get_or_insert_with(|| e.to_string());
                    self.cv.notify_all();
                    let _ = r.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// The link thread: serves the connection made at mount, then reconnects: replays
    /// the unacked records, or resyncs the out-of-sync tracks.
    fn run(self: Arc<Self>, first: Option<TcpStream>) {
        if let Some(s) = first {
            self.run_connection(s);
        }
        let mut delay = Duration::from_millis(200);
        while !self.stop.load(Ordering::Acquire) {
            {
                let g = self.lock();
                if g.closing && (g.buf.is_empty() || g.out_of_sync) {
                    return;
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
            let Peer {
                s,
                stream,
                seq,
                inconsistent,
                rejoin,
            } = match self.connect() {
                Ok(x) => x,
                Err(e) => {
                    self.lock().last_error = Some(e.to_string());
                    continue;
                }
            };
            delay = Duration::from_millis(200);
            let mut g = self.lock();
            g.reconnects += 1;
            g.last_error = None;
            // This stream, at or past the last ack: the secondary lacks only what is
            // buffered or marked.
            // An old primary cut in its rejoin before it took the database: it lacks its
            // own marks (sent again) and what the drop puts back.
            let rejoined = rejoin.is_some() && stream == g.stream;
            let same = rejoined
                || (stream == g.stream && seq >= g.acked && (seq < g.next_seq || g.tip_unknown));
            g.tip_unknown = false;
            let replayable = same && !inconsistent && rejoin.is_none();
            if replayable && !g.out_of_sync {
                // Everything up to `seq` is durable there: replay from seq + 1.
                while g.buf.front().is_some_and(|r| r.seq <= seq) {
                    if let Some(r) = g.buf.pop_front() {
                        g.buf_bytes -= r.frame.len() as u64;
                    }
                }
                g.acked = seq;
                g.sent = seq;
                g.connected = true;
                log::info!(
                    "replica {}: reconnected; replaying {} records from {}",
                    self.cfg.addr,
                    g.buf.len(),
                    seq + 1
                );
                self.cv.notify_all();
                drop(g);
                self.run_connection(s);
                continue;
            }
            if !replayable && !g.out_of_sync {
                self.drop_stream(
                    &mut g,
                    if same {
                        "the secondary was cut in a resync"
                    } else {
                        "the secondary cannot continue this stream"
                    },
                );
            }
            if let Some(m) = rejoin.as_ref().filter(|_| rejoined) {
                let here = g.oos.count;
                g.oos.merge(m);
                log::info!(
                    "replica {}: the old primary rejoins as the secondary of stream {stream:x} (acked up to record {seq}): resync by bitmap, {} blocks ({here} changed here, {} marked there)",
                    self.cfg.addr,
                    g.oos.count,
                    m.count
                );
            }
            if !same {
                // The secondary holds another stream or lost records we count as acked:
                // every track. (One cut in a resync of this stream lacks only the marks,
                // which the drop put back, and the buffered records, which it marked.)
                g.oos.all = true;
            }
            // Resync: nothing is pending (the stream was dropped); the secondary takes the
            // stream again at `ResyncBegin`.
            g.acked = g.next_seq - 1;
            g.sent = g.acked;
            g.connected = true;
            let epoch = g.drops;
            self.cv.notify_all();
            drop(g);
            self.spawn_resync(epoch);
            self.run_connection(s);
        }
    }

    /// The mount goes on without the secondary (`continue`, unreachable at mount): out
    /// of sync from the start, relative to the persistent bitmap's stream and marks
    /// when there is one (a promoted secondary whose old primary is down: it rejoins by
    /// bitmap when it is back), else every block. The link thread connects when it can
    /// and resyncs, as after an outage.
    fn start_unreachable(&self, e: &Error, stored: Option<&bitmap::Loaded>) {
        let mut g = self.lock();
        match stored {
            Some(b) => {
                let mut marks = Oos::default();
                marks.merge(&Oos {
                    all: false,
                    bits: b.units.clone(),
                    count: 0,
                });
                log::warn!(
                    "replica {}: {e}; on disconnect continue: serving without the secondary, \
                     out of sync by the bitmap of stream {:x} from record {} ({} blocks so far)",
                    self.cfg.addr,
                    b.stream,
                    b.floor,
                    marks.count
                );
                g.stream = b.stream;
                g.next_seq = b.floor + 1;
                g.acked = b.floor;
                g.sent = b.floor;
                g.oos = marks;
                g.tip_unknown = true;
            }
            None => {
                log::warn!(
                    "replica {}: {e}; on disconnect continue: serving without the secondary \
                     (no usable out-of-sync bitmap: every block is resynced when it is back)",
                    self.cfg.addr
                );
                g.oos.all = true;
            }
        }
        g.connected = false;
        g.out_of_sync = true;
        g.last_error = Some(e.to_string());
    }

    /// At mount, connected: where the stream goes on with this secondary — a rejoin by
    /// both bitmaps, a clean resume, a resync by this volume's bitmap, or a full sync
    /// (done here). Returns the connection and, if a resync is to run, its epoch.
    fn agree(
        self: &Arc<Self>,
        peer: Peer,
        meta: &mut Meta,
        meta_path: &std::path::Path,
        vol: &dyn Volume,
        copy: &dyn Volume,
        stored: Option<bitmap::Loaded>,
    ) -> Result<(TcpStream, Option<u64>)> {
        let unit = self.unit;
        let Peer {
            mut s,
            stream: their_stream,
            seq: their_seq,
            inconsistent,
            rejoin,
        } = peer;
        let resume = |k: &str| -> Result<Option<u64>> {
            Ok(meta.super_value(k)?.and_then(|v| v.parse().ok()))
        };
        let clean = meta.super_value("clean")?.as_deref() == Some("1");
        let (rs, rq) = (resume(RESUME_STREAM)?, resume(RESUME_SEQ)?);
        // Used once: from here the primary changes.
        if rs.is_some() || rq.is_some() {
            meta.set_super_values(&[(RESUME_STREAM, None), (RESUME_SEQ, None)])?;
        }
        // The persistent bitmap is relative to the secondary's stream, from a point at
        // least as far as the last ack it recorded. A secondary cut in a resync of that
        // stream lacks only marked blocks too (the marks of a resync stay in the file
        // until its end is acked) and gets the whole database again.
        let by_bitmap = stored
            .clone()
            .filter(|b| rejoin.is_none() && b.stream == their_stream && their_seq >= b.floor);
        // An old primary of the stream this volume held as its secondary (`replica
        // promote` started the bitmap there, at the last record it held): the blocks
        // changed here since (this bitmap) and those it may have written that never
        // arrived here (its marks, relative to a last ack at or before that record).
        let rejoin_marks = match (&rejoin, &stored) {
            (Some(m), Some(b)) if b.stream == their_stream && their_seq <= b.floor => {
                Some(m.clone())
            }
            (Some(_), b) => {
                log::warn!(
                    "replica {}: the old primary rejoining holds stream {their_stream:x} up to an ack of record {their_seq}, this volume's out-of-sync bitmap {}: they do not line up, full sync",
                    self.cfg.addr,
                    match b {
                        Some(b) => format!("is of stream {:x} from record {}", b.stream, b.floor),
                        None => "is missing (mounted without --replica since promote?)".into(),
                    }
                );
                None
            }
            _ => None,
        };
        let mut resync_epoch = None;
        if let (Some(pm), Some(b)) = (rejoin_marks, stored.as_ref()) {
            let mut marks = Oos::default();
            marks.merge(&Oos {
                all: false,
                bits: b.units.clone(),
                count: 0,
            });
            let here = marks.count;
            marks.merge(&pm);
            log::info!(
                "replica {}: the old primary rejoins as the secondary of stream {their_stream:x} (acked up to record {their_seq}, promoted here at record {}): resync by bitmap, {} blocks of {unit} bytes ({here} changed here, {} marked there)",
                self.cfg.addr,
                b.floor,
                marks.count,
                pm.count
            );
            let mut g = self.lock();
            g.stream = their_stream;
            g.next_seq = b.floor + 1;
            g.acked = b.floor;
            g.sent = b.floor;
            g.connected = true;
            g.out_of_sync = true;
            g.oos = marks;
            resync_epoch = Some(g.drops);
        } else if rejoin.is_none()
            && clean
            && !inconsistent
            && rs == Some(their_stream)
            && rq == Some(their_seq)
        {
            log::info!(
                "replica {}: the secondary is at record {their_seq} of stream {their_stream:x}, where this volume stopped cleanly: no full sync",
                self.cfg.addr
            );
            let mut g = self.lock();
            g.resume_at(their_stream, their_seq);
        } else if let Some(b) = by_bitmap {
            // Out of sync by the bitmap: the link resyncs those blocks (and the whole
            // database) online, as after an outage.
            let mut marks = Oos::default();
            marks.merge(&Oos {
                all: false,
                bits: b.units,
                count: 0,
            });
            log::info!(
                "replica {}: the secondary is at record {their_seq} of stream {their_stream:x}; the out-of-sync bitmap has {} blocks of {unit} bytes: resync by bitmap",
                self.cfg.addr,
                marks.count
            );
            let mut g = self.lock();
            g.resume_at(their_stream, their_seq);
            g.out_of_sync = true;
            g.oos = marks;
            resync_epoch = Some(g.drops);
        } else {
            let stream = self.full_sync(&mut s, meta, meta_path, vol, copy)?;
            let mut g = self.lock();
            g.stream = stream;
            g.connected = true;
        }
        Ok((s, resync_epoch))
    }

    /// Starts [`Link::resync`] in its own thread.
    fn spawn_resync(self: &Arc<Self>, epoch: u64) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("pairfs-repl-resync".into())
            .spawn(move || {
                if let Err(e) = me.resync(epoch) {
                    log::error!("replica {}: resync: {e}", me.cfg.addr);
                    let mut g = me.lock();
                    if g.drops == epoch && !g.out_of_sync {
                        me.drop_stream(&mut g, "the resync failed");
                        g.oos.all = true;
                    }
                }
            });
    }

    /// An online resync (the link thread started it after a reconnection): under the
    /// metadata lock, the stream restarts with `ResyncBegin` and a copy of the database
    /// as of that point; from then on writes are records again; then every out-of-sync
    /// track is read under its stripe lock (so no write to it interleaves) and sent;
    /// `ResyncEnd` makes the secondary consistent again. Stops if the stream is dropped
    /// meanwhile (`drops` changed).
    fn resync(&self, epoch: u64) -> Result<()> {
        // At mount the store is attached once the volume is open.
        let until = Instant::now() + Duration::from_secs(120);
        while self.meta.get().is_none()
            && Instant::now() < until
            && !self.stop.load(Ordering::Acquire)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let meta = self
            .meta
            .get()
            .ok_or_else(|| Error::invalid("replica: no metadata store for a resync"))?
            .clone();
        let t0 = Instant::now();
        let db_bytes: u64;
        let (oos, stream) = {
            let m = meta.lock().unwrap_or_else(|p| p.into_inner());
            let mut g = self.lock();
            if g.drops != epoch {
                return Ok(());
            }
            let oos = std::mem::take(&mut g.oos);
            g.resync_marks = Some(oos.clone());
            g.resync_end = 0;
            g.out_of_sync = false;
            // Records dropped meanwhile took numbers: the stream goes on after them
            // (the sender expects the buffer to start at `sent + 1`).
            g.acked = g.next_seq - 1;
            g.sent = g.acked;
            if oos.all {
                g.stream = loop {
                    let n = proto::nonce()?;
                    let v = u64::from_le_bytes([n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]]);
                    if v != 0 {
                        break v;
                    }
                };
            }
            let stream = g.stream;
            g.resync_left = Some(if oos.all { 2 * self.units() } else { oos.count });
            let (g, _) = self.push_in(g, &|seq| Msg::ResyncBegin { seq, stream }, None);
            drop(g);
            let mut tmp = self.meta_path.as_os_str().to_owned();
            tmp.push(".repl-resync.tmp");
            let tmp = std::path::PathBuf::from(tmp);
            m.snapshot_to(&tmp)?;
            let db = std::fs::read(&tmp).map_err(|e| Error::io("metadata", e));
            let _ = std::fs::remove_file(&tmp);
            let db = db?;
            db_bytes = db.len() as u64;
            for c in db.chunks(MAX_DATA) {
                self.push(
                    &|seq| Msg::ResyncMeta {
                        seq,
                        data: c.to_vec(),
                    },
                    None,
                );
            }
            self.push(&|seq| Msg::ResyncMetaEnd { seq }, None);
            (oos, stream)
        };
        log::info!(
            "replica {}: resync of stream {stream:x} begins: {} blocks of {} bytes",
            self.cfg.addr,
            if oos.all {
                "all".to_string()
            } else {
                oos.count.to_string()
            },
            self.unit
        );
        let taps: Vec<Arc<TapShared>> = self.taps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut sent = 0u64;
        // Runs of marked units within one track are sent as one record.
        let per_track = self.track_size / self.unit;
        for tap in &taps {
            let bits = &oos.bits[tap.image as usize];
            let marked = |u: u64| {
                oos.all
                    || bits
                        .get((u / 64) as usize)
                        .is_some_and(|w| w & (1 << (u % 64)) != 0)
            };
            let mut u = 0;
            while u < self.units() {
                if !marked(u) {
                    u += 1;
                    continue;
                }
                let track_end = (u / per_track + 1) * per_track;
                let mut end = u + 1;
                while end < track_end.min(self.units()) && marked(end) {
                    end += 1;
                }
                if self.lock().drops != epoch {
                    return Ok(());
                }
                sent += tap.resend(self, u * self.unit, (end - u) * self.unit)?;
                let mut g = self.lock();
                if let Some(l) = g.resync_left.as_mut() {
                    *l = l.saturating_sub(end - u);
                }
                u = end;
            }
        }
        let mut g = self.lock();
        if g.drops != epoch {
            return Ok(());
        }
        g.resync_left = None;
        let (mut g, end) = self.push_in(g, &|seq| Msg::ResyncEnd { seq }, None);
        if g.drops == epoch && g.resync_marks.is_some() {
            g.resync_end = end;
        }
        drop(g);
        log::info!(
            "replica {}: resync sent: {:.1} MiB of block data ({sent} bytes) and {:.1} MiB of metadata in {:.1} s",
            self.cfg.addr,
            sent as f64 / 1048576.0,
            db_bytes as f64 / 1048576.0,
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// What the persistent bitmap must say now (under the link's lock): the fine bits
    /// (the marks, and those of a resync until its end is acked), the regions of every
    /// record not acked or acked but not yet durable on the primary's image, the stream
    /// (0 while every block is out of sync) and the last acked record.
    fn bitmap_target(&self) -> bitmap::Target {
        let g = self.lock();
        let (_, region) = self.bitmap.geometry();
        let mut t = bitmap::Target::default();
        let all = g.oos.all || g.resync_marks.as_ref().is_some_and(|m| m.all);
        if all {
            return t;
        }
        t.stream = g.stream;
        t.floor = g.acked;
        for i in 0..2 {
            t.fine[i] = g.oos.bits[i].clone();
            if let Some(m) = &g.resync_marks {
                let b = &m.bits[i];
                if t.fine[i].len() < b.len() {
                    t.fine[i].resize(b.len(), 0);
                }
                for (x, y) in t.fine[i].iter_mut().zip(b) {
                    *x |= *y;
                }
            }
        }
        let ranges = g
            .buf
            .iter()
            .filter_map(|r| r.range)
            .chain(g.acked_unsynced.iter().map(|&(_, i, o, l)| (i, o, l)));
        for (i, o, l) in ranges {
            let last = (o + l.max(1) - 1) / region;
            for r in o / region..=last {
                t.busy[i as usize].insert(r);
            }
        }
        t
    }

    /// Writes the persistent bitmap (`settle`: no write is running, so regions written
    /// lately need not stay marked). An error leaves the bitmap removed (the next
    /// mount syncs in full) or, if even that failed, writes refused.
    fn checkpoint(&self, settle: bool) {
        if let Err(e) = self.bitmap.checkpoint(settle, &|| self.bitmap_target()) {
            log::error!("replica {}: {e}", self.cfg.addr);
        }
    }

    /// Drains the stream (waits for the last ack, up to 30 s) and ends the link.
    pub fn close(&self) {
        let mut g = self.lock();
        g.closing = true;
        self.cv.notify_all();
        let until = Instant::now() + Duration::from_secs(30);
        while g.connected && Instant::now() < until {
            g = self.wait(g);
        }
        if !g.buf.is_empty() {
            log::warn!(
                "replica {}: closed with {} records ({} bytes) not acknowledged",
                self.cfg.addr,
                g.buf.len(),
                g.buf_bytes
            );
        }
        drop(g);
        self.stop.store(true, Ordering::Release);
        // The images refer to the link: break the cycle.
        self.taps.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// The metadata tap: each committed transaction's rows become one `Commit` record.
struct LinkTap(Arc<Link>);

impl CommitTap for LinkTap {
    fn install(&mut self, conn: &Connection) -> Result<()> {
        capture::install(conn)
    }

    fn committed(&mut self, conn: &Connection) {
        // Even an empty transaction is a record: every durability point reaches the
        // secondary as a `Commit` it fsyncs and acks.
        match capture::drain(conn) {
            Ok(rows) => {
                self.0.push(
                    &|seq| Msg::Commit {
                        seq,
                        rows: rows.clone(),
                    },
                    None,
                );
            }
            Err(e) => {
                let mut g = self.0.lock();
                self.0
                    .drop_stream(&mut g, &format!("reading the row log failed: {e}"));
                g.oos.all = true;
            }
        }
    }
}

/// An image whose writes and discards also enter the stream.
pub struct Tapped(Arc<TapShared>);

/// The shared part of a [`Tapped`] image (the link reaches it for a resync).
pub struct TapShared {
    inner: Box<dyn Volume>,
    image: Image,
    link: Arc<Link>,
    track_size: u64,
    stripes: Vec<Mutex<()>>,
}

impl TapShared {
    fn stripes(&self, off: u64, len: u64) -> Vec<MutexGuard<'_, ()>> {
        let n = self.stripes.len() as u64;
        let first = off / self.track_size;
        let last = (off + len.max(1) - 1) / self.track_size;
        let mut idx: Vec<usize> = if last - first + 1 >= n {
            (0..n as usize).collect()
        } else {
            (first..=last).map(|t| (t % n) as usize).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| self.stripes[i].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Resync: sends `[off, off + len)` (within one track) as it is now (a `Discard`
    /// for a hole or zeros), under its stripe lock so no write to it lands between the
    /// read and the record. Returns the data bytes sent.
    fn resend(&self, link: &Link, off: u64, len: u64) -> Result<u64> {
        if off >= link.size {
            return Ok(0);
        }
        let len = len.min(link.size - off);
        let _g = self.stripes(off, len);
        let range = Some((self.image, off, len));
        let hole = self
            .inner
            .data_after(off)
            .is_none_or(|(start, _)| start >= off + len);
        let mut b = Vec::new();
        if !hole {
            b = vec![0u8; len as usize];
            self.inner.read_at(off, &mut b)?;
        }
        if hole || b.iter().all(|x| *x == 0) {
            link.push(
                &|seq| Msg::Discard {
                    seq,
                    image: self.image,
                    off,
                    len,
                },
                range,
            );
            return Ok(0);
        }
        link.push(
            &|seq| Msg::Write {
                seq,
                image: self.image,
                off,
                data: b.clone(),
            },
            range,
        );
        Ok(len)
    }
}

impl Volume for Tapped {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.0.inner.read_at(off, buf)
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        let t = &self.0;
        let _g = t.stripes(off, buf.len() as u64);
        let img = t.image as usize;
        let len = buf.len() as u64;
        // The region is marked durably before the write can reach the image.
        t.link.bitmap.begin(img, off, len)?;
        let r = t.inner.write_at(off, buf);
        if r.is_err() {
            t.link.bitmap.end(img, off, len);
        }
        r?;
        for (i, c) in buf.chunks(MAX_DATA).enumerate() {
            let o = off + (i * MAX_DATA) as u64;
            t.link.push(
                &|seq| Msg::Write {
                    seq,
                    image: t.image,
                    off: o,
                    data: c.to_vec(),
                },
                Some((t.image, o, c.len() as u64)),
            );
        }
        t.link.bitmap.end(img, off, len);
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        let t = &self.0;
        let _g = t.stripes(off, len);
        let img = t.image as usize;
        t.link.bitmap.begin(img, off, len)?;
        let r = t.inner.discard(off, len);
        if r.is_ok() {
            t.link.push(
                &|seq| Msg::Discard {
                    seq,
                    image: t.image,
                    off,
                    len,
                },
                Some((t.image, off, len)),
            );
        }
        t.link.bitmap.end(img, off, len);
        r
    }

    fn sync(&self) -> Result<()> {
        let t = &self.0;
        // Every record numbered below `mark` reached this image before the sync began.
        let mark = t.link.lock().next_seq;
        t.inner.sync()?;
        let mut g = t.link.lock();
        let i = t.image as usize;
        if mark > g.local_durable[i] {
            g.local_durable[i] = mark;
            g.acked_unsynced
                .retain(|&(q, im, _, _)| im as usize != i || q >= mark);
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.0.inner.len()
    }

    fn allocated(&self) -> Option<u64> {
        self.0.inner.allocated()
    }
}

/// The durability sink: a sync record per durability point, acks awaited in `sync` mode.
pub struct Sink(Arc<Link>);

impl DurabilitySink for Sink {
    fn name(&self) -> &str {
        "replica"
    }

    fn sync_data(&self) -> Result<()> {
        let seq = self.0.push(&|seq| Msg::Sync { seq }, None);
        self.0.wait_acked(seq)
    }

    fn sync_before_commit(&self) -> Result<()> {
        // The commit's own record fsyncs the secondary's images before its rows; this
        // only lets that start while the primary commits its metadata.
        self.0.push(&|seq| Msg::Flush { seq }, None);
        Ok(())
    }

    fn commit_meta(&self, _batch: &crate::meta::Batch) -> Result<()> {
        // The tap already queued the transaction's rows (under the metadata lock): wait
        // for the ack of that `Commit`, or of a later record that gets one. Not of the
        // last record pushed: a write of another file may have entered the stream since,
        // and a `Write` is acked only by a later `Sync` or `Commit`, which the fsyncs
        // waiting behind this commit would never push (the mount hung: acked up to the
        // commit, two writes queued, every fsync waiting).
        let seq = {
            let g = self.0.lock();
            g.ack_point.min(g.next_seq.saturating_sub(1))
        };
        self.0.wait_acked(seq)
    }

    fn status(&self) -> String {
        self.0.status_line()
    }

    fn close(&self) {
        self.0.close();
        // Every write is done: the bitmap says exactly what is out of sync.
        self.0.checkpoint(true);
        let (clean, stream, seq) = {
            let g = self.0.lock();
            (g.clean_end, g.stream, g.acked)
        };
        // After the clean flag: the next mount skips the full sync if the secondary is
        // still at this point of this stream (rows only the primary has; a mount without
        // --replica or fsck --repair deletes them).
        if clean && let Some(m) = self.0.meta.get() {
            let r = m
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_super_values(&[
                    (RESUME_STREAM, Some(&stream.to_string())),
                    (RESUME_SEQ, Some(&seq.to_string())),
                ]);
            match r {
                Ok(()) => log::info!(
                    "replica {}: in sync at record {seq} of stream {stream:x}",
                    self.0.cfg.addr
                ),
                Err(e) => log::warn!("replica {}: recording the sync point: {e}", self.0.cfg.addr),
            }
        }
    }

    fn attach_meta(&self, meta: &Arc<Mutex<Meta>>) {
        let _ = self.0.meta.set(meta.clone());
    }
}

/// The out-of-sync unit of a volume: 4 KiB, or larger so a bitmap stays within 16 MiB
/// (never more than a track).
pub fn unit_for(size: u64, track_size: u64) -> u64 {
    (size.div_ceil(1 << 27))
        .next_power_of_two()
        .clamp(4096, track_size.max(4096))
}

/// Attaches a replica at mount ([`Attach`]): connect, full sync, then the stream.
pub struct Replica {
    cfg: Mutex<Option<Config>>,
}

impl Replica {
    /// A replica to attach at mount.
    pub fn new(cfg: Config) -> Replica {
        Replica {
            cfg: Mutex::new(Some(cfg)),
        }
    }
}

impl Attach for Replica {
    fn attach(
        &self,
        meta: &mut Meta,
        meta_path: &std::path::Path,
        vol: Box<dyn Volume>,
        copy: Box<dyn Volume>,
    ) -> Result<(Box<dyn Volume>, Box<dyn Volume>, Arc<dyn DurabilitySink>)> {
        let cfg = self
            .cfg
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::invalid("replica attached twice"))?;
        if meta.super_value("migrate_image")?.is_some() {
            return Err(Error::invalid(
                "a migration is in progress: mount without --replica until it has switched",
            ));
        }
        let g = meta.geometry().clone();
        let uuid = *uuid::Uuid::parse_str(&g.uuid)
            .map_err(|_| Error::Corrupt(format!("volume uuid {:?}", g.uuid)))?
            .as_bytes();
        let unit = unit_for(g.size, g.track_size);
        let (bitmap, stored) = Bitmap::open(meta_path, uuid, g.size, unit)?;
        let link = Arc::new(Link {
            cfg,
            uuid,
            size: g.size,
            track_size: g.track_size,
            unit,
            bitmap,
            st: Mutex::new(State {
                stream: 0,
                next_seq: 1,
                buf: VecDeque::new(),
                buf_bytes: 0,
                sent: 0,
                acked: 0,
                connected: false,
                out_of_sync: false,
                dropped_bytes: 0,
                acked_bytes: 0,
                since_ack_point: 0,
                ack_point: 0,
                closing: false,
                last_error: None,
                reconnects: 0,
                oos: Oos::default(),
                resync_left: None,
                resync_marks: None,
                resync_end: 0,
                acked_unsynced: Vec::new(),
                local_durable: [0; 2],
                drops: 0,
                clean_end: false,
                tip_unknown: false,
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            buffer: std::env::var("PAIRFS_REPL_BUFFER")
                .ok()
                .and_then(|v| crate::cli::size::parse_size(&v).ok())
                .unwrap_or(BUFFER)
                .max(1 << 20),
            taps: Mutex::new(Vec::new()),
            meta: std::sync::OnceLock::new(),
            meta_path: meta_path.to_path_buf(),
        });
        // The secondary may be starting: try for 10 s.
        let until = Instant::now() + Duration::from_secs(10);
        let peer = loop {
            match link.connect() {
                Ok(x) => break Ok(x),
                Err(e @ Error::Io { .. }) if Instant::now() < until => {
                    log::info!("replica {}: {e}; retrying", link.cfg.addr);
                    std::thread::sleep(Duration::from_millis(200));
                }
                // With `continue` an unreachable secondary does not stop the mount (a
                // failover: the old primary is down, and will rejoin later).
                Err(e @ Error::Io { .. }) if link.cfg.on_disconnect == OnDisconnect::Continue => {
                    break Err(e);
                }
                Err(e) => return Err(e),
            }
        };
        let (first, resync_epoch) = match peer {
            Err(e) => {
                link.start_unreachable(&e, stored.as_ref());
                (None, None)
            }
            Ok(peer) => {
                let (s, epoch) = link.agree(peer, meta, meta_path, &*vol, &*copy, stored)?;
                (Some(s), epoch)
            }
        };
        // Before anything is written: the file says what is out of sync now.
        link.checkpoint(true);
        meta.set_tap(Box::new(LinkTap(link.clone())))?;
        log::info!(
            "replica {}: connected, mode {:?}, on disconnect {:?}",
            link.cfg.addr,
            link.cfg.mode,
            link.cfg.on_disconnect
        );
        let l = link.clone();
        std::thread::Builder::new()
            .name("pairfs-repl".into())
            .spawn(move || l.run(first))
            .map_err(|e| Error::io("thread", e))?;
        if let Some(epoch) = resync_epoch {
            link.spawn_resync(epoch);
        }
        // The bitmap's checkpoints: once a second while the link lives.
        let l = link.clone();
        std::thread::Builder::new()
            .name("pairfs-repl-bitmap".into())
            .spawn(move || {
                while !l.stop.load(Ordering::Acquire) {
                    for _ in 0..20 {
                        std::thread::sleep(Duration::from_millis(50));
                        if l.stop.load(Ordering::Acquire) {
                            return;
                        }
                    }
                    l.checkpoint(false);
                }
            })
            .map_err(|e| Error::io("thread", e))?;
        let wrap = |inner: Box<dyn Volume>, image| -> Box<dyn Volume> {
            let t = Arc::new(TapShared {
                inner,
                image,
                link: link.clone(),
                track_size: g.track_size,
                stripes: (0..64).map(|_| Mutex::new(())).collect(),
            });
            link.taps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(t.clone());
            Box::new(Tapped(t))
        };
        Ok((
            wrap(vol, Image::Volume),
            wrap(copy, Image::Copy),
            Arc::new(Sink(link.clone())),
        ))
    }
}
