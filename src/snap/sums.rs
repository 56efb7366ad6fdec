//! Checksums of the copy image: the crc32c of every track a copy writes to it
//! (background copier, confirm, staged and synchronous copy-on-write), recorded when the
//! copy is written and committed with the clear of the track's pending bit (never after
//! it), verified by frozen-copy reads from the copy image and by [`scrub`].
//!
//! crc32c rather than xxh3: 4 bytes per track (the table is dense, one entry per volume
//! track, in memory), the storage-industry checksum (iSCSI, ext4, btrfs) with hardware
//! support (SSE 4.2 `crc32`, ARMv8 CRC), and it detects every error burst up to 32 bits —
//! a flipped bit or byte is always caught, which a 64-bit hash only makes likely. Its speed
//! (several GB/s per core) is far above what the copy image's disk gives.

use crate::core::extent::Extent;
use crate::error::{Error, Result};
use crate::snap::pair::{Frozen, FrozenKind, Pair, PairId};

/// Checksum of one track's bytes.
pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Whether checksums are on: `PAIRFS_SUMS=off` in the daemon's environment turns them
/// off (no sums recorded, nothing verified), for measuring their cost only.
pub fn enabled_by_env() -> bool {
    !matches!(std::env::var("PAIRFS_SUMS").as_deref(), Ok("off" | "0"))
}

/// The sum of every copy-image track as last written by a copy, dense by volume track.
#[derive(Debug, Default, Clone)]
pub struct SumTable {
    crc: Vec<u32>,
    has: Vec<u64>,
}

impl SumTable {
    /// A table for `tracks` volume tracks, with `sums` in it (out-of-range ones ignored).
    pub fn new(tracks: u64, sums: &[(u64, u32)]) -> SumTable {
        let mut t = SumTable {
            crc: vec![0; tracks as usize],
            has: vec![0; (tracks as usize).div_ceil(64)],
        };
        for &(k, c) in sums {
            t.set(k, c);
        }
        t
    }

    /// The sum of track `t`, if one was recorded.
    pub fn get(&self, t: u64) -> Option<u32> {
        let i = t as usize;
        (self.has.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)).then(|| self.crc[i])
    }

    /// Records the sum of track `t`.
    pub fn set(&mut self, t: u64, c: u32) {
        let i = t as usize;
        if i < self.crc.len() {
            self.crc[i] = c;
            self.has[i / 64] |= 1 << (i % 64);
        }
    }

    /// Number of tracks with a sum.
    pub fn count(&self) -> u64 {
        self.has.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// One copied track of a frozen copy to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubItem {
    /// Pair id.
    pub pair: u64,
    /// Path of the file in the frozen copy (relative to the copy mount).
    pub path: String,
    /// File track.
    pub ftrack: u64,
    /// Volume (and copy-image) track.
    pub vtrack: u64,
}

/// What a scrub found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    /// Copied tracks read and checked against their sum.
    pub checked: u64,
    /// Copied tracks without a sum (copied by a version before checksums): read, not
    /// checked.
    pub unsummed: u64,
    /// Tracks whose content does not match their sum (the first [`BAD_LISTED`] of a
    /// report read back from the daemon).
    pub bad: Vec<ScrubItem>,
    /// Number of mismatching tracks.
    pub bad_total: u64,
}

/// Most mismatches a daemon's scrub reply lists (it must fit a getxattr value).
pub const BAD_LISTED: usize = 400;

/// One frozen file to scrub: its pair, split-time path and extent map.
#[derive(Debug, Clone)]
pub struct ScrubFile {
    /// Pair id.
    pub pair: u64,
    /// Path in the frozen copy.
    pub path: String,
    /// Its frozen extents.
    pub extents: Vec<Extent>,
}

/// The frozen files of a pair (none unless frozen).
pub fn files_of(p: &Pair) -> Vec<ScrubFile> {
    if !p.state.is_frozen() {
        return Vec::new();
    }
    files_in(p.id, &p.frozen)
}

/// The files with data among frozen objects `objects` of pair `pair` (absent markers
/// of a lazy instant left out).
pub fn files_in(pair: PairId, objects: &[Frozen]) -> Vec<ScrubFile> {
    objects
        .iter()
        .filter(|f| !f.absent && f.attr.kind == FrozenKind::File && !f.extents.is_empty())
        .map(|f| ScrubFile {
            pair,
            path: f.path.clone(),
            extents: f.extents.iter().collect(),
        })
        .collect()
}

impl ScrubReport {
    /// Text: a summary line, then one `bad pair=ID track=V file_track=F path=P` line per
    /// mismatch.
    pub fn text(&self) -> String {
        let mut s = format!(
            "checked={} unsummed={} bad={}\n",
            self.checked, self.unsummed, self.bad_total
        );
        for b in self.bad.iter().take(BAD_LISTED) {
            s.push_str(&format!(
                "bad pair={} track={} file_track={} path={}\n",
                b.pair, b.vtrack, b.ftrack, b.path
            ));
        }
        s
    }

    /// Parses [`ScrubReport::text`].
    pub fn parse(s: &str) -> Result<ScrubReport> {
        let bad = || Error::invalid(format!("bad scrub reply {s:?}"));
        let mut lines = s.lines();
        let head = lines.next().ok_or_else(bad)?;
        let mut r = ScrubReport::default();
        for kv in head.split_whitespace() {
            match kv.split_once('=').ok_or_else(bad)? {
                ("checked", v) => r.checked = v.parse().map_err(|_| bad())?,
                ("unsummed", v) => r.unsummed = v.parse().map_err(|_| bad())?,
                ("bad", v) => r.bad_total = v.parse().map_err(|_| bad())?,
                _ => {}
            }
        }
        for l in lines {
            let rest = l.strip_prefix("bad ").ok_or_else(bad)?;
            let (nums, path) = rest.split_once(" path=").ok_or_else(bad)?;
            let mut item = ScrubItem {
                pair: 0,
                path: path.to_string(),
                ftrack: 0,
                vtrack: 0,
            };
            for kv in nums.split_whitespace() {
                match kv.split_once('=').ok_or_else(bad)? {
                    ("pair", v) => item.pair = v.parse().map_err(|_| bad())?,
                    ("track", v) => item.vtrack = v.parse().map_err(|_| bad())?,
                    ("file_track", v) => item.ftrack = v.parse().map_err(|_| bad())?,
                    _ => {}
                }
            }
            r.bad.push(item);
        }
        Ok(r)
    }
}

/// Checks every copied track of `files`: `copied(pair, track)` says whether frozen reads
/// take the track from the copy image (pending bit clear); those are read with `read`
/// (runs of up to 1 MiB) and their crc compared with `sum_of` (None: unsummed). A
/// mismatch is read again with a fresh sum once before it is reported, so a track
/// recopied meanwhile is not.
pub fn scrub(
    files: Vec<ScrubFile>,
    track_size: u64,
    copied: &dyn Fn(u64, u64) -> bool,
    sum_of: &dyn Fn(u64) -> Option<u32>,
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<ScrubReport> {
    let mut r = ScrubReport::default();
    let run = (RUN_BYTES / track_size).max(1);
    let mut buf = Vec::new();
    for f in files {
        for e in &f.extents {
            let mut k = 0;
            while k < e.len {
                let n = run.min(e.len - k);
                let v0 = e.vol + k;
                // Per track: None if pending (not checked), Some(None) if unsummed.
                let want: Vec<Option<Option<u32>>> = (v0..v0 + n)
                    .map(|v| copied(f.pair, v).then(|| sum_of(v)))
                    .collect();
                r.unsummed += want.iter().filter(|w| matches!(w, Some(None))).count() as u64;
                let want: Vec<Option<u32>> = want.into_iter().map(Option::flatten).collect();
                if want.iter().any(Option::is_some) {
                    buf.resize((n * track_size) as usize, 0);
                    read(v0 * track_size, &mut buf)?;
                    for (i, w) in want.iter().enumerate() {
                        let Some(w) = *w else { continue };
                        let v = v0 + i as u64;
                        r.checked += 1;
                        let d = &buf[i * track_size as usize..(i + 1) * track_size as usize];
                        if crc(d) == w {
                            continue;
                        }
                        let mut again = vec![0u8; track_size as usize];
                        read(v * track_size, &mut again)?;
                        if sum_of(v).is_some_and(|w2| w2 != crc(&again)) {
                            let it = ScrubItem {
                                pair: f.pair,
                                path: f.path.clone(),
                                ftrack: e.file + k + i as u64,
                                vtrack: v,
                            };
                            log::error!(
                                "scrub: pair {} file {} track {} (copy-image track {}): \
                                 checksum mismatch",
                                it.pair,
                                it.path,
                                it.ftrack,
                                it.vtrack
                            );
                            r.bad.push(it);
                            r.bad_total += 1;
                        }
                    }
                }
                k += n;
            }
        }
    }
    Ok(r)
}

/// Largest read of one scrub step.
const RUN_BYTES: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_report_round_trip() {
        let mut t = SumTable::new(130, &[(3, 7), (129, 0)]);
        assert_eq!(t.get(3), Some(7));
        assert_eq!(t.get(129), Some(0));
        assert_eq!(t.get(4), None);
        assert_eq!(t.get(1000), None);
        t.set(1000, 1);
        t.set(64, 9);
        assert_eq!(t.count(), 3);
        let r = ScrubReport {
            checked: 5,
            unsummed: 1,
            bad_total: 1,
            bad: vec![ScrubItem {
                pair: 2,
                path: "d/a b".into(),
                ftrack: 3,
                vtrack: 40,
            }],
        };
        assert_eq!(ScrubReport::parse(&r.text()).unwrap(), r);
        assert_ne!(crc(&[0; 16]), crc(&[0; 17]));
    }

    /// `cargo test --release --lib crc_throughput -- --ignored --nocapture`: crc32c speed
    /// of this machine (the cost of a sum per byte copied or verified).
    #[test]
    #[ignore]
    fn crc_throughput() {
        let buf: Vec<u8> = (0..64 << 20).map(|i: u32| (i * 2654435761) as u8).collect();
        let mut x = 0;
        let t = std::time::Instant::now();
        for _ in 0..16 {
            for c in buf.chunks(65536) {
                x ^= crc(c);
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "crc32c: {:.2} GB/s over 1 GiB in 64 KiB tracks ({x:08x})",
            1.073741824 / s
        );
    }

    #[test]
    fn scrub_finds_the_flipped_track() {
        let ts = 8u64;
        let data = |t: u64| vec![t as u8; ts as usize];
        let sums = SumTable::new(10, &[(1, crc(&data(1))), (2, crc(&data(2))), (4, 0)]);
        let file = ScrubFile {
            pair: 1,
            path: "f".into(),
            extents: vec![Extent {
                file: 0,
                vol: 1,
                len: 4,
            }],
        };
        // Track 4 is still pending: not checked although its "sum" is wrong.
        let r = scrub(
            vec![file],
            ts,
            &|_, v| v != 4,
            &|t| sums.get(t),
            &|off, b: &mut [u8]| {
                for (i, c) in b.chunks_mut(ts as usize).enumerate() {
                    let t = off / ts + i as u64;
                    c.copy_from_slice(&data(t));
                    if t == 2 {
                        c[5] ^= 0x10;
                    }
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((r.checked, r.unsummed, r.bad_total), (2, 1, 1));
        assert_eq!(
            r.bad,
            vec![ScrubItem {
                pair: 1,
                path: "f".into(),
                ftrack: 1,
                vtrack: 2,
            }]
        );
    }
}
