//! Operators' interfaces on a live mount: `pairfs status --prometheus` and
//! `--textfile` parsed line by line as the Prometheus text format after a split, with a
//! path that needs label escaping (quote, backslash, newline).

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;

use common::*;

/// One sample: metric name, labels (unescaped), value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic() || x == '_' || x == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Parses `name{k="v",...} value` strictly: label values may only use the escapes
/// `\\`, `\"` and `\n`, and hold no raw newline.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = HashMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let (k, after) = r.split_once("=\"").ok_or("label without =\"")?;
            if !valid_name(k) || k.starts_with("__") {
                return Err(format!("bad label name {k:?}"));
            }
            let mut v = String::new();
            let mut it = after.char_indices();
            let end = loop {
                match it.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match it.next().ok_or("dangling backslash")?.1 {
                        '\\' => v.push('\\'),
                        '"' => v.push('"'),
                        'n' => v.push('\n'),
                        o => return Err(format!("bad escape \\{o}")),
                    },
                    (_, '\n') => return Err("raw newline in a label value".into()),
                    (_, c) => v.push(c),
                }
            };
            if labels.insert(k.to_string(), v).is_some() {
                return Err(format!("label {k} twice"));
            }
            r = &after[end + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
        rest = r;
    }
    let v = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match v {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Checks every line of an exposition and returns its samples: each line is a HELP, a
/// TYPE or a valid sample; each sample's family has HELP and TYPE before it; counters
/// end in `_total`; every name has the `pairfs_` prefix.
fn parse_exposition(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "the last line ends with a newline");
    let mut help = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("# HELP ") {
            let (n, txt) = h.split_once(' ').expect("HELP name text");
            assert!(valid_name(n) && !txt.is_empty(), "{line}");
            assert!(help.insert(n.to_string()), "HELP twice for {n}");
        } else if let Some(t) = line.strip_prefix("# TYPE ") {
            let (n, ty) = t.split_once(' ').expect("TYPE name type");
            assert!(
                ["gauge", "counter", "untyped", "histogram", "summary"].contains(&ty),
                "{line}"
            );
            assert!(help.contains(n), "TYPE before HELP: {line}");
            assert!(
                types.insert(n.to_string(), ty.to_string()).is_none(),
                "TYPE twice for {n}"
            );
            if ty == "counter" {
                assert!(n.ends_with("_total"), "counter {n} must end in _total");
            }
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let s = parse_sample(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            assert!(s.name.starts_with("pairfs_"), "{line}");
            assert!(
                types.contains_key(&s.name) && help.contains(&s.name),
                "sample before its HELP/TYPE: {line}"
            );
            out.push(s);
        }
    }
    out
}

fn one<'a>(s: &'a [Sample], name: &str, path: &str) -> &'a Sample {
    let v: Vec<&Sample> = s
        .iter()
        .filter(|x| x.name == name && x.labels.get("path").is_some_and(|p| p == path))
        .collect();
    assert_eq!(v.len(), 1, "{name} for {path:?}: {v:?}");
    v[0]
}

fn volume(s: &[Sample], name: &str) -> f64 {
    let v: Vec<&Sample> = s.iter().filter(|x| x.name == name).collect();
    assert_eq!(v.len(), 1, "{name}: {v:?}");
    v[0].value
}

#[test]
fn prometheus_exposition_after_split() {
    let mut v = Vol::new("1G");
    v.mount();
    let name = "we\"ird\\na\nme \u{e9}";
    let file = v.path(name);
    std::fs::write(&file, vec![5u8; 64 << 20]).unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    setx(&file, "user.pairfs.split").unwrap();
    // Overwrite the end at once: those tracks are still to copy, so the write goes
    // through copy-on-write (or is staged for it).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[9u8; 1 << 20], (63 << 20) as u64).unwrap();
        f.sync_all().unwrap();
    }
    wait_state(&file, "split");
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    let o = Command::new(BIN)
        .args(["status", "--prometheus"])
        .arg(&v.mnt)
        .output()
        .unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = parse_exposition(&text);
    let path = format!("/{name}");
    // The path label went through the exposition's escaping and back.
    assert!(
        text.contains("path=\"/we\\\"ird\\\\na\\nme \u{e9}\""),
        "{text}"
    );
    let states: Vec<&Sample> = s
        .iter()
        .filter(|x| x.name == "pairfs_pair_state" && x.labels["path"] == path)
        .collect();
    assert_eq!(states.len(), 7, "one sample per state");
    for st in &states {
        assert_eq!(st.labels["scope"], "file");
        assert_eq!(st.labels["mountpoint"], v.mnt.to_str().unwrap());
        let want = if st.labels["state"] == "split" {
            1.0
        } else {
            0.0
        };
        assert_eq!(st.value, want, "{st:?}");
    }
    assert_eq!(one(&s, "pairfs_pair_tracks_to_copy", &path).value, 0.0);
    assert_eq!(one(&s, "pairfs_pair_bytes_to_copy", &path).value, 0.0);
    assert_eq!(one(&s, "pairfs_pair_frozen_tracks", &path).value, 1024.0);
    assert_eq!(one(&s, "pairfs_pair_progress_ratio", &path).value, 1.0);
    assert_eq!(one(&s, "pairfs_pair_dirty_tracks", &path).value, 16.0);
    let t = one(&s, "pairfs_pair_split_timestamp_seconds", &path).value;
    assert!(
        t >= before - 1.0 && t <= after + 1.0,
        "split time {t} not in [{before}, {after}]"
    );
    // Copy-on-write counts: per pair and per volume agree (one pair on the volume).
    let cow = one(&s, "pairfs_pair_cow_tracks_total", &path).value;
    let staged = one(&s, "pairfs_pair_staged_tracks_total", &path).value;
    assert_eq!(cow, volume(&s, "pairfs_volume_cow_tracks_total"));
    assert_eq!(staged, volume(&s, "pairfs_volume_staged_tracks_total"));
    assert!(
        cow + staged > 0.0,
        "the write after the split was not seen as copy-on-write"
    );
    assert!(volume(&s, "pairfs_volume_copied_tracks_total") >= 1024.0);
    assert_eq!(volume(&s, "pairfs_volume_size_bytes"), (1u64 << 30) as f64);
    assert!(volume(&s, "pairfs_volume_used_bytes") >= (64u64 << 20) as f64);
    assert_eq!(volume(&s, "pairfs_volume_track_size_bytes"), 65536.0);
    assert_eq!(volume(&s, "pairfs_volume_clean_at_mount"), 1.0);
    assert_eq!(volume(&s, "pairfs_volume_up"), 1.0);
    assert_eq!(volume(&s, "pairfs_volume_readonly"), 0.0);

    // A single path: only its pair, same labels.
    let o = Command::new(BIN)
        .args(["status", "--prometheus"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success());
    let s1 = parse_exposition(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(
        one(&s1, "pairfs_pair_frozen_tracks", &path).labels["pair"],
        one(&s, "pairfs_pair_frozen_tracks", &path).labels["pair"]
    );

    // --textfile: written whole (rename), nothing left beside it.
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("pairfs.prom");
    std::fs::write(&prom, "old").unwrap();
    let o = Command::new(BIN)
        .args(["status", "--textfile"])
        .arg(&prom)
        .arg(&v.mnt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
    let s2 = parse_exposition(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(one(&s2, "pairfs_pair_frozen_tracks", &path).value, 1024.0);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "temporary file left behind");

    // A remount read-only shows (-i: mount(2) itself, not a helper for type fuse).
    let remount = |how: &str| {
        let st = Command::new("mount")
            .args(["-i", "-o", &format!("remount,{how}")])
            .arg(&v.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "remount,{how}");
    };
    remount("ro");
    let o = Command::new(BIN)
        .args(["status", "--prometheus"])
        .arg(&v.mnt)
        .output()
        .unwrap();
    let s3 = parse_exposition(&String::from_utf8(o.stdout).unwrap());
    remount("rw");
    assert_eq!(volume(&s3, "pairfs_volume_readonly"), 1.0);

    // --prometheus does not mix with --json.
    let o = Command::new(BIN)
        .args(["status", "--prometheus", "--json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    v.umount();
}

/// Our daemons of volume `img`: processes whose arguments include its path.
fn daemon_pids(img: &std::path::Path) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    let want = img.as_os_str().as_bytes();
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (pid != me && cmd.split(|&b| b == 0).any(|a| a == want)).then_some(pid)
        })
        .collect()
}

#[test]
fn clean_at_mount_is_0_after_a_crash() {
    let mut v = Vol::new("1G");
    v.mount();
    std::fs::write(v.path("f"), vec![1u8; 1 << 20]).unwrap();
    setx(&v.path("f"), "user.pairfs.split").unwrap();
    wait_state(&v.path("f"), "split");
    let pids = daemon_pids(&v.img);
    assert!(!pids.is_empty(), "no daemon found for {}", v.img.display());
    for &p in &pids {
        // SAFETY: kill(2) of the daemon this test started (its volume is in a new temp dir).
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    for m in [&v.mnt, &v.copy] {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
    let t0 = std::time::Instant::now();
    while !daemon_pids(&v.img).is_empty() {
        assert!(t0.elapsed().as_secs() < 20, "daemon survived SIGKILL");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    v.mount();
    let o = Command::new(BIN)
        .args(["status", "--prometheus"])
        .arg(&v.mnt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = parse_exposition(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(volume(&s, "pairfs_volume_clean_at_mount"), 0.0);
    assert_eq!(one(&s, "pairfs_pair_frozen_tracks", "/f").value, 16.0);
    v.umount();
    // After a clean unmount the flag is back.
    v.mount();
    let o = Command::new(BIN)
        .args(["status", "--prometheus"])
        .arg(&v.mnt)
        .output()
        .unwrap();
    let s = parse_exposition(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(volume(&s, "pairfs_volume_clean_at_mount"), 1.0);
    v.umount();
}
