//! `pairfs diff PATH [--generation NAME] [--json]`: the byte ranges of a file (or of each
//! regular file beneath a directory) changed since its pair's split, asked of the running
//! daemon through `getxattr(FILE, "user.pairfs.diff[.FROM]")` pages (format in
//! [`crate::snap::diff`]). Reads no file data.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::snap::diff::{FileDiff, decode_page};

/// The pair's own frozen copy (also: no `--generation`).
pub const DEFAULT_GENERATION: &str = crate::snap::gens::DEFAULT_NAME;

fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>> {
    let c =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::invalid("path with NUL"))?;
    let n = CString::new(name).map_err(|_| Error::invalid("name with NUL"))?;
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings and a buffer of the length passed.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io("diff", e));
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// The diff of one regular file, all pages, against generation `generation` (None:
/// the pair's own frozen copy).
pub fn file_diff(path: &Path, generation: Option<&str>) -> Result<FileDiff> {
    let at = generation.map_or_else(String::new, |g| format!("@{g}"));
    // A write between two pages can change the answer; start again (a few times).
    for _ in 0..5 {
        let mut from = 0;
        let mut all = Vec::new();
        let mut head: Option<FileDiff> = None;
        let consistent = loop {
            let name = if from == 0 {
                format!("user.pairfs.diff{at}")
            } else {
                format!("user.pairfs.diff.{from}{at}")
            };
            let (mut h, next) = decode_page(&getxattr(path, &name)?)?;
            if head
                .as_ref()
                .is_some_and(|p| (p.size, p.state.as_str()) != (h.size, h.state.as_str()))
            {
                break false;
            }
            all.append(&mut h.ranges);
            head.get_or_insert(h);
            match next {
                Some(n) if n > from => from = n,
                _ => break true,
            }
        };
        if consistent {
            let mut d = head.ok_or_else(|| Error::invalid("empty diff"))?;
            d.ranges = all;
            return Ok(d);
        }
    }
    Err(Error::Busy(format!(
        "{}: the file kept changing while its diff was read",
        path.display()
    )))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut ents: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("diff", e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io("diff", e))?;
    ents.sort_by_key(|e| e.file_name());
    for e in ents {
        let t = e.file_type().map_err(|e| Error::io("diff", e))?;
        if t.is_dir() {
            walk(&e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

fn json(path: &str, d: &FileDiff) -> serde_json::Value {
    serde_json::json!({
        "path": path,
        "pair": d.pair,
        "state": d.state,
        "size": d.size,
        "old_size": d.old_size,
        "track_size": d.track_size,
        "changed_bytes": d.ranges.iter().map(|r| r.1).sum::<u64>(),
        "ranges": d.ranges.iter().map(|&(o, l)| serde_json::json!([o, l])).collect::<Vec<_>>(),
    })
}

/// `pairfs diff`. Exit codes: 0, 1 (a file failed), 2 (ENOENT: no such generation).
pub fn diff(path: &Path, generation: Option<&str>, as_json: bool) -> Result<u8> {
    let generation = generation.filter(|g| *g != DEFAULT_GENERATION);
    if let Some(g) = generation {
        crate::snap::gens::check_name(g)?;
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io("diff", e))?;
    if !meta.is_dir() {
        let d = match file_diff(path, generation) {
            Ok(d) => d,
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                let e =
                    Error::NotFound(format!("generation {:?}", generation.unwrap_or("default")));
                eprintln!("pairfs diff: {}: {e} (no such generation?)", path.display());
                return Ok(libc::ENOENT as u8);
            }
            Err(e) => return Err(e),
        };
        if as_json {
            let v = json(&path.display().to_string(), &d);
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        } else {
            println!(
                "# size={} old_size={} pair={} state={} track_size={}",
                d.size, d.old_size, d.pair, d.state, d.track_size
            );
            for (o, l) in d.ranges {
                println!("{o} {l}");
            }
        }
        return Ok(0);
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    let mut code = 0;
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(path).unwrap_or(&f).display().to_string();
        match file_diff(&f, generation) {
            Ok(d) if as_json => out.push(json(&rel, &d)),
            Ok(d) => {
                println!(
                    "# {rel} size={} old_size={} pair={} state={}",
                    d.size, d.old_size, d.pair, d.state
                );
                for (o, l) in d.ranges {
                    println!("{o} {l} {rel}");
                }
            }
            Err(e) => {
                eprintln!("pairfs diff: {}: {e}", f.display());
                code = 1;
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    }
    Ok(code)
}
