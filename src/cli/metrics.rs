//! `pairfs status --prometheus` and `--textfile PATH`: pair and volume figures in the
//! Prometheus text exposition format (version 0.0.4), for a scrape wrapper or
//! node_exporter's textfile collector.
//!
//! Written by hand rather than with a client crate: this is a one-shot snapshot of
//! values the daemon already prints (`user.pairfs.pairs`, `user.pairfs.volume`), not a
//! registry of live counters, and the format is a few lines of text. The escaping rules
//! (label values: `\\`, `\"`, `\n`; HELP text: `\\`, `\n`) are in [`escape_label`] and
//! [`escape_help`]. The textfile is written to a temporary file beside PATH and renamed
//! over it, so the collector never reads half a file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::cli::status::{StateLine, get_pairs, get_volume, getxattr_state, pairfs_mounts};
use crate::error::{Error, Result};

/// Every pair state, for the state-set gauge (one sample per state, 1 for the current).
const STATES: [&str; 7] = [
    "forming",
    "formed",
    "splitting",
    "split",
    "updating",
    "resyncing",
    "error",
];

/// One metric family: name, help, type and samples (labels, value).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

/// The families in output order, filled sample by sample.
#[derive(Default)]
struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
        value: f64,
    ) {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name,
                    help,
                    kind,
                    samples: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        self.families[i].samples.push((labels.to_vec(), value));
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (labels, v) in &f.samples {
                out.push_str(f.name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, val)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(val));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", format_value(*v));
            }
        }
        out
    }
}

/// A label value as the exposition format wants it: `\`, `"` and newline escaped.
pub fn escape_label(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// HELP text: `\` and newline escaped.
pub fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (what `split_time=` holds) as Unix seconds.
pub fn parse_rfc3339_utc(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: i64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let frac: f64 = if frac.is_empty() {
        0.0
    } else {
        format!("0.{frac}").parse().ok()?
    };
    // Days from civil (Howard Hinnant's algorithm), the inverse of the engine's.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + hh * 3600 + mm * 60 + ss) as f64 + frac)
}

/// The figures of one mount: its volume line (None if it could not be read) and its
/// pair lines.
struct MountFigures {
    mountpoint: PathBuf,
    volume_source: String,
    volume: Option<StateLine>,
    pairs: Vec<StateLine>,
    /// Named generations (`user.pairfs.generations` of the mount root).
    gens: Vec<StateLine>,
}

/// Reads what the exposition needs: every pairfs main mount, or the one `path` is on
/// (all its pairs if `path` is the mountpoint, else the pair of `path` only). The second
/// value is false if some mount could not be read (its `pairfs_volume_up` is 0).
fn gather(path: Option<&Path>) -> Result<(Vec<MountFigures>, bool)> {
    let mounts: Vec<(PathBuf, String)> = pairfs_mounts()
        .into_iter()
        .filter(|(_, s)| !s.ends_with(":copy") && !s.ends_with(":snapshot"))
        .collect();
    let mut ok = true;
    let mut out = Vec::new();
    let canon = path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    let chosen: Vec<&(PathBuf, String)> = match &canon {
        None => mounts.iter().collect(),
        Some(c) => {
            // The innermost mount holding the path.
            let m = mounts
                .iter()
                .filter(|(m, _)| c.starts_with(m))
                .max_by_key(|(m, _)| m.as_os_str().len())
                .ok_or_else(|| Error::invalid(format!("{}: not on a pairfs mount", c.display())))?;
            vec![m]
        }
    };
    for (m, src) in chosen {
        let volume = get_volume(m).ok();
        let pairs = match &canon {
            Some(c) if c != m => {
                let mut l = StateLine::parse(&getxattr_state(c)?);
                if l.state == "none" {
                    Vec::new()
                } else {
                    let rel = c.strip_prefix(m).unwrap_or(c);
                    l.fields
                        .push(("path".into(), format!("/{}", rel.to_string_lossy())));
                    vec![l]
                }
            }
            _ => match get_pairs(m) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("{}: {e}", m.display());
                    Vec::new()
                }
            },
        };
        ok &= volume.is_some();
        // The generations of the pairs shown.
        let ids: Vec<&str> = pairs.iter().filter_map(|p| p.get("pair")).collect();
        let gens = crate::cli::status::get_generations(m)
            .unwrap_or_default()
            .into_iter()
            .filter(|g| g.get("pair").is_some_and(|id| ids.contains(&id)))
            .collect();
        out.push(MountFigures {
            mountpoint: m.clone(),
            volume_source: src.strip_prefix("pairfs:").unwrap_or(src).to_string(),
            volume,
            pairs,
            gens,
        });
    }
    Ok((out, ok))
}

fn num(l: &StateLine, k: &str) -> Option<f64> {
    l.get(k)?.trim_end_matches('%').parse().ok()
}

/// The exposition text for these mounts.
fn render(mounts: &[MountFigures]) -> String {
    let mut e = Exposition::default();
    for m in mounts {
        let mp = m.mountpoint.to_string_lossy().into_owned();
        let vl = [
            ("mountpoint", mp.clone()),
            ("volume", m.volume_source.clone()),
        ];
        e.add(
            "pairfs_volume_up",
            "gauge",
            "1 if the mount answered (user.pairfs.volume), 0 if it could not be read.",
            &vl,
            if m.volume.is_some() { 1.0 } else { 0.0 },
        );
        let track = m.volume.as_ref().and_then(|v| num(v, "track_size"));
        if let Some(v) = &m.volume {
            let g: [(&'static str, &'static str, &'static str, &'static str); 10] = [
                (
                    "size_bytes",
                    "pairfs_volume_size_bytes",
                    "gauge",
                    "Size of the volume.",
                ),
                (
                    "used_bytes",
                    "pairfs_volume_used_bytes",
                    "gauge",
                    "Space in use on the volume, pinned frozen tracks included.",
                ),
                (
                    "track_size",
                    "pairfs_volume_track_size_bytes",
                    "gauge",
                    "Track size: the unit of copying.",
                ),
                ("inodes", "pairfs_volume_inodes", "gauge", "Inodes in use."),
                (
                    "clean_at_mount",
                    "pairfs_volume_clean_at_mount",
                    "gauge",
                    "1 if the volume was unmounted cleanly before this mount; 0 after a crash (every pair's tracks counted as changed).",
                ),
                (
                    "readonly",
                    "pairfs_volume_readonly",
                    "gauge",
                    "1 if the volume is mounted (or remounted) read-only.",
                ),
                (
                    "meta_failed",
                    "pairfs_volume_metadata_failed",
                    "gauge",
                    "1 once a metadata commit failed: changes are refused until a remount.",
                ),
                (
                    "copied_tracks",
                    "pairfs_volume_copied_tracks_total",
                    "counter",
                    "Tracks copied to the copy image since mount (background copy and copy-on-write).",
                ),
                (
                    "cow_tracks",
                    "pairfs_volume_cow_tracks_total",
                    "counter",
                    "Tracks copied by copy-on-write before a host write since mount.",
                ),
                (
                    "staged_tracks",
                    "pairfs_volume_staged_tracks_total",
                    "counter",
                    "Host writes staged in memory for copy-on-write since mount (tracks).",
                ),
            ];
            for (k, name, kind, help) in g {
                if let Some(x) = num(v, k) {
                    e.add(name, kind, help, &vl, x);
                }
            }
        }
        for p in &m.pairs {
            let labels = [
                ("mountpoint", mp.clone()),
                ("pair", p.get("pair").unwrap_or("").to_string()),
                ("scope", p.get("scope").unwrap_or("").to_string()),
                ("path", p.get("path").unwrap_or("").to_string()),
            ];
            for s in STATES {
                let mut l = labels.to_vec();
                l.push(("state", s.to_string()));
                e.add(
                    "pairfs_pair_state",
                    "gauge",
                    "1 for the pair's current state, 0 for the others.",
                    &l,
                    if p.state == s { 1.0 } else { 0.0 },
                );
            }
            let per_pair: [(&'static str, &'static str, &'static str, &'static str); 9] = [
                (
                    "progress",
                    "pairfs_pair_progress_ratio",
                    "gauge",
                    "Progress of the running (or last) copy, 0 to 1.",
                ),
                (
                    "to_copy",
                    "pairfs_pair_tracks_to_copy",
                    "gauge",
                    "Tracks the background copy still has to copy.",
                ),
                (
                    "copied",
                    "pairfs_pair_operation_copied_tracks",
                    "gauge",
                    "Tracks copied so far by the running (or last) operation.",
                ),
                (
                    "last_copied",
                    "pairfs_pair_last_operation_copied_tracks",
                    "gauge",
                    "Tracks the last finished operation copied.",
                ),
                (
                    "frozen_tracks",
                    "pairfs_pair_frozen_tracks",
                    "gauge",
                    "Tracks the frozen copy holds.",
                ),
                (
                    "dirty_tracks",
                    "pairfs_pair_dirty_tracks",
                    "gauge",
                    "Tracks written since the split (what an update would copy).",
                ),
                (
                    "pinned_bytes",
                    "pairfs_pair_pinned_bytes",
                    "gauge",
                    "Space held only by the frozen copy (not reusable until update, resync or release).",
                ),
                (
                    "files",
                    "pairfs_pair_frozen_files",
                    "gauge",
                    "Regular files in the frozen copy.",
                ),
                (
                    "rate_bps",
                    "pairfs_pair_copy_rate_bytes_per_second",
                    "gauge",
                    "Copy rate of the running operation (absent when nothing is copied).",
                ),
            ];
            for (k, name, kind, help) in per_pair {
                if let Some(x) = num(p, k) {
                    // Percent with one decimal: a ratio with three, printed as such.
                    let x = if k == "progress" {
                        (x * 10.0).round() / 1000.0
                    } else {
                        x
                    };
                    e.add(name, kind, help, &labels, x);
                }
            }
            if let (Some(t), Some(ts)) = (num(p, "to_copy"), track) {
                e.add(
                    "pairfs_pair_bytes_to_copy",
                    "gauge",
                    "Bytes the background copy still has to copy.",
                    &labels,
                    t * ts,
                );
            }
            if let Some(x) = num(p, "eta_s") {
                e.add(
                    "pairfs_pair_copy_eta_seconds",
                    "gauge",
                    "Estimated time until the running copy is done.",
                    &labels,
                    x,
                );
            }
            e.add(
                "pairfs_pair_cow_tracks_total",
                "counter",
                "Tracks of this pair copied by copy-on-write before a host write, since mount.",
                &labels,
                num(p, "cow_tracks").unwrap_or(0.0),
            );
            e.add(
                "pairfs_pair_staged_tracks_total",
                "counter",
                "Host writes of this pair staged in memory for copy-on-write, since mount (tracks).",
                &labels,
                num(p, "staged_tracks").unwrap_or(0.0),
            );
            if let Some(t) = p.get("split_time").and_then(parse_rfc3339_utc) {
                e.add(
                    "pairfs_pair_split_timestamp_seconds",
                    "gauge",
                    "Unix time of the frozen copy's split or last update (age: time() - this).",
                    &labels,
                    t,
                );
            }
        }
        for g in &m.gens {
            let labels = [
                ("mountpoint", mp.clone()),
                ("pair", g.get("pair").unwrap_or("").to_string()),
                ("generation", g.get("name").unwrap_or("").to_string()),
                ("path", g.get("path").unwrap_or("").to_string()),
            ];
            if let Some(t) = g.get("split_time").and_then(parse_rfc3339_utc) {
                e.add(
                    "pairfs_generation_split_timestamp_seconds",
                    "gauge",
                    "Unix time of a named generation's split or last refresh (age: time() - this).",
                    &labels,
                    t,
                );
            }
            e.add(
                "pairfs_generation_saved_bytes",
                "gauge",
                "Bytes of old tracks saved for a named generation (slots shared with other generations counted for each).",
                &labels,
                num(g, "saved_bytes").unwrap_or(0.0),
            );
            e.add(
                "pairfs_generation_own_bytes",
                "gauge",
                "Bytes only this named generation holds: what releasing it frees.",
                &labels,
                num(g, "own_bytes").unwrap_or(0.0),
            );
        }
    }
    e.render()
}

/// `pairfs status --prometheus` / `--textfile PATH`. Exit 0, or 1 if a mount could not
/// be read (the output is still complete for the others, with `pairfs_volume_up 0`).
pub fn prometheus(path: Option<&Path>, textfile: Option<&Path>) -> Result<u8> {
    let (mounts, ok) = gather(path)?;
    let text = render(&mounts);
    match textfile {
        None => {
            let mut o = std::io::stdout().lock();
            o.write_all(text.as_bytes())
                .and_then(|()| o.flush())
                .map_err(|e| Error::io("stdout", e))?;
        }
        Some(f) => write_atomically(f, text.as_bytes())?,
    }
    Ok(if ok { 0 } else { 1 })
}

/// Writes `data` to a temporary file beside `f`, syncs it and renames it over `f`.
fn write_atomically(f: &Path, data: &[u8]) -> Result<()> {
    let name = f
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file name", f.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = f.with_file_name(tmp_name);
    let r = (|| {
        let mut w = std::fs::File::create(&tmp)?;
        w.write_all(data)?;
        w.sync_all()?;
        std::fs::rename(&tmp, f)
    })();
    r.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("textfile", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_times() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_rfc3339_utc("2026-12-02T11:00:00.500000000Z"),
            Some(1_796_209_200.5)
        );
        assert_eq!(
            parse_rfc3339_utc("2000-02-29T00:00:01Z"),
            Some(951_782_401.0)
        );
        assert_eq!(parse_rfc3339_utc("garbage"), None);
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
    }

    #[test]
    fn renders_families() {
        let m = MountFigures {
            mountpoint: "/mnt/v".into(),
            volume_source: "/srv/v.img".into(),
            volume: Some(StateLine::parse(
                "volume size_bytes=100 used_bytes=10 track_size=4 clean_at_mount=1 cow_tracks=2",
            )),
            pairs: vec![StateLine::parse(&format!(
                "split pair=1 scope=file progress=43.8% to_copy=3 cow_tracks=2 split_time=1970-01-01T00:00:10.000000000Z path={:?}",
                "/a\"b"
            ))],
            gens: vec![StateLine::parse(
                "generation name=hourly id=2 pair=1 scope=file split_time=1970-01-01T00:00:20.000000000Z saved_tracks=1 saved_bytes=65536 own_bytes=0 records=1 path=\"/a\"",
            )],
        };
        let t = render(&[m]);
        assert!(
            t.contains("pairfs_generation_split_timestamp_seconds{mountpoint=\"/mnt/v\",pair=\"1\",generation=\"hourly\",path=\"/a\"} 20\n"),
            "{t}"
        );
        assert!(t.contains("pairfs_generation_saved_bytes{"), "{t}");
        assert!(t.contains("# TYPE pairfs_volume_size_bytes gauge\n"), "{t}");
        assert!(t.contains(
            "pairfs_pair_state{mountpoint=\"/mnt/v\",pair=\"1\",scope=\"file\",path=\"/a\\\"b\",state=\"split\"} 1\n"
        ), "{t}");
        assert!(t.contains("pairfs_pair_bytes_to_copy{"), "{t}");
        assert!(t.contains("} 12\n"), "{t}");
        assert!(t.contains("pairfs_pair_progress_ratio{"), "{t}");
        assert!(t.contains("} 0.438\n"), "{t}");
        assert!(t.contains("pairfs_pair_split_timestamp_seconds{"), "{t}");
        assert!(
            t.contains("# TYPE pairfs_pair_cow_tracks_total counter\n"),
            "{t}"
        );
    }
}
