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

use crate::error::{Error, Result};
use crate::snap::pair::{FrozenKind, Pair};

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

/// The copied tracks of a pair's frozen copy: every track of its frozen files that
/// frozen reads take from the copy image (pending bit clear). None unless frozen.
pub fn items_of(p: &Pair) -> Vec<ScrubItem> {
    let mut items = Vec::new();
    if !p.state.is_frozen() {
        return items;
    }
    for f in p.frozen.iter().filter(|f| f.attr.kind == FrozenKind::File) {
        for e in f.extents.iter() {
            for k in 0..e.len {
                if !p.read_from_volume(e.vol + k) {
                    items.push(ScrubItem {
                        pair: p.id,
                        path: f.path.clone(),
                        ftrack: e.file + k,
                        vtrack: e.vol + k,
                    });
                }
            }
        }
    }
    items
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

/// Checks `items`: reads each track with `read` (into a track-sized buffer) and compares
/// its crc with `sum_of` (None: unsummed). A mismatch is read again with a fresh sum once
/// before it is reported, so a track recopied meanwhile (its sum changed) is not.
pub fn scrub(
    items: Vec<ScrubItem>,
    track_size: u64,
    sum_of: &dyn Fn(u64) -> Option<u32>,
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
) -> Result<ScrubReport> {
    let mut r = ScrubReport::default();
    let mut buf = vec![0u8; track_size as usize];
    for it in items {
        let Some(want) = sum_of(it.vtrack) else {
            r.unsummed += 1;
            continue;
        };
        read(it.vtrack, &mut buf)?;
        r.checked += 1;
        if crc(&buf) != want {
            read(it.vtrack, &mut buf)?;
            if sum_of(it.vtrack).is_some_and(|w| w != crc(&buf)) {
                log::error!(
                    "scrub: pair {} file {} track {} (copy-image track {}): checksum mismatch",
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
    Ok(r)
}

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

    #[test]
    fn scrub_finds_the_flipped_track() {
        let ts = 8u64;
        let data = |t: u64| vec![t as u8; ts as usize];
        let sums = SumTable::new(10, &[(1, crc(&data(1))), (2, crc(&data(2)))]);
        let item = |v| ScrubItem {
            pair: 1,
            path: "f".into(),
            ftrack: v,
            vtrack: v,
        };
        let r = scrub(
            vec![item(1), item(2), item(3)],
            ts,
            &|t| sums.get(t),
            &|t, b: &mut [u8]| {
                b.copy_from_slice(&data(t));
                if t == 2 {
                    b[5] ^= 0x10;
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((r.checked, r.unsummed), (2, 1));
        assert_eq!(r.bad, vec![item(2)]);
    }
}
