//! A [`Volume`] on a Network Block Device export: a small, synchronous NBD client on
//! `std` sockets (TCP or Unix), with no extra dependency.
//!
//! # Why our own client
//!
//! * The `libnbd` Rust bindings are not published on crates.io (they live in libnbd's
//!   source tree since 1.18), and Debian 12 ships libnbd 1.14, which has no Rust
//!   bindings at all: depending on them means building libnbd from source.
//! * The pure-Rust `nbd` crate (0.3.1, 2019) only speaks `NBD_OPT_EXPORT_NAME`, exposes
//!   a `Read + Write + Seek` cursor, and has no FUA, no `WRITE_ZEROES`, no block-size or
//!   multi-connection negotiation and no error replies of `NBD_OPT_GO`.
//! * The part of the protocol pairfs needs is small and stable (the fixed-newstyle
//!   handshake with `NBD_OPT_GO`, simple replies, READ / WRITE / FLUSH / WRITE_ZEROES /
//!   DISC), and a blocking client fits the `Volume` trait, whose calls are synchronous.
//!   This file is under 1,000 lines with its unit tests, tested against nbdkit and qemu-nbd (tests/nbd.rs).
//!
//! # URIs
//!
//! The form qemu and libnbd use: `nbd://host[:port]/export` (port 10809 by default,
//! `[v6addr]` for IPv6) and `nbd+unix:///export?socket=PATH`. The export name is
//! percent-decoded; an empty name is the server's default export. TLS (`nbds://`) is
//! refused with a clear error.
//!
//! # Durability
//!
//! [`Volume::sync`] sends `NBD_CMD_FLUSH`. A writable open of an export whose server does
//! not advertise `NBD_FLAG_SEND_FLUSH` is refused: pairfs could not order its writes.
//! FUA is not used: every durable step of pairfs is "some writes, then one sync", for
//! which one FLUSH is cheaper than FUA on each write. [`Volume::discard`] must make the
//! range read as zero, which `NBD_CMD_TRIM` does not promise, so it sends
//! `NBD_CMD_WRITE_ZEROES` (holes allowed) when advertised and writes zeros otherwise.
//!
//! # Threads
//!
//! FUSE threads share the volume. Without `NBD_FLAG_CAN_MULTI_CONN` there is one
//! connection behind a mutex (a FLUSH on one connection covers only that connection's
//! writes otherwise). With it, up to [`POOL`] connections are opened lazily and a call
//! takes a free one; a FLUSH on any of them covers the writes completed on all.
//!
//! # A server that goes away
//!
//! A call whose connection fails (EOF, reset, or no answer within the I/O timeout,
//! 30 s, `PAIRFS_NBD_IO_TIMEOUT`) drops it, reconnects with a backoff from 50 ms to 1 s
//! for at most the reconnect timeout (10 s, `PAIRFS_NBD_RECONNECT`, in seconds) and
//! retries the request (reads and writes are idempotent). Past that, it fails with
//! `EIO`, and later calls try one connection each and fail at once until the server is
//! back. A write that the server acknowledged but that was not flushed before its
//! connection was lost may be gone (the server's cache): the next `sync` then fails
//! with `EIO`, for good. Under [`crate::store::volume::Checked`] either failure poisons
//! the image as a failing disk does: writes fail `EIO`, pairs go to `error`.
//!
//! An error the server *replies* (e.g. `ENOSPC`, `EIO`) is returned as that errno,
//! without reconnecting.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::store::volume::Volume;

/// Connections opened at most when the server allows several.
pub const POOL: usize = 4;
const DEFAULT_PORT: u16 = 10809;
const MAX_PAYLOAD: u32 = 32 << 20;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OLDSTYLE: u64 = 0x0000_4202_8186_1253;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags of the export.
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;

/// True if `s` is written as an NBD URI rather than a path.
pub fn is_uri(s: &OsStr) -> bool {
    let b = s.as_bytes();
    b.starts_with(b"nbd://")
        || b.starts_with(b"nbd+unix://")
        || b.starts_with(b"nbds://")
        || b.starts_with(b"nbds+unix://")
}

/// Where an export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// `host:port` over TCP.
    Tcp(String, u16),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Server address.
    pub addr: Addr,
    /// Export name ("" is the default export).
    pub export: String,
}

fn bad_uri(uri: &str, why: &str) -> Error {
    Error::invalid(format!("NBD URI {uri:?}: {why}"))
}

fn percent_decode(uri: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad_uri(uri, "bad %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad_uri(uri, "not UTF-8 after %-decoding"))
}

impl NbdUri {
    /// Parses `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad_uri(uri, "expected nbd:// or nbd+unix://"))?;
        match scheme {
            "nbd" | "nbd+unix" => {}
            "nbds" | "nbds+unix" => {
                return Err(bad_uri(uri, "TLS (nbds) is not supported by pairfs"));
            }
            _ => return Err(bad_uri(uri, "expected nbd:// or nbd+unix://")),
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let export = percent_decode(uri, path)?;
        let mut socket = None;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" => socket = Some(percent_decode(uri, v)?),
                _ => return Err(bad_uri(uri, &format!("unsupported query parameter {k:?}"))),
            }
        }
        let addr = if scheme == "nbd+unix" {
            if !authority.is_empty() {
                return Err(bad_uri(
                    uri,
                    "nbd+unix takes no host (nbd+unix:///export?socket=PATH)",
                ));
            }
            let s = socket.ok_or_else(|| bad_uri(uri, "nbd+unix needs ?socket=PATH"))?;
            if s.is_empty() {
                return Err(bad_uri(uri, "empty socket path"));
            }
            Addr::Unix(PathBuf::from(s))
        } else {
            if socket.is_some() {
                return Err(bad_uri(uri, "?socket= belongs to nbd+unix://"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad_uri(uri, "unclosed [ in host"))?;
                (h.to_string(), after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err(bad_uri(uri, "no host"));
            }
            let port = match port {
                Some(p) => p.parse().map_err(|_| bad_uri(uri, "bad port"))?,
                None => DEFAULT_PORT,
            };
            Addr::Tcp(host, port)
        };
        Ok(NbdUri { addr, export })
    }
}

/// The reconnect policy.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How long to keep trying to reconnect before failing a call with `EIO`.
    pub reconnect: Duration,
    /// How long a request may wait for its reply before the connection counts as lost.
    pub io_timeout: Duration,
}

impl Policy {
    /// 10 s and 30 s, or `PAIRFS_NBD_RECONNECT` / `PAIRFS_NBD_IO_TIMEOUT` (seconds).
    pub fn from_env() -> Policy {
        let secs = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e6)
                .map_or(Duration::from_secs_f64(default), Duration::from_secs_f64)
        };
        Policy {
            reconnect: secs("PAIRFS_NBD_RECONNECT", 10.0),
            io_timeout: secs("PAIRFS_NBD_IO_TIMEOUT", 30.0).max(Duration::from_millis(100)),
        }
    }
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the handshake told us.
#[derive(Debug, Clone, Copy)]
struct ExportInfo {
    size: u64,
    flags: u16,
    min_block: u32,
    max_payload: u32,
}

/// One established connection in transmission phase.
struct Conn {
    s: Sock,
    cookie: u64,
    /// The write sequence number of this connection's last completed write.
    last_write: u64,
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut Sock) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut Sock) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut Sock) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Why a connection attempt failed: the server refused (no retry helps) or the
/// transport failed (retry).
enum ConnectError {
    Refused(String),
    Io(io::Error),
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

fn open_socket(addr: &Addr, timeout: Duration) -> io::Result<Sock> {
    let s = match addr {
        Addr::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            Sock::Unix(s)
        }
        Addr::Tcp(h, port) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{h}: no address"));
            let mut found = None;
            for a in (h.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout.min(Duration::from_secs(5))) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(last)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            Sock::Tcp(s)
        }
    };
    Ok(s)
}

/// Fixed-newstyle handshake: `NBD_OPT_GO` with block-size information, falling back to
/// `NBD_OPT_EXPORT_NAME` on servers that do not know `GO`.
fn handshake(s: &mut Sock, export: &str) -> std::result::Result<ExportInfo, ConnectError> {
    let mut m = [0u8; 8];
    s.read_exact(&mut m)?;
    if &m != NBDMAGIC {
        return Err(ConnectError::Refused(
            "not an NBD server (bad greeting)".into(),
        ));
    }
    match read_u64(s)? {
        IHAVEOPT => {}
        OLDSTYLE => {
            return Err(ConnectError::Refused(
                "the server speaks the old-style handshake; pairfs needs newstyle".into(),
            ));
        }
        x => return Err(ConnectError::Refused(format!("bad handshake magic {x:#x}"))),
    }
    let hflags = read_u16(s)?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = (hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) as u32;
    s.write_all(&cflags.to_be_bytes())?;
    let name = export.as_bytes();
    if name.len() > 4096 {
        return Err(ConnectError::Refused(
            "export name longer than 4096 bytes".into(),
        ));
    }
    if fixed {
        let mut req = Vec::with_capacity(32 + name.len());
        req.extend_from_slice(&IHAVEOPT.to_be_bytes());
        req.extend_from_slice(&OPT_GO.to_be_bytes());
        req.extend_from_slice(&(4 + name.len() as u32 + 2 + 2).to_be_bytes());
        req.extend_from_slice(&(name.len() as u32).to_be_bytes());
        req.extend_from_slice(name);
        req.extend_from_slice(&1u16.to_be_bytes());
        req.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        s.write_all(&req)?;
        let mut info: Option<(u64, u16)> = None;
        let (mut min_block, mut max_payload) = (1u32, MAX_PAYLOAD);
        loop {
            if read_u64(s)? != REPLY_MAGIC_OPT {
                return Err(ConnectError::Io(proto("bad option reply magic")));
            }
            let _opt = read_u32(s)?;
            let typ = read_u32(s)?;
            let len = read_u32(s)?;
            if len > 1 << 20 {
                return Err(ConnectError::Io(proto("option reply too long")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match typ {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => {
                    let it = u16::from_be_bytes([data[0], data[1]]);
                    if it == INFO_EXPORT && data.len() >= 12 {
                        let size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        info = Some((size, flags));
                    } else if it == INFO_BLOCK_SIZE && data.len() >= 14 {
                        min_block = u32::from_be_bytes(data[2..6].try_into().expect("4"));
                        max_payload = u32::from_be_bytes(data[10..14].try_into().expect("4"));
                    }
                }
                REP_INFO => {}
                REP_ERR_UNSUP => return export_name(s, name, no_zeroes),
                t if t & 0x8000_0000 != 0 => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let why = match t {
                        REP_ERR_UNKNOWN => "no such export",
                        REP_ERR_POLICY => "refused by the server's policy",
                        REP_ERR_BLOCK_SIZE_REQD => "the server requires block-size negotiation",
                        _ => "the server refused the export",
                    };
                    return Err(ConnectError::Refused(format!(
                        "{why} {export:?} (error {t:#x}{}{text})",
                        if text.is_empty() { "" } else { ": " }
                    )));
                }
                _ => {}
            }
        }
        let (size, flags) = info.ok_or_else(|| proto("NBD_OPT_GO without export information"))?;
        Ok(ExportInfo {
            size,
            flags,
            min_block: min_block.max(1),
            max_payload: max_payload.clamp(4096, MAX_PAYLOAD),
        })
    } else {
        export_name(s, name, no_zeroes)
    }
}

fn export_name(
    s: &mut Sock,
    name: &[u8],
    no_zeroes: bool,
) -> std::result::Result<ExportInfo, ConnectError> {
    let mut req = Vec::with_capacity(16 + name.len());
    req.extend_from_slice(&IHAVEOPT.to_be_bytes());
    req.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    req.extend_from_slice(&(name.len() as u32).to_be_bytes());
    req.extend_from_slice(name);
    s.write_all(&req)?;
    let size = read_u64(s).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ConnectError::Refused(format!(
                "the server closed the connection: no export {:?}?",
                String::from_utf8_lossy(name)
            ))
        } else {
            ConnectError::Io(e)
        }
    })?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block: 1,
        max_payload: MAX_PAYLOAD,
    })
}

impl Conn {
    /// Sends one request and reads its simple reply. `Err` means the connection is
    /// unusable; `Ok(Err(errno))` is an error the server replied.
    fn request(
        &mut self,
        flags: u16,
        typ: u16,
        off: u64,
        len: u32,
        data: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> io::Result<std::result::Result<(), i32>> {
        self.cookie = self.cookie.wrapping_add(1);
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&typ.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&off.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        match data {
            // One send for a small write (a 4 KiB random write is the common case).
            Some(d) if d.len() <= 64 * 1024 => {
                let mut b = Vec::with_capacity(28 + d.len());
                b.extend_from_slice(&h);
                b.extend_from_slice(d);
                self.s.write_all(&b)?;
            }
            Some(d) => {
                self.s.write_all(&h)?;
                self.s.write_all(d)?;
            }
            None => self.s.write_all(&h)?,
        }
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[0..4].try_into().expect("4"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(proto(format!("bad reply magic {magic:#x}")));
        }
        let err = u32::from_be_bytes(r[4..8].try_into().expect("4"));
        let cookie = u64::from_be_bytes(r[8..16].try_into().expect("8"));
        if cookie != self.cookie {
            return Err(proto("reply to another request"));
        }
        if err != 0 {
            // The errno values of the protocol are Linux's.
            let e = match err as i32 {
                e @ (libc::EPERM
                | libc::EIO
                | libc::ENOMEM
                | libc::EINVAL
                | libc::ENOSPC
                | libc::EOVERFLOW
                | libc::ENOTSUP
                | libc::ESHUTDOWN) => e,
                _ => libc::EIO,
            };
            return Ok(Err(e));
        }
        if let Some(o) = out {
            self.s.read_exact(o)?;
        }
        Ok(Ok(()))
    }
}

/// A volume on an NBD export. See the module documentation.
pub struct NbdVolume {
    uri: NbdUri,
    display: String,
    what: &'static str,
    info: ExportInfo,
    policy: Policy,
    conns: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
    /// Sequence number of completed writes (any connection).
    writes: AtomicU64,
    /// Every write with a sequence number up to this one was flushed.
    flushed: AtomicU64,
    /// A connection with unflushed writes was lost: the next sync must fail.
    lost_unflushed: AtomicBool,
    /// The reconnect budget ran out: try once per call, do not wait.
    gave_up: AtomicBool,
}

impl std::fmt::Debug for NbdVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdVolume")
            .field("uri", &self.display)
            .field("size", &self.info.size)
            .field("flags", &self.info.flags)
            .finish()
    }
}

impl NbdVolume {
    /// Connects to `uri`. A writable volume needs a writable export that advertises
    /// FLUSH. `what` names it in errors ("volume", "copy image").
    pub fn open(uri: &str, writable: bool, what: &'static str) -> Result<NbdVolume> {
        Self::open_with(uri, writable, what, Policy::from_env())
    }

    /// [`NbdVolume::open`] with an explicit reconnect policy.
    pub fn open_with(
        uri: &str,
        writable: bool,
        what: &'static str,
        policy: Policy,
    ) -> Result<NbdVolume> {
        let parsed = NbdUri::parse(uri)?;
        let (conn, info) = connect(&parsed, policy).map_err(|e| match e {
            ConnectError::Refused(m) => Error::io(
                what,
                io::Error::new(io::ErrorKind::ConnectionRefused, format!("{uri}: {m}")),
            ),
            ConnectError::Io(e) => Error::io(what, io::Error::new(e.kind(), format!("{uri}: {e}"))),
        })?;
        if writable && info.flags & TF_READ_ONLY != 0 {
            return Err(Error::invalid(format!(
                "{what} {uri}: the NBD export is read-only"
            )));
        }
        if writable && info.flags & TF_SEND_FLUSH == 0 {
            return Err(Error::invalid(format!(
                "{what} {uri}: the NBD server does not advertise FLUSH, so pairfs cannot make \
                 writes durable in order (enable flush on the server, e.g. nbdkit without \
                 the nocache filter, qemu-nbd without --cache=unsafe)"
            )));
        }
        if info.min_block > 1 {
            return Err(Error::invalid(format!(
                "{what} {uri}: the export needs {}-byte aligned requests; pairfs needs \
                 byte-granular access (minimum block size 1)",
                info.min_block
            )));
        }
        let n = if info.flags & TF_CAN_MULTI_CONN != 0 {
            POOL
        } else {
            1
        };
        log::debug!(
            "{what} {uri}: {} bytes, flags {:#x} (flush {}, fua {}, trim {}, write_zeroes {}, \
             multi-conn {}), max payload {}",
            info.size,
            info.flags,
            info.flags & TF_SEND_FLUSH != 0,
            info.flags & TF_SEND_FUA != 0,
            info.flags & TF_SEND_TRIM != 0,
            info.flags & TF_SEND_WRITE_ZEROES != 0,
            info.flags & TF_CAN_MULTI_CONN != 0,
            info.max_payload
        );
        let mut conns: Vec<Mutex<Option<Conn>>> = (0..n).map(|_| Mutex::new(None)).collect();
        *conns[0].get_mut().expect("fresh mutex") = Some(conn);
        Ok(NbdVolume {
            uri: parsed,
            display: uri.to_string(),
            what,
            info,
            policy,
            conns,
            next: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            lost_unflushed: AtomicBool::new(false),
            gave_up: AtomicBool::new(false),
        })
    }

    /// Number of connections the volume may open (1 unless the server allows
    /// multi-conn).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// True if the server advertises `NBD_CMD_WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.info.flags & TF_SEND_WRITE_ZEROES != 0
    }

    fn err(&self, kind: io::ErrorKind, errno: Option<i32>, msg: String) -> Error {
        let e = match errno {
            Some(n) => io::Error::new(
                io::Error::from_raw_os_error(n).kind(),
                format!(
                    "{}: {msg} ({})",
                    self.display,
                    io::Error::from_raw_os_error(n)
                ),
            ),
            None => io::Error::new(kind, format!("{}: {msg}", self.display)),
        };
        // Keep the errno where there is one (ENOSPC must stay ENOSPC).
        match errno {
            Some(n) if n == libc::ENOSPC => Error::io(self.what, io::Error::from_raw_os_error(n)),
            _ => Error::io(self.what, e),
        }
    }

    /// Takes a connection slot: a free one if any, else waits for one.
    fn slot(&self) -> MutexGuard<'_, Option<Conn>> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(g) = self.conns[(start + i) % n].try_lock() {
                return g;
            }
        }
        self.conns[start].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_conn(&self, slot: &mut Option<Conn>) {
        if let Some(c) = slot.take()
            && c.last_write > self.flushed.load(Ordering::Acquire)
        {
            self.lost_unflushed.store(true, Ordering::Release);
        }
    }

    /// Runs `op` on a connection, reconnecting per the policy on transport failures.
    fn with_conn(
        &self,
        mut op: impl FnMut(&mut Conn) -> io::Result<std::result::Result<(), i32>>,
    ) -> Result<()> {
        let mut slot = self.slot();
        let quick = self.gave_up.load(Ordering::Acquire);
        let deadline = Instant::now() + self.policy.reconnect;
        let mut backoff = Duration::from_millis(50);
        let mut last: String;
        loop {
            if slot.is_none() {
                match connect(&self.uri, self.policy) {
                    Ok((c, info)) => {
                        if info.size != self.info.size {
                            return Err(self.err(
                                io::ErrorKind::Other,
                                None,
                                format!(
                                    "the export changed size on reconnect ({} -> {} bytes)",
                                    self.info.size, info.size
                                ),
                            ));
                        }
                        if self.gave_up.swap(false, Ordering::AcqRel) {
                            log::warn!("{} {}: reconnected", self.what, self.display);
                        }
                        *slot = Some(c);
                    }
                    Err(e) => {
                        last = match e {
                            ConnectError::Refused(m) => m,
                            ConnectError::Io(e) => e.to_string(),
                        };
                        if quick || Instant::now() + backoff > deadline {
                            return Err(self.give_up(&last));
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let c = slot.as_mut().expect("connected above");
            match op(c) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(errno)) => {
                    return Err(self.err(
                        io::ErrorKind::Other,
                        Some(errno),
                        "the server failed the request".into(),
                    ));
                }
                Err(e) => {
                    last = e.to_string();
                    log::warn!(
                        "{} {}: connection lost ({last}); reconnecting for up to {:?}",
                        self.what,
                        self.display,
                        self.policy.reconnect
                    );
                    self.drop_conn(&mut slot);
                    if quick || Instant::now() >= deadline {
                        return Err(self.give_up(&last));
                    }
                }
            }
        }
    }

    fn give_up(&self, last: &str) -> Error {
        if !self.gave_up.swap(true, Ordering::AcqRel) {
            log::error!(
                "{} {}: NBD server unreachable for {:?} ({last}); failing I/O with EIO",
                self.what,
                self.display,
                self.policy.reconnect
            );
        }
        self.err(
            io::ErrorKind::Other,
            None,
            format!(
                "NBD server unreachable (gave up reconnecting after {:?}: {last})",
                self.policy.reconnect
            ),
        )
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(self.err(
                io::ErrorKind::InvalidInput,
                None,
                format!("access [{off}, +{len}) beyond the end ({})", self.info.size),
            )),
        }
    }

    fn chunk(&self) -> usize {
        self.info.max_payload as usize
    }
}

fn connect(uri: &NbdUri, policy: Policy) -> std::result::Result<(Conn, ExportInfo), ConnectError> {
    let mut s = open_socket(&uri.addr, policy.io_timeout)?;
    let info = handshake(&mut s, &uri.export)?;
    Ok((
        Conn {
            s,
            cookie: 0,
            last_write: 0,
        },
        info,
    ))
}

impl Volume for NbdVolume {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len() as u64)?;
        for (i, part) in buf.chunks_mut(self.chunk()).enumerate() {
            let o = off + (i * self.chunk()) as u64;
            let n = part.len() as u32;
            self.with_conn(|c| c.request(0, CMD_READ, o, n, None, Some(&mut *part)))?;
        }
        Ok(())
    }

    fn write_at(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.check(off, buf.len() as u64)?;
        for (i, part) in buf.chunks(self.chunk()).enumerate() {
            let o = off + (i * self.chunk()) as u64;
            self.with_conn(|c| {
                let r = c.request(0, CMD_WRITE, o, part.len() as u32, Some(part), None)?;
                if r.is_ok() {
                    c.last_write = self.writes.fetch_add(1, Ordering::AcqRel) + 1;
                }
                Ok(r)
            })?;
        }
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let step = self.chunk() as u64;
        if self.can_write_zeroes() {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(step) as u32;
                let o = off + done;
                self.with_conn(|c| {
                    let r = c.request(0, CMD_WRITE_ZEROES, o, n, None, None)?;
                    if r.is_ok() {
                        c.last_write = self.writes.fetch_add(1, Ordering::AcqRel) + 1;
                    }
                    Ok(r)
                })?;
                done += n as u64;
            }
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(off + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        if self.info.flags & TF_SEND_FLUSH == 0 {
            // Read-only open of an export without flush: nothing was written.
            return Ok(());
        }
        let upto = self.writes.load(Ordering::Acquire);
        let fail_if_lost = || {
            if self.lost_unflushed.load(Ordering::Acquire) {
                Err(self.err(
                    io::ErrorKind::Other,
                    None,
                    "writes acknowledged before a lost connection were never flushed; \
                     they may be lost"
                        .into(),
                ))
            } else {
                Ok(())
            }
        };
        fail_if_lost()?;
        // Flush on every connection that completed writes since the last flush, on that
        // very connection: a flush on a new connection would not cover writes that a
        // server restarted since then acknowledged. (With multi-conn one flush would do
        // while the server stays up; the pool is small, so this costs little.)
        for m in &self.conns {
            let mut slot = m.lock().unwrap_or_else(|p| p.into_inner());
            let Some(c) = slot.as_mut() else { continue };
            if c.last_write <= self.flushed.load(Ordering::Acquire) {
                continue;
            }
            match c.request(0, CMD_FLUSH, 0, 0, None, None) {
                Ok(Ok(())) => {}
                Ok(Err(errno)) => {
                    return Err(self.err(
                        io::ErrorKind::Other,
                        Some(errno),
                        "the server failed the flush".into(),
                    ));
                }
                Err(e) => {
                    log::warn!(
                        "{} {}: connection lost in flush ({e})",
                        self.what,
                        self.display
                    );
                    self.drop_conn(&mut slot);
                }
            }
        }
        fail_if_lost()?;
        self.flushed.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.info.size
    }
}

impl Drop for NbdVolume {
    fn drop(&mut self) {
        // A polite disconnect; the server needs no reply.
        for m in &mut self.conns {
            if let Some(c) = m.get_mut().unwrap_or_else(|p| p.into_inner()).as_mut() {
                c.cookie = c.cookie.wrapping_add(1);
                let mut h = [0u8; 28];
                h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                h[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
                h[8..16].copy_from_slice(&c.cookie.to_be_bytes());
                let _ = c.s.write_all(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_uri_forms() {
        let u = NbdUri::parse("nbd://localhost/disk").unwrap();
        assert_eq!(u.addr, Addr::Tcp("localhost".into(), 10809));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd://127.0.0.1:10900/a%20b").unwrap();
        assert_eq!(u.addr, Addr::Tcp("127.0.0.1".into(), 10900));
        assert_eq!(u.export, "a b");
        let u = NbdUri::parse("nbd://[::1]:10901").unwrap();
        assert_eq!(u.addr, Addr::Tcp("::1".into(), 10901));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///vol?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.addr, Addr::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "vol");
        let u = NbdUri::parse("nbd+unix://?socket=/s").unwrap();
        assert_eq!(u.export, "");
        for bad in [
            "nbd+unix:///vol",
            "nbd+unix://host/vol?socket=/s",
            "nbds://h/e",
            "nbd://h:port/e",
            "nbd:///e",
            "nbd://h/e?socket=/s",
            "nbd://h/%zz",
            "http://h/e",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
        assert!(is_uri(OsStr::new("nbd://h/e")));
        assert!(is_uri(OsStr::new("nbd+unix:///e?socket=/s")));
        assert!(!is_uri(OsStr::new("/var/tmp/nbd://x")));
        assert!(!is_uri(OsStr::new("vol.img")));
    }

    #[test]
    fn refuses_a_non_nbd_server() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        });
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let e = NbdVolume::open(&uri, false, "volume").unwrap_err();
        assert!(e.to_string().contains("not an NBD server"), "{e}");
        t.join().unwrap();
    }
}
