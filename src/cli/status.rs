//! `pairfs status` and `--wait`: read `user.pairfs.state` / `user.pairfs.pairs` from a
//! mount and show them as a table, JSON, or progress bars.

use std::ffi::CString;
use std::io::{IsTerminal, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// One parsed state line: the state word and its `key=value` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct StateLine {
    /// First word.
    pub state: String,
    /// Fields in order.
    pub fields: Vec<(String, String)>,
}

impl StateLine {
    /// Parses `state k=v k="quoted v" ...`; a quoted value has Rust's string escapes
    /// (`{:?}`: `\"`, `\\`, `\n`, `\t`, `\r`, `\0`, `\u{..}`).
    pub fn parse(line: &str) -> StateLine {
        let line = line.trim();
        let (state, mut rest) = line.split_once(' ').unwrap_or((line, ""));
        let mut fields = Vec::new();
        while let Some((k, r)) = rest.trim_start().split_once('=') {
            let (v, r2) = if let Some(q) = r.strip_prefix('"') {
                unquote(q)
            } else {
                let end = r.find(' ').unwrap_or(r.len());
                (r[..end].to_string(), &r[end..])
            };
            fields.push((k.trim().to_string(), v));
            rest = r2;
        }
        StateLine {
            state: state.to_string(),
            fields,
        }
    }

    /// A field's value.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields.iter().find(|f| f.0 == k).map(|f| f.1.as_str())
    }

    /// As a JSON object (numbers where the value is numeric).
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("state".into(), self.state.clone().into());
        for (k, v) in &self.fields {
            let v = v.trim_end_matches('%');
            let val = if let Ok(n) = v.parse::<u64>() {
                n.into()
            } else if let Ok(f) = v.parse::<f64>() {
                serde_json::Value::from(f)
            } else {
                v.to_string().into()
            };
            m.insert(k.clone(), val);
        }
        serde_json::Value::Object(m)
    }
}

/// The value of a quoted field, `q` starting after the opening quote: its unescaped
/// text and what follows the closing quote.
fn unquote(q: &str) -> (String, &str) {
    let mut out = String::new();
    let mut it = q.char_indices();
    while let Some((i, c)) = it.next() {
        match c {
            '"' => return (out, &q[i + 1..]),
            '\\' => match it.next().map(|x| x.1) {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('0') => out.push('\0'),
                Some('u') => {
                    // \u{HEX}
                    let rest = &q[i + 2..];
                    let hex = rest
                        .strip_prefix('{')
                        .and_then(|r| r.split_once('}'))
                        .map(|(h, _)| h);
                    match hex.and_then(|h| u32::from_str_radix(h, 16).ok()) {
                        Some(n) => {
                            out.push(char::from_u32(n).unwrap_or('\u{fffd}'));
                            for _ in 0..hex.map_or(0, |h| h.len() + 2) {
                                it.next();
                            }
                        }
                        None => out.push_str("\\u"),
                    }
                }
                Some(o) => out.push(o),
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    (out, "")
}

/// The pair lines of a mount (`user.pairfs.pairs` of its root).
pub(crate) fn get_pairs(mnt: &Path) -> Result<Vec<StateLine>> {
    Ok(
        String::from_utf8_lossy(&get_root_xattr(mnt, "user.pairfs.pairs")?)
            .lines()
            .map(StateLine::parse)
            .collect(),
    )
}

/// The named generations of a mount (`user.pairfs.generations` of its root).
pub(crate) fn get_generations(mnt: &Path) -> Result<Vec<StateLine>> {
    Ok(
        String::from_utf8_lossy(&get_root_xattr(mnt, "user.pairfs.generations")?)
            .lines()
            .map(StateLine::parse)
            .collect(),
    )
}

/// The volume line of a mount (`user.pairfs.volume` of its root): sizes, clean flag,
/// copy counters since mount.
pub(crate) fn get_volume(mnt: &Path) -> Result<StateLine> {
    Ok(StateLine::parse(&String::from_utf8_lossy(&get_root_xattr(
        mnt,
        "user.pairfs.volume",
    )?)))
}

fn get_root_xattr(mnt: &Path, name: &str) -> Result<Vec<u8>> {
    let c =
        CString::new(mnt.as_os_str().as_bytes()).map_err(|_| Error::invalid("path with NUL"))?;
    let name = CString::new(name).map_err(|_| Error::invalid("xattr name with NUL"))?;
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: valid C strings and a buffer of the length passed.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(Error::invalid(format!(
            "{}: {}",
            mnt.display(),
            std::io::Error::last_os_error()
        )));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn collect(path: Option<&Path>) -> Result<Vec<(PathBuf, StateLine)>> {
    let mounts: Vec<PathBuf> = pairfs_mounts()
        .into_iter()
        .filter(|(_, s)| !s.ends_with(":copy"))
        .map(|(m, _)| m)
        .collect();
    let mut out = Vec::new();
    match path {
        Some(p) => {
            let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            if mounts.contains(&canon) {
                for l in get_pairs(&canon)? {
                    out.push((canon.clone(), l));
                }
            } else {
                out.push((p.to_path_buf(), StateLine::parse(&getxattr_state(p)?)));
            }
        }
        None => {
            for m in mounts {
                for l in get_pairs(&m)? {
                    out.push((m.clone(), l));
                }
            }
        }
    }
    Ok(out)
}

fn human_bytes(s: Option<&str>) -> String {
    s.and_then(|v| v.parse::<f64>().ok())
        .map_or_else(|| "-".into(), |b| crate::cli::size::format_size(b as u64))
}

/// A text progress bar, e.g. `[######----]`.
fn bar(progress: Option<&str>, width: usize) -> String {
    let pct: f64 = progress
        .and_then(|p| p.trim_end_matches('%').parse().ok())
        .unwrap_or(0.0);
    let done = ((pct / 100.0) * width as f64)
        .round()
        .clamp(0.0, width as f64) as usize;
    format!("[{}{}]", "#".repeat(done), "-".repeat(width - done))
}

fn print_table(rows: &[(PathBuf, StateLine)]) {
    println!(
        "{:<10} {:<22} {:>8} {:>10} {:>10} {:>12} {:>8} {:>10}  PATH",
        "STATE", "COPY", "PROGRESS", "TO_COPY", "DIRTY", "RATE", "ETA", "PINNED"
    );
    for (p, l) in rows {
        let path = l
            .get("path")
            .map_or_else(|| p.display().to_string(), str::to_string);
        println!(
            "{:<10} {:<22} {:>8} {:>10} {:>10} {:>12} {:>8} {:>10}  {}",
            l.state,
            bar(l.get("progress"), 20),
            l.get("progress").unwrap_or("-"),
            l.get("to_copy").unwrap_or("-"),
            l.get("dirty_tracks").unwrap_or("-"),
            l.get("rate_bps").map_or_else(
                || "-".into(),
                |_| format!("{}/s", human_bytes(l.get("rate_bps")))
            ),
            l.get("eta_s")
                .map_or_else(|| "-".into(), |e| format!("{e}s")),
            human_bytes(l.get("pinned_bytes")),
            path
        );
        if let Some(e) = l.get("error") {
            println!("           error: {e}");
        }
    }
}

/// Sets `user.pairfs.NAME` to `value` on a path.
pub fn setxattr_value(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let c =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::invalid("path with NUL"))?;
    let n = CString::new(format!("user.pairfs.{name}")).expect("no NUL");
    // SAFETY: valid C strings and a buffer of the length passed.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(Error::invalid(format!(
            "{name} {}: {} (see the daemon's log; not a pairfs mount root?)",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// `user.pairfs.migration` of a mount: `none`, `migrating ...`, `migrated ...` or
/// `aborted ...`.
pub fn migration_state(mnt: &Path) -> Result<String> {
    getxattr_named(mnt, "user.pairfs.migration")
}

/// Blocks until the migration of `mnt` has switched or aborted; a progress bar on a
/// terminal. Returns the final state line.
pub fn wait_migration(mnt: &Path) -> Result<String> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {elapsed} (eta {eta})")
                .expect("template")
                .progress_chars("=> "),
        );
        b
    });
    loop {
        let line = migration_state(mnt)?;
        let l = StateLine::parse(&line);
        if l.state != "migrating" {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            return Ok(line);
        }
        if let Some(b) = &bar {
            let pct: f64 = l
                .get("progress")
                .and_then(|p| p.trim_end_matches('%').parse().ok())
                .unwrap_or(0.0);
            b.set_position((pct * 10.0) as u64);
            b.set_message(format!("migrating {}/s", human_bytes(l.get("rate_bps"))));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The migration of each mount in `rows` that has one, as a row (path: `image -> target`).
/// The main mounts (no copy or snapshot mounts): the one at `path`, or all.
fn main_mounts(path: Option<&Path>) -> Vec<PathBuf> {
    let want = path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    pairfs_mounts()
        .into_iter()
        .filter(|(m, s)| {
            !s.ends_with(":copy")
                && !s.ends_with(":snapshot")
                && want.as_ref().is_none_or(|w| w == m)
        })
        .map(|(m, _)| m)
        .collect()
}

fn migration_rows(path: Option<&Path>) -> Vec<(PathBuf, StateLine)> {
    let mut out = Vec::new();
    for m in main_mounts(path) {
        let Ok(line) = migration_state(&m) else {
            continue;
        };
        let mut l = StateLine::parse(&line);
        if l.state == "none" {
            continue;
        }
        let desc = format!(
            "{} image -> {}",
            l.get("image").unwrap_or("?"),
            l.get("target").unwrap_or("?")
        );
        l.fields.push(("path".into(), desc));
        out.push((m, l));
    }
    out
}

/// The linked clones of each mount (`user.pairfs.clones` of its root, `pairfs clone`):
/// `clone ...` lines, and a `clones total=N` line when some were left out.
fn clone_rows(path: Option<&Path>) -> Vec<(PathBuf, StateLine)> {
    let mut out = Vec::new();
    for m in main_mounts(path) {
        let Ok(v) = get_root_xattr(&m, "user.pairfs.clones") else {
            continue;
        };
        let lines: Vec<StateLine> = String::from_utf8_lossy(&v)
            .lines()
            .map(StateLine::parse)
            .collect();
        let shown = lines.iter().filter(|l| l.state == "clone").count();
        for l in lines {
            let total: usize = l.get("total").and_then(|t| t.parse().ok()).unwrap_or(0);
            if l.state == "clone" || (l.state == "clones" && total > shown) {
                out.push((m.clone(), l));
            }
        }
    }
    out
}

/// The named generations of each mount in `path` (or all), as rows
/// (`user.pairfs.generations`: name, pair, instant, space).
fn generation_rows(path: Option<&Path>) -> Vec<(PathBuf, StateLine)> {
    let mut out = Vec::new();
    for m in main_mounts(path) {
        for l in get_generations(&m).unwrap_or_default() {
            out.push((m.clone(), l));
        }
    }
    out
}

fn print_generations(rows: &[(PathBuf, StateLine)]) {
    println!(
        "{:<16} {:>6} {:<31} {:>12} {:>12}  PATH",
        "GENERATION", "PAIR", "SPLIT_TIME", "SAVED", "OWN"
    );
    for (_, l) in rows {
        println!(
            "{:<16} {:>6} {:<31} {:>12} {:>12}  {}",
            l.get("name").unwrap_or("-"),
            l.get("pair").unwrap_or("-"),
            l.get("split_time").unwrap_or("-"),
            human_bytes(l.get("saved_bytes")),
            human_bytes(l.get("own_bytes")),
            l.get("path").unwrap_or("-"),
        );
    }
}

/// The replica link of each mount in `path` (or all) that has one, as a row
/// (`user.pairfs.replica`: state, peer, mode, queued and out-of-sync bytes).
fn replica_rows(path: Option<&Path>) -> Vec<(PathBuf, StateLine)> {
    let mut out = Vec::new();
    for m in main_mounts(path) {
        let Ok(v) = get_root_xattr(&m, "user.pairfs.replica") else {
            continue;
        };
        for line in String::from_utf8_lossy(&v).lines() {
            let mut l = StateLine::parse(line);
            if l.state == "none" {
                continue;
            }
            let desc = format!(
                "replica {} ({}, {}; queued {}, out of sync {})",
                l.get("peer").unwrap_or("?"),
                l.get("mode").unwrap_or("?"),
                l.get("on_disconnect").unwrap_or("?"),
                human_bytes(l.get("queued_bytes")),
                human_bytes(l.get("out_of_sync_bytes")),
            );
            l.fields.push(("path".into(), desc));
            out.push((m.clone(), l));
        }
    }
    out
}

fn print_clones(rows: &[(PathBuf, StateLine)]) {
    println!(
        "{:<6} {:>6} {:>12} {:>10} {:>14}  PATH",
        "CLONE", "PAIR", "SIZE", "WRITTEN", "FROM_FROZEN"
    );
    for (_, l) in rows {
        if l.state == "clones" {
            println!(
                "(and more: {} clones in all)",
                l.get("total").unwrap_or("?")
            );
            continue;
        }
        println!(
            "{:<6} {:>6} {:>12} {:>10} {:>14}  {}",
            "clone",
            l.get("pair").unwrap_or("-"),
            human_bytes(l.get("size")),
            l.get("written_tracks").unwrap_or("-"),
            l.get("backed_tracks").unwrap_or("-"),
            l.get("path").unwrap_or("-"),
        );
    }
}

/// The paths of the clones that read from the frozen copy of the pair at `path` (comma
/// separated), if any: why its update, resync or release is refused.
pub fn clones_of(path: &Path) -> Option<String> {
    let id = StateLine::parse(&getxattr_state(path).ok()?)
        .get("pair")?
        .to_string();
    let canon = std::fs::canonicalize(path).ok()?;
    let (mnt, _) = pairfs_mounts()
        .into_iter()
        .filter(|(m, s)| !s.ends_with(":copy") && !s.ends_with(":snapshot") && canon.starts_with(m))
        .max_by_key(|(m, _)| m.as_os_str().len())?;
    let v = get_root_xattr(&mnt, "user.pairfs.clones").ok()?;
    let paths: Vec<String> = String::from_utf8_lossy(&v)
        .lines()
        .map(StateLine::parse)
        .filter(|l| l.state == "clone" && l.get("pair") == Some(id.as_str()))
        .filter_map(|l| l.get("path").map(|p| format!("{}{p}", mnt.display())))
        .collect();
    (!paths.is_empty()).then(|| paths.join(", "))
}

/// `pairfs status`.
pub fn status(path: Option<&Path>, json: bool, watch: bool) -> Result<u8> {
    loop {
        let mut rows = collect(path)?;
        let mig = migration_rows(path);
        rows.extend(mig);
        rows.extend(replica_rows(path));
        let clones = clone_rows(path);
        let gens = generation_rows(path);
        if json {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .chain(clones.iter())
                .chain(gens.iter())
                .map(|(p, l)| {
                    let mut j = l.json();
                    if j.get("path").is_none() {
                        j["path"] = p.display().to_string().into();
                    }
                    j
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            if rows.is_empty() {
                println!("no pairs");
            } else {
                print_table(&rows);
            }
            if !clones.is_empty() {
                print_clones(&clones);
            }
            if !gens.is_empty() {
                print_generations(&gens);
            }
        }
        if !watch {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Blocks until the pair at `path` has no copy running; shows a progress bar on a
/// terminal. Fails if the pair ends in `error`.
pub fn wait_until_done(path: &Path) -> Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {pos}% {elapsed} (eta {eta})",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b
    });
    loop {
        let l = StateLine::parse(&getxattr_state(path)?);
        match l.state.as_str() {
            "forming" | "splitting" | "updating" | "resyncing" => {
                if let Some(b) = &bar {
                    let pct: f64 = l
                        .get("progress")
                        .and_then(|p| p.trim_end_matches('%').parse().ok())
                        .unwrap_or(0.0);
                    b.set_position(pct as u64);
                    b.set_message(format!("{} {}", l.state, human_bytes(l.get("rate_bps"))) + "/s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            "error" => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(Error::invalid(format!(
                    "{}: pair is in error: {}",
                    path.display(),
                    l.get("error").unwrap_or("?")
                )));
            }
            _ => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok(());
            }
        }
    }
}

/// Whether `p` starts with the magic of a pairfs volume image.
fn is_volume(p: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"PAIRFSV1"
}

/// The pairfs mounts in /proc/self/mountinfo: (mountpoint, `pairfs:VOLUME` with a
/// `:copy` or `:snapshot` suffix for those mounts).
pub fn pairfs_mounts() -> Vec<(PathBuf, String)> {
    let Ok(s) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in s.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let fstype = f.get(dash + 1).copied().unwrap_or("");
        let source = f.get(dash + 2).copied().unwrap_or("");
        // Main mounts show the volume path (older versions `pairfs:PATH`), copy and
        // snapshot mounts `pairfs:PATH:copy` and `pairfs:PATH:snapshot`. The type is
        // `fuse` when mounted by root (mount(2) has no subtype), `fuse.pairfs` through
        // fusermount3; a plain path is ours if it is a pairfs volume.
        if (fstype != "fuse" && fstype != "fuse.pairfs") || f.len() <= 4 {
            continue;
        }
        let unescape = |x: &str| {
            x.replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        };
        let src = unescape(source);
        let src = if src.starts_with("pairfs:") {
            src
        } else if src.starts_with('/') && is_volume(Path::new(&src)) {
            format!("pairfs:{src}")
        } else {
            continue;
        };
        out.push((PathBuf::from(unescape(f[4])), src));
    }
    out
}

/// Reads `user.pairfs.state` of a path.
pub fn getxattr_state(path: &Path) -> Result<String> {
    getxattr_named(path, "user.pairfs.state")
}

fn getxattr_named(path: &Path, name: &str) -> Result<String> {
    let c =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::invalid("path with NUL"))?;
    let name = CString::new(name).expect("no NUL");
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of the length passed.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(Error::invalid(format!(
            "{}: {} (not on a pairfs mount?)",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_state_lines() {
        let l = StateLine::parse("split pair=3 progress=100.0% to_copy=0 error=\"a b\" x=y");
        assert_eq!(l.state, "split");
        assert_eq!(l.get("pair"), Some("3"));
        assert_eq!(l.get("error"), Some("a b"));
        assert_eq!(l.get("x"), Some("y"));
        assert_eq!(l.json()["to_copy"], 0);
        assert_eq!(StateLine::parse("none").state, "none");
        let odd = "/a \"b\" c\\d\ne\u{1b}é";
        let l = StateLine::parse(&format!(
            "split pair=1 path={odd:?} error={:?} x=1",
            "e \"q\""
        ));
        assert_eq!(l.get("path"), Some(odd));
        assert_eq!(l.get("error"), Some("e \"q\""));
        assert_eq!(l.get("x"), Some("1"));
        assert_eq!(bar(Some("50.0%"), 10), "[#####-----]");
        assert_eq!(bar(None, 4), "[----]");
    }
}
