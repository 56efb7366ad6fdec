//! Changed-range export (`pairfs diff`): the byte ranges of a file changed since its
//! pair's instant, from the pair's record bitmap and the two extent maps, reading no data.
//!
//! A file track `f` is *changed* when
//! - it maps volume track `v` now and mapped `v` at the instant too, and `v`'s bit is set
//!   in the record bitmap (split-diff while `splitting`/`split`, update-diff while
//!   `updating`: the host wrote it since the instant);
//! - it maps a different track now than at the instant, or is mapped on one side only (new
//!   allocation since the instant, or punched/truncated away: it reads zeros now).
//!
//! A frozen track is pinned, so a track mapped at both times by the same file track was
//! never freed and reused in between: an unset bit means unchanged. Bytes past the
//! instant's size up to the current size are changed too (they did not exist); ranges
//! stop at the current size (a file that shrank reports its new size). After an unclean
//! stop the record bitmap is set for every track of the scope (I5), so everything is
//! reported changed: a superset, never less.
//!
//! The copier never changes the answer: it clears *pending* bits (forming-diff,
//! split-diff while updating), never the record bitmap.
//!
//! Transport ([`encode_page`], [`decode_page`]): the daemon answers
//! `getxattr(FILE, "user.pairfs.diff")` (or `user.pairfs.diff.FROM`, ranges at byte
//! offsets `>= FROM`) with a text page of at most [`PAGE_BYTES`]: a header line
//! `pair=ID state=STATE size=NOW old_size=THEN track_size=T`, then one `OFFSET LENGTH`
//! line per merged range, and a last line `more NEXT` when the next page starts at NEXT.

use crate::core::extent::ExtentMap;
use crate::core::trackset::TrackSet;
use crate::error::{Error, Result};

/// Largest reply page, well inside the 64 KiB a getxattr value may have.
pub const PAGE_BYTES: usize = 60_000;

/// The changed ranges of one file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileDiff {
    /// Pair id.
    pub pair: u64,
    /// Pair state name.
    pub state: String,
    /// Size now.
    pub size: u64,
    /// Size at the instant (0 for a file created since).
    pub old_size: u64,
    /// Track size.
    pub track_size: u64,
    /// Merged, sorted byte ranges (offset, length), all below `size`.
    pub ranges: Vec<(u64, u64)>,
}

/// Adds `[off, off+len)` to sorted, merged `ranges` (appending in order).
fn push(ranges: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = ranges.last_mut()
        && last.0 + last.1 >= off
    {
        let end = (last.0 + last.1).max(off + len);
        last.1 = end - last.0;
        return;
    }
    ranges.push((off, len));
}

/// The changed byte ranges of a file: `now`/`size` its extents and size now, `then` its
/// extents and size at the instant (None: created since), `record` the pair's record
/// bitmap (volume tracks written since the instant).
pub fn changed_ranges(
    ts: u64,
    now: &ExtentMap,
    size: u64,
    then: Option<(&ExtentMap, u64)>,
    record: &TrackSet,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let Some((then, old_size)) = then else {
        push(&mut out, 0, size);
        return out;
    };
    // File tracks mapped on either side, in order.
    let mut tracks: Vec<u64> = now
        .iter()
        .chain(then.iter())
        .flat_map(|e| e.file..e.file + e.len)
        .collect();
    tracks.sort_unstable();
    tracks.dedup();
    let limit = size.div_ceil(ts);
    let mut grown_done = false;
    let grown = |out: &mut Vec<(u64, u64)>| {
        if size > old_size {
            push(out, old_size, size - old_size);
        }
    };
    for f in tracks.into_iter().take_while(|&f| f < limit) {
        if !grown_done && f * ts >= old_size {
            grown(&mut out);
            grown_done = true;
        }
        let changed = match (now.lookup(f), then.lookup(f)) {
            (Some(v), Some(w)) => v != w || record.contains(v),
            (None, None) => false,
            _ => true,
        };
        if changed {
            let a = f * ts;
            push(&mut out, a, (a + ts).min(size) - a);
        }
    }
    if !grown_done {
        grown(&mut out);
    }
    // The grown range may have been pushed before the track containing old_size.
    out.sort_unstable();
    let mut merged = Vec::with_capacity(out.len());
    for (o, l) in out {
        push(&mut merged, o, l);
    }
    merged
}

/// Renders the page of `d` that starts at byte offset `from`.
pub fn encode_page(d: &FileDiff, from: u64) -> Vec<u8> {
    let mut s = format!(
        "pair={} state={} size={} old_size={} track_size={}\n",
        d.pair, d.state, d.size, d.old_size, d.track_size
    );
    for &(o, l) in &d.ranges {
        if o + l <= from {
            continue;
        }
        let (o, l) = if o < from {
            (from, o + l - from)
        } else {
            (o, l)
        };
        let line = format!("{o} {l}\n");
        if s.len() + line.len() + 32 > PAGE_BYTES {
            s.push_str(&format!("more {o}\n"));
            break;
        }
        s.push_str(&line);
    }
    s.into_bytes()
}

/// Parses one page: the diff header with the page's ranges, and where the next page
/// starts.
pub fn decode_page(b: &[u8]) -> Result<(FileDiff, Option<u64>)> {
    let s = std::str::from_utf8(b).map_err(|_| Error::invalid("diff reply is not UTF-8"))?;
    let mut lines = s.lines();
    let head = lines
        .next()
        .ok_or_else(|| Error::invalid("empty diff reply"))?;
    let mut d = FileDiff::default();
    for kv in head.split_whitespace() {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("bad diff header {head:?}")))?;
        let num = || {
            v.parse::<u64>()
                .map_err(|_| Error::invalid(format!("bad diff header {head:?}")))
        };
        match k {
            "pair" => d.pair = num()?,
            "state" => d.state = v.to_string(),
            "size" => d.size = num()?,
            "old_size" => d.old_size = num()?,
            "track_size" => d.track_size = num()?,
            _ => {}
        }
    }
    let mut next = None;
    for l in lines {
        let mut w = l.split_whitespace();
        let (a, b) = (w.next(), w.next());
        let bad = || Error::invalid(format!("bad diff line {l:?}"));
        match (a, b) {
            (Some("more"), Some(n)) => next = Some(n.parse().map_err(|_| bad())?),
            (Some(o), Some(n)) => d
                .ranges
                .push((o.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?)),
            _ => return Err(bad()),
        }
    }
    Ok((d, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::extent::Extent;

    fn map(runs: &[(u64, u64, u64)]) -> ExtentMap {
        ExtentMap::from_extents(
            runs.iter()
                .map(|&(file, vol, len)| Extent { file, vol, len }),
        )
        .unwrap()
    }

    #[test]
    fn written_moved_new_and_punched_tracks_are_changed() {
        let ts = 10;
        let then = map(&[(0, 100, 6)]);
        // Track 1 rewritten in place (bit), 3 remapped, 4 punched, 7 new.
        let now = map(&[(0, 100, 3), (3, 200, 1), (5, 105, 1), (7, 300, 1)]);
        let rec: TrackSet = [101u64].into_iter().collect();
        let r = changed_ranges(ts, &now, 80, Some((&then, 60)), &rec);
        assert_eq!(r, vec![(10, 10), (30, 20), (60, 20)]);
        // Shrunk: ranges stop at the new size.
        let r = changed_ranges(ts, &now, 15, Some((&then, 60)), &rec);
        assert_eq!(r, vec![(10, 5)]);
        // Grown inside the last track without a write: only the new bytes.
        let r = changed_ranges(ts, &then, 58, Some((&then, 55)), &TrackSet::new());
        assert_eq!(r, vec![(55, 3)]);
        // New file: all of it.
        assert_eq!(
            changed_ranges(ts, &now, 33, None, &TrackSet::new()),
            vec![(0, 33)]
        );
    }

    #[test]
    fn pages_round_trip_and_split() {
        let d = FileDiff {
            pair: 3,
            state: "split".into(),
            size: 1 << 40,
            old_size: 5,
            track_size: 65536,
            ranges: (0..20_000u64).map(|i| (i * 131072, 65536)).collect(),
        };
        let mut from = 0;
        let mut got = Vec::new();
        loop {
            let page = encode_page(&d, from);
            assert!(page.len() <= PAGE_BYTES);
            let (h, next) = decode_page(&page).unwrap();
            assert_eq!((h.pair, h.size, h.old_size), (3, 1 << 40, 5));
            got.extend(h.ranges);
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert_eq!(got, d.ranges);
    }
}
