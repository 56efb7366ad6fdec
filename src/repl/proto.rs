//! The replication wire protocol: frames, messages, the handshake.
//!
//! A **frame** is `len: u32 LE` (bytes of payload, at most [`MAX_FRAME`]), `crc: u32 LE`
//! (crc32c of the payload, the `crc32c` crate) and the payload. The payload is one
//! [`Msg`]: a type byte, then its fields (integers little endian, byte strings as
//! `u32 LE` length + bytes). [`decode`] checks every length against what is left and
//! never panics: garbage or a truncated frame is an error value
//! (`tests` below feed it random and mutated bytes with proptest).
//!
//! **Handshake** (before any data moves; the key never travels):
//!
//! ```text
//! primary   -> Hello { version, nonce_p, uuid, size, track_size }
//! secondary -> Challenge { version, nonce_s, mac_s = HMAC(key, "pairfs-repl-s" | nonce_p | nonce_s | uuid) }
//!              (or Refuse: another protocol version)
//! primary   -> Auth { mac_p = HMAC(key, "pairfs-repl-p" | nonce_s | nonce_p | uuid) }
//!              (or Refuse, after checking mac_s in constant time: the secondary has another key)
//! secondary -> Welcome { stream, seq, inconsistent, rejoin }   (or Refuse: wrong key, other volume, other geometry)
//!              (rejoin: an old primary's marks follow, RejoinMark.. RejoinEnd)
//! ```
//!
//! HMAC-SHA256 (`hmac` + `sha2` crates; `verify_slice` compares in constant time). The
//! two MACs use different labels and both nonces, so neither side's answer can be
//! replayed or reflected. The link is **not encrypted**: see the README for a tunnel.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Protocol version spoken by this build; peers of another version are refused.
pub const VERSION: u32 = 2;
/// Largest payload accepted (a data record carries at most [`MAX_DATA`] bytes).
pub const MAX_FRAME: usize = 8 << 20;
/// Largest data carried by one `Write`, `Chunk` or `MetaChunk` message.
pub const MAX_DATA: usize = 4 << 20;
/// Nonce size.
pub const NONCE: usize = 32;

/// Which image a data record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// The volume image.
    Volume = 0,
    /// The copy image.
    Copy = 1,
}

impl Image {
    fn from_u8(b: u8) -> std::result::Result<Image, String> {
        match b {
            0 => Ok(Image::Volume),
            1 => Ok(Image::Copy),
            _ => Err(format!("unknown image {b}")),
        }
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// Primary's opening.
    Hello {
        /// Protocol version.
        version: u32,
        /// Fresh random nonce.
        nonce: [u8; NONCE],
        /// Volume UUID (16 bytes).
        uuid: [u8; 16],
        /// Volume size, bytes.
        size: u64,
        /// Track size, bytes.
        track_size: u64,
    },
    /// Secondary's answer: its nonce and its proof of the key.
    Challenge {
        /// Protocol version.
        version: u32,
        /// Fresh random nonce.
        nonce: [u8; NONCE],
        /// HMAC over the labels and nonces (see the module doc).
        mac: [u8; 32],
    },
    /// Primary's proof of the key.
    Auth {
        /// HMAC over the labels and nonces.
        mac: [u8; 32],
    },
    /// Secondary accepts: where its stream stands (`stream` 0: needs a full sync).
    Welcome {
        /// Stream id of the data it holds (0: none, a full sync is needed).
        stream: u64,
        /// Last record durable on it.
        seq: u64,
        /// A resync was running (its images are not consistent).
        inconsistent: bool,
        /// An old primary of `stream` rejoining as the secondary (`replica serve
        /// --rejoin`): `seq` is the last record its secondary acked, and its out-of-sync
        /// marks follow (`RejoinMark`s, then `RejoinEnd`).
        rejoin: bool,
    },
    /// A rejoining old primary: a byte range of one image that may differ from what its
    /// secondary held (its persistent bitmap's fine bits and activity-log regions).
    RejoinMark {
        /// Which image.
        image: Image,
        /// Byte offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// End of a rejoining old primary's marks.
    RejoinEnd {
        /// How many `RejoinMark`s were sent.
        count: u64,
    },
    /// Either side refuses, with a reason for the operator.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Start of a full sync: a new stream.
    SyncBegin {
        /// New stream id (never 0).
        stream: u64,
    },
    /// Full-sync image bytes (absent ranges are zero).
    Chunk {
        /// Which image.
        image: Image,
        /// Byte offset.
        off: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Full-sync metadata database bytes, in order.
    MetaChunk {
        /// Bytes.
        data: Vec<u8>,
    },
    /// End of a full sync: the stream continues at `seq + 1`.
    SyncEnd {
        /// The full sync's record number.
        seq: u64,
    },
    /// A write to an image.
    Write {
        /// Record number.
        seq: u64,
        /// Which image.
        image: Image,
        /// Byte offset.
        off: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// A discard (hole punch) of an image range.
    Discard {
        /// Record number.
        seq: u64,
        /// Which image.
        image: Image,
        /// Byte offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// Make everything before durable, then ack.
    Sync {
        /// Record number.
        seq: u64,
    },
    /// Make everything before durable; no ack (a `Commit` follows: it starts the
    /// secondary's data sync early, while the primary commits its own metadata).
    Flush {
        /// Record number.
        seq: u64,
    },
    /// A committed metadata transaction (row changes, [`super::capture`]); durable
    /// with everything before it, then ack.
    Commit {
        /// Record number.
        seq: u64,
        /// Encoded row changes.
        rows: Vec<u8>,
    },
    /// Secondary: every record up to `seq` is durable here.
    Ack {
        /// Record number.
        seq: u64,
    },
    /// Start of an online resync: the secondary is inconsistent until `ResyncEnd`.
    ResyncBegin {
        /// Record number.
        seq: u64,
        /// The stream (its id may change: a full resync starts a new one).
        stream: u64,
    },
    /// Resync: bytes of the metadata database as of this point of the stream.
    ResyncMeta {
        /// Record number.
        seq: u64,
        /// Bytes (in order).
        data: Vec<u8>,
    },
    /// Resync: the database is complete; install it (later `Commit`s apply to it).
    ResyncMetaEnd {
        /// Record number.
        seq: u64,
    },
    /// Resync done: every out-of-sync track was sent; durable, consistent, ack.
    ResyncEnd {
        /// Record number.
        seq: u64,
    },
    /// Keep-alive (the secondary drops a link silent for 30 s).
    Ping,
    /// Clean end of the stream.
    Bye,
}

const T_HELLO: u8 = 1;
const T_CHALLENGE: u8 = 2;
const T_AUTH: u8 = 3;
const T_WELCOME: u8 = 4;
const T_REFUSE: u8 = 5;
const T_SYNC_BEGIN: u8 = 10;
const T_CHUNK: u8 = 11;
const T_META_CHUNK: u8 = 12;
const T_SYNC_END: u8 = 13;
const T_WRITE: u8 = 20;
const T_DISCARD: u8 = 21;
const T_SYNC: u8 = 22;
const T_COMMIT: u8 = 23;
const T_ACK: u8 = 24;
const T_PING: u8 = 25;
const T_BYE: u8 = 26;
const T_FLUSH: u8 = 27;
const T_RESYNC_BEGIN: u8 = 30;
const T_RESYNC_META: u8 = 31;
const T_RESYNC_META_END: u8 = 32;
const T_RESYNC_END: u8 = 33;
const T_REJOIN_MARK: u8 = 40;
const T_REJOIN_END: u8 = 41;

/// Encodes a message's payload.
pub fn encode(m: &Msg) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    let bytes = |b: &mut Vec<u8>, d: &[u8]| {
        b.extend_from_slice(&(d.len() as u32).to_le_bytes());
        b.extend_from_slice(d);
    };
    match m {
        Msg::Hello {
            version,
            nonce,
            uuid,
            size,
            track_size,
        } => {
            b.push(T_HELLO);
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(nonce);
            b.extend_from_slice(uuid);
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&track_size.to_le_bytes());
        }
        Msg::Challenge {
            version,
            nonce,
            mac,
        } => {
            b.push(T_CHALLENGE);
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(nonce);
            b.extend_from_slice(mac);
        }
        Msg::Auth { mac } => {
            b.push(T_AUTH);
            b.extend_from_slice(mac);
        }
        Msg::Welcome {
            stream,
            seq,
            inconsistent,
            rejoin,
        } => {
            b.push(T_WELCOME);
            b.extend_from_slice(&stream.to_le_bytes());
            b.extend_from_slice(&seq.to_le_bytes());
            b.push(u8::from(*inconsistent) | (u8::from(*rejoin) << 1));
        }
        Msg::RejoinMark { image, off, len } => {
            b.push(T_REJOIN_MARK);
            b.push(*image as u8);
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        Msg::RejoinEnd { count } => {
            b.push(T_REJOIN_END);
            b.extend_from_slice(&count.to_le_bytes());
        }
        Msg::ResyncBegin { seq, stream } => {
            b.push(T_RESYNC_BEGIN);
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&stream.to_le_bytes());
        }
        Msg::ResyncMeta { seq, data } => {
            b.push(T_RESYNC_META);
            b.extend_from_slice(&seq.to_le_bytes());
            bytes(&mut b, data);
        }
        Msg::ResyncMetaEnd { seq } => {
            b.push(T_RESYNC_META_END);
            b.extend_from_slice(&seq.to_le_bytes());
        }
        Msg::ResyncEnd { seq } => {
            b.push(T_RESYNC_END);
            b.extend_from_slice(&seq.to_le_bytes());
        }
        Msg::Refuse { reason } => {
            b.push(T_REFUSE);
            bytes(&mut b, reason.as_bytes());
        }
        Msg::SyncBegin { stream } => {
            b.push(T_SYNC_BEGIN);
            b.extend_from_slice(&stream.to_le_bytes());
        }
        Msg::Chunk { image, off, data } => {
            b.push(T_CHUNK);
            b.push(*image as u8);
            b.extend_from_slice(&off.to_le_bytes());
            bytes(&mut b, data);
        }
        Msg::MetaChunk { data } => {
            b.push(T_META_CHUNK);
            bytes(&mut b, data);
        }
        Msg::SyncEnd { seq } => {
            b.push(T_SYNC_END);
            b.extend_from_slice(&seq.to_le_bytes());
        }
        Msg::Write {
            seq,
            image,
            off,
            data,
        } => {
            b.push(T_WRITE);
            b.extend_from_slice(&seq.to_le_bytes());
            b.push(*image as u8);
            b.extend_from_slice(&off.to_le_bytes());
            bytes(&mut b, data);
        }
        Msg::Discard {
            seq,
            image,
            off,
            len,
        } => {
            b.push(T_DISCARD);
            b.extend_from_slice(&seq.to_le_bytes());
            b.push(*image as u8);
            b.extend_from_slice(&off.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        Msg::Sync { seq } => {
            b.push(T_SYNC);
            b.extend_from_slice(&seq.to_le_bytes());
        }
        Msg::Flush { seq } => {
            b.push(T_FLUSH);
            b.extend_from_slice(&seq.to_le_bytes());
        }
        Msg::Commit { seq, rows } => {
            b.push(T_COMMIT);
            b.extend_from_slice(&seq.to_le_bytes());
            bytes(&mut b, rows);
        }
        Msg::Ack { seq } => {
            b.push(T_ACK);
            b.extend_from_slice(&seq.to_le_bytes());
        }
        Msg::Ping => b.push(T_PING),
        Msg::Bye => b.push(T_BYE),
    }
    b
}

/// A cursor over untrusted bytes: every read checks what is left.
pub struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Reads from `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Cursor { b }
    }
    /// Bytes left.
    pub fn left(&self) -> usize {
        self.b.len()
    }
    /// `n` bytes, or an error if fewer are left.
    pub fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.b.len() {
            return Err(format!("truncated: need {n} bytes, {} left", self.b.len()));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    /// One byte.
    pub fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    /// u32 LE.
    pub fn u32(&mut self) -> std::result::Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    /// u64 LE.
    pub fn u64(&mut self) -> std::result::Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// A fixed array.
    pub fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// `u32` length + bytes, at most `max`.
    pub fn bytes(&mut self, max: usize) -> std::result::Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(format!("field of {n} bytes, at most {max} allowed"));
        }
        self.take(n)
    }
}

/// Decodes a payload; any malformation is an error (never a panic).
pub fn decode(p: &[u8]) -> std::result::Result<Msg, String> {
    let mut c = Cursor::new(p);
    let t = c.u8()?;
    let m = match t {
        T_HELLO => Msg::Hello {
            version: c.u32()?,
            nonce: c.array()?,
            uuid: c.array()?,
            size: c.u64()?,
            track_size: c.u64()?,
        },
        T_CHALLENGE => Msg::Challenge {
            version: c.u32()?,
            nonce: c.array()?,
            mac: c.array()?,
        },
        T_AUTH => Msg::Auth { mac: c.array()? },
        T_WELCOME => {
            let (stream, seq) = (c.u64()?, c.u64()?);
            let f = c.u8()?;
            if f > 3 {
                return Err(format!("bad flags {f}"));
            }
            Msg::Welcome {
                stream,
                seq,
                inconsistent: f & 1 != 0,
                rejoin: f & 2 != 0,
            }
        }
        T_REJOIN_MARK => Msg::RejoinMark {
            image: Image::from_u8(c.u8()?)?,
            off: c.u64()?,
            len: c.u64()?,
        },
        T_REJOIN_END => Msg::RejoinEnd { count: c.u64()? },
        T_RESYNC_BEGIN => Msg::ResyncBegin {
            seq: c.u64()?,
            stream: c.u64()?,
        },
        T_RESYNC_META => Msg::ResyncMeta {
            seq: c.u64()?,
            data: c.bytes(MAX_DATA)?.to_vec(),
        },
        T_RESYNC_META_END => Msg::ResyncMetaEnd { seq: c.u64()? },
        T_RESYNC_END => Msg::ResyncEnd { seq: c.u64()? },
        T_REFUSE => Msg::Refuse {
            reason: String::from_utf8_lossy(c.bytes(4096)?).into_owned(),
        },
        T_SYNC_BEGIN => Msg::SyncBegin { stream: c.u64()? },
        T_CHUNK => Msg::Chunk {
            image: Image::from_u8(c.u8()?)?,
            off: c.u64()?,
            data: c.bytes(MAX_DATA)?.to_vec(),
        },
        T_META_CHUNK => Msg::MetaChunk {
            data: c.bytes(MAX_DATA)?.to_vec(),
        },
        T_SYNC_END => Msg::SyncEnd { seq: c.u64()? },
        T_WRITE => Msg::Write {
            seq: c.u64()?,
            image: Image::from_u8(c.u8()?)?,
            off: c.u64()?,
            data: c.bytes(MAX_DATA)?.to_vec(),
        },
        T_DISCARD => Msg::Discard {
            seq: c.u64()?,
            image: Image::from_u8(c.u8()?)?,
            off: c.u64()?,
            len: c.u64()?,
        },
        T_SYNC => Msg::Sync { seq: c.u64()? },
        T_FLUSH => Msg::Flush { seq: c.u64()? },
        T_COMMIT => Msg::Commit {
            seq: c.u64()?,
            rows: c.bytes(MAX_FRAME)?.to_vec(),
        },
        T_ACK => Msg::Ack { seq: c.u64()? },
        T_PING => Msg::Ping,
        T_BYE => Msg::Bye,
        t => return Err(format!("unknown message type {t}")),
    };
    if c.left() != 0 {
        return Err(format!(
            "{} trailing bytes after message type {t}",
            c.left()
        ));
    }
    Ok(m)
}

/// Builds a frame (header + payload) for `m`.
pub fn frame(m: &Msg) -> Vec<u8> {
    let p = encode(m);
    let mut f = Vec::with_capacity(8 + p.len());
    f.extend_from_slice(&(p.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
    f.extend_from_slice(&p);
    f
}

/// Writes one framed message.
pub fn send(w: &mut dyn Write, m: &Msg) -> Result<()> {
    w.write_all(&frame(m))
        .map_err(|e| Error::io("replica link", e))
}

/// Splits a frame from the front of `buf`: `Ok(None)` if it is incomplete, else the
/// message and the bytes it used. Errors: oversized, checksum mismatch, bad payload.
pub fn parse_frame(buf: &[u8]) -> std::result::Result<Option<(Msg, usize)>, String> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_FRAME {
        return Err(format!("frame of {len} bytes, at most {MAX_FRAME} allowed"));
    }
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let p = &buf[8..8 + len];
    if crc32c::crc32c(p) != crc {
        return Err("frame checksum mismatch".into());
    }
    Ok(Some((decode(p)?, 8 + len)))
}

/// Reads one framed message (blocking). A malformed frame is `Error::Corrupt`.
pub fn recv(r: &mut dyn Read) -> Result<Msg> {
    recv_max(r, MAX_FRAME)
}

/// Largest frame of the handshake (before the peer is authenticated, nothing bigger
/// is read).
pub const MAX_HANDSHAKE: usize = 4096;

/// [`recv`] of a frame of at most `max` payload bytes.
pub fn recv_max(r: &mut dyn Read, max: usize) -> Result<Msg> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)
        .map_err(|e| Error::io("replica link", e))?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(Error::Corrupt(format!(
            "replica link: frame of {len} bytes, at most {} allowed here",
            max.min(MAX_FRAME)
        )));
    }
    let mut p = vec![0u8; len];
    r.read_exact(&mut p)
        .map_err(|e| Error::io("replica link", e))?;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if crc32c::crc32c(&p) != crc {
        return Err(Error::Corrupt(
            "replica link: frame checksum mismatch".into(),
        ));
    }
    decode(&p).map_err(|e| Error::Corrupt(format!("replica link: {e}")))
}

/// The shared key, read from a file that only its owner may read.
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<hidden>)")
    }
}

impl Key {
    /// Reads the key file: at least 16 bytes (a trailing newline is dropped), not
    /// readable by group or others.
    pub fn from_file(path: &Path) -> Result<Key> {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(path).map_err(|e| Error::io("key file", e))?;
        if md.permissions().mode() & 0o077 != 0 {
            return Err(Error::invalid(format!(
                "key file {} is readable by group or others (mode {:o}); chmod 600 it",
                path.display(),
                md.permissions().mode() & 0o777
            )));
        }
        let mut k = std::fs::read(path).map_err(|e| Error::io("key file", e))?;
        while k.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            k.pop();
        }
        Key::from_bytes(k)
    }

    /// A key from bytes (at least 16).
    pub fn from_bytes(k: Vec<u8>) -> Result<Key> {
        if k.len() < 16 {
            return Err(Error::invalid(
                "the replication key must be at least 16 bytes (e.g. head -c 32 /dev/urandom | base64)",
            ));
        }
        Ok(Key(k))
    }

    fn mac(&self, label: &[u8], a: &[u8], b: &[u8], uuid: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(label);
        m.update(a);
        m.update(b);
        m.update(uuid);
        m
    }

    /// The secondary's proof.
    pub fn mac_s(&self, nonce_p: &[u8], nonce_s: &[u8], uuid: &[u8]) -> [u8; 32] {
        self.mac(b"pairfs-repl-s", nonce_p, nonce_s, uuid)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The primary's proof.
    pub fn mac_p(&self, nonce_p: &[u8], nonce_s: &[u8], uuid: &[u8]) -> [u8; 32] {
        self.mac(b"pairfs-repl-p", nonce_s, nonce_p, uuid)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks the secondary's proof in constant time.
    pub fn verify_s(&self, nonce_p: &[u8], nonce_s: &[u8], uuid: &[u8], mac: &[u8]) -> bool {
        self.mac(b"pairfs-repl-s", nonce_p, nonce_s, uuid)
            .verify_slice(mac)
            .is_ok()
    }

    /// Checks the primary's proof in constant time.
    pub fn verify_p(&self, nonce_p: &[u8], nonce_s: &[u8], uuid: &[u8], mac: &[u8]) -> bool {
        self.mac(b"pairfs-repl-p", nonce_s, nonce_p, uuid)
            .verify_slice(mac)
            .is_ok()
    }
}

/// A fresh random nonce (from the kernel's CSPRNG).
pub fn nonce() -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    let mut f = std::fs::File::open("/dev/urandom").map_err(|e| Error::io("urandom", e))?;
    f.read_exact(&mut n).map_err(|e| Error::io("urandom", e))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: VERSION,
                nonce: [7; NONCE],
                uuid: [1; 16],
                size: 1 << 30,
                track_size: 65536,
            },
            Msg::Challenge {
                version: VERSION,
                nonce: [9; NONCE],
                mac: [3; 32],
            },
            Msg::Auth { mac: [4; 32] },
            Msg::Welcome {
                stream: 5,
                seq: 6,
                inconsistent: true,
                rejoin: false,
            },
            Msg::Welcome {
                stream: 5,
                seq: 6,
                inconsistent: false,
                rejoin: true,
            },
            Msg::RejoinMark {
                image: Image::Copy,
                off: 1 << 22,
                len: 4 << 20,
            },
            Msg::RejoinEnd { count: 3 },
            Msg::ResyncBegin { seq: 7, stream: 8 },
            Msg::ResyncMeta {
                seq: 8,
                data: vec![5; 9],
            },
            Msg::ResyncMetaEnd { seq: 9 },
            Msg::ResyncEnd { seq: 10 },
            Msg::Refuse {
                reason: "wrong key".into(),
            },
            Msg::SyncBegin { stream: 77 },
            Msg::Chunk {
                image: Image::Copy,
                off: 4096,
                data: vec![1, 2, 3],
            },
            Msg::MetaChunk { data: vec![0; 10] },
            Msg::SyncEnd { seq: 1 },
            Msg::Write {
                seq: 2,
                image: Image::Volume,
                off: 65536,
                data: vec![0xAB; 100],
            },
            Msg::Discard {
                seq: 3,
                image: Image::Volume,
                off: 0,
                len: 65536,
            },
            Msg::Sync { seq: 4 },
            Msg::Flush { seq: 4 },
            Msg::Commit {
                seq: 5,
                rows: vec![1, 2],
            },
            Msg::Ack { seq: 5 },
            Msg::Ping,
            Msg::Bye,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let f = frame(&m);
            let (d, n) = parse_frame(&f).unwrap().unwrap();
            assert_eq!(d, m);
            assert_eq!(n, f.len());
            assert_eq!(recv(&mut &f[..]).unwrap(), m);
        }
    }

    #[test]
    fn truncated_frames_are_incomplete_or_errors() {
        for m in samples() {
            let f = frame(&m);
            for cut in 0..f.len() {
                assert!(matches!(parse_frame(&f[..cut]), Ok(None)));
                assert!(recv(&mut &f[..cut]).is_err());
                // A payload cut short but framed consistently is a decode error.
                let p = encode(&m);
                if cut < p.len() {
                    assert!(decode(&p[..cut]).is_err(), "{m:?} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn oversized_and_corrupt_frames_are_refused() {
        let mut f = frame(&Msg::Ping);
        f[8] ^= 0xFF;
        assert!(parse_frame(&f).is_err());
        let mut big = vec![0xFF, 0xFF, 0xFF, 0x7F, 0, 0, 0, 0];
        big.extend_from_slice(&[0; 16]);
        assert!(parse_frame(&big).is_err());
        assert!(recv(&mut &big[..]).is_err());
    }

    #[test]
    fn macs_check_the_key_the_nonces_and_the_direction() {
        let k = Key::from_bytes(b"0123456789abcdef0123".to_vec()).unwrap();
        let other = Key::from_bytes(b"0123456789abcdef0124".to_vec()).unwrap();
        let (np, ns, u) = ([1u8; 32], [2u8; 32], [3u8; 16]);
        let s = k.mac_s(&np, &ns, &u);
        assert!(k.verify_s(&np, &ns, &u, &s));
        assert!(!other.verify_s(&np, &ns, &u, &s));
        assert!(!k.verify_p(&np, &ns, &u, &s), "no reflection");
        assert!(!k.verify_s(&ns, &np, &u, &s));
        assert!(!k.verify_s(&np, &ns, &[4u8; 16], &s));
        let p = k.mac_p(&np, &ns, &u);
        assert!(k.verify_p(&np, &ns, &u, &p));
        assert!(!k.verify_p(&np, &ns, &u, &p[..31]));
        assert!(Key::from_bytes(b"short".to_vec()).is_err());
        assert_eq!(format!("{k:?}"), "Key(<hidden>)");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Fuzz: random bytes never panic the frame parser or the decoder.
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_frame(&b);
            let _ = decode(&b);
            let _ = recv(&mut &b[..]);
            let _ = super::super::capture::decode_rows(&b);
        }

        /// Fuzz: valid frames with bytes flipped, cut or appended never panic, and a
        /// changed payload with a fixed-up checksum decodes to an error or a message.
        #[test]
        fn mutated_frames_never_panic(
            i in 0usize..21,
            pos in any::<prop::sample::Index>(),
            x in any::<u8>(),
            extra in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let m = &samples()[i];
            let mut f = frame(m);
            let p = pos.index(f.len());
            f[p] ^= x;
            f.extend_from_slice(&extra);
            let _ = parse_frame(&f);
            let _ = recv(&mut &f[..]);
            let mut pl = encode(m);
            let q = pos.index(pl.len());
            pl[q] ^= x;
            pl.extend_from_slice(&extra);
            let _ = decode(&pl);
        }
    }
}
