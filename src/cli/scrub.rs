//! `pairfs scrub VOLUME|MOUNTPOINT [--json]`: checks every copied track of every frozen
//! copy against its checksum ([`crate::snap::sums`]). On a mountpoint the running daemon
//! does it (`getxattr(MOUNTPOINT, "user.pairfs.scrub")` returns the report); on a volume
//! that is not mounted (or mounted only by `mount-copy`) it opens the volume read-only and
//! reads the copy image itself. Exit code 1 if a track does not match its sum.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::core::volfile::Paths;
use crate::error::{Error, Result};
use crate::snap::sums::ScrubReport;

/// Scrub through the daemon serving the main mount `mnt`.
pub fn online(mnt: &Path) -> Result<ScrubReport> {
    let c = CString::new(mnt.as_os_str().as_bytes()).map_err(|_| Error::invalid("NUL"))?;
    let n = CString::new("user.pairfs.scrub").expect("no NUL");
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings and a buffer of the length passed.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(Error::io("scrub", std::io::Error::last_os_error()));
    }
    buf.truncate(r as usize);
    ScrubReport::parse(&String::from_utf8_lossy(&buf))
}

/// Scrub of a volume that no live mount holds: a read-only open of the volume (the
/// stored sums, bitmaps and frozen maps; a lazy instant's unchanged files from the live
/// tables), the copy image read directly.
pub fn offline(p: &Paths) -> Result<ScrubReport> {
    let opts = crate::core::fs::Options {
        readonly: true,
        ..crate::core::fs::Options::default()
    };
    let (fs, _lock) = crate::core::volfile::open(p, opts).map_err(|e| match e {
        Error::Locked(_) => Error::Locked(format!(
            "{} is mounted; scrub its mountpoint instead",
            p.volume.display()
        )),
        e => e,
    })?;
    fs.engine.scrub(&fs)
}

/// `pairfs scrub`.
pub fn run(p: &Paths, as_json: bool) -> Result<u8> {
    let target = std::fs::canonicalize(&p.volume).unwrap_or_else(|_| p.volume.clone());
    let mounted = crate::cli::status::pairfs_mounts()
        .into_iter()
        .any(|(m, src)| m == target && !src.ends_with(":copy") && !src.ends_with(":snapshot"));
    let r = if mounted {
        online(&target)?
    } else {
        offline(p)?
    };
    if as_json {
        let v = serde_json::json!({
            "checked": r.checked,
            "unsummed": r.unsummed,
            "bad_total": r.bad_total,
            "bad": r.bad.iter().map(|b| serde_json::json!({
                "pair": b.pair,
                "path": b.path,
                "file_track": b.ftrack,
                "track": b.vtrack,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        print!("{}", r.text());
        if r.bad_total > r.bad.len() as u64 {
            println!("({} more not listed)", r.bad_total - r.bad.len() as u64);
        }
    }
    Ok(if r.bad_total > 0 { 1 } else { 0 })
}
