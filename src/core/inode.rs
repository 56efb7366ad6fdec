//! In-memory inodes and directories (pure data, no I/O).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::core::extent::ExtentMap;
use crate::meta::InodeRow;
use crate::snap::pair::PairId;

/// Entries of one directory, with stable readdir cookies: an entry keeps its cookie for
/// its whole life, so `rm -rf` (readdir, unlink, readdir from the last cookie) sees
/// every entry exactly once.
#[derive(Debug, Default)]
pub struct Dir {
    by_name: HashMap<Vec<u8>, (u64, u64)>,
    by_cookie: BTreeMap<u64, Vec<u8>>,
    next_cookie: u64,
}

impl Dir {
    /// Number of entries (without `.` and `..`).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
    /// Looks up a name.
    pub fn get(&self, name: &[u8]) -> Option<u64> {
        self.by_name.get(name).map(|e| e.1)
    }
    /// Adds or replaces an entry; a replaced entry keeps its cookie.
    pub fn insert(&mut self, name: Vec<u8>, ino: u64) {
        if let Some(e) = self.by_name.get_mut(&name) {
            e.1 = ino;
            return;
        }
        // Cookies 1 and 2 are "." and "..".
        let c = self.next_cookie.max(3);
        self.next_cookie = c + 1;
        self.by_cookie.insert(c, name.clone());
        self.by_name.insert(name, (c, ino));
    }
    /// Removes an entry.
    pub fn remove(&mut self, name: &[u8]) -> Option<u64> {
        let (c, ino) = self.by_name.remove(name)?;
        self.by_cookie.remove(&c);
        Some(ino)
    }
    /// Entries after `cookie`, in cookie order: (cookie, name, ino).
    pub fn after(&self, cookie: u64) -> impl Iterator<Item = (u64, &[u8], u64)> + '_ {
        self.by_cookie
            .range(cookie + 1..)
            .map(|(&c, n)| (c, n.as_slice(), self.by_name[n].1))
    }
    /// The cookie the next new entry will get: entries named (or renamed) from now on
    /// have cookies at or above it. A readdir pass that stops there sees every entry at
    /// most once, however entries are renamed meanwhile (a rename gives a new cookie).
    pub fn end_cookie(&self) -> u64 {
        self.next_cookie.max(3)
    }
    /// All entries in cookie order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64)> + '_ {
        self.by_cookie
            .values()
            .map(|n| (n.as_slice(), self.by_name[n].1))
    }
}

/// When reads update the access time (the `relatime`, `strictatime` and `noatime`
/// mount options, as on ext4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtimePolicy {
    /// Only if the atime is not after the mtime or ctime, or is a day old (default).
    #[default]
    Relative,
    /// On every read.
    Strict,
    /// Never.
    Never,
}

impl AtimePolicy {
    /// Whether a read at `now` (ns) updates the atime of `row`.
    pub fn due(self, row: &InodeRow, now: i64) -> bool {
        const DAY_NS: i64 = 24 * 3600 * 1_000_000_000;
        match self {
            AtimePolicy::Never => false,
            AtimePolicy::Strict => row.atime != now,
            AtimePolicy::Relative => {
                row.atime <= row.mtime
                    || row.atime <= row.ctime
                    || now.saturating_sub(row.atime) >= DAY_NS
            }
        }
    }
}

/// One inode in memory.
#[derive(Debug)]
pub struct Inode {
    /// The persisted attributes.
    pub row: InodeRow,
    /// File data (regular files).
    pub extents: ExtentMap,
    /// Ordinary xattrs.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Entries (directories).
    pub dir: Option<Dir>,
    /// Names that refer to this inode: (parent, name). A directory has one.
    pub links: Vec<(u64, Vec<u8>)>,
    /// Open file handles.
    pub open: u32,
    /// The pair whose scope holds this inode.
    pub pair: Option<PairId>,
    /// Held shared by reads and writes, exclusively by operations that free or move
    /// this file's tracks (truncate, punch, final unlink).
    pub data_lock: Arc<RwLock<()>>,
}

impl Inode {
    /// Wraps a row.
    pub fn new(row: InodeRow) -> Inode {
        let is_dir = row.kind == libc::S_IFDIR;
        Inode {
            row,
            extents: ExtentMap::new(),
            xattrs: BTreeMap::new(),
            dir: is_dir.then(Dir::default),
            links: Vec::new(),
            open: 0,
            pair: None,
            data_lock: Arc::new(RwLock::new(())),
        }
    }
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.row.kind == libc::S_IFDIR
    }
    /// True for regular files.
    pub fn is_file(&self) -> bool {
        self.row.kind == libc::S_IFREG
    }
    /// First parent (for path names).
    pub fn parent(&self) -> Option<u64> {
        self.links.first().map(|l| l.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_up_to_end_cookie_sees_renamed_entries_once() {
        let mut d = Dir::default();
        for i in 0..100u64 {
            d.insert(format!("f{i}").into_bytes(), i + 10);
        }
        // Walk in pages of 10 while renaming every entry seen (as generic/736 does).
        let end = d.end_cookie();
        let mut seen = std::collections::HashSet::new();
        let mut cookie = 0;
        loop {
            let page: Vec<(u64, Vec<u8>)> = d
                .after(cookie)
                .take_while(|e| e.0 < end)
                .take(10)
                .map(|(c, n, _)| (c, n.to_vec()))
                .collect();
            let Some(last) = page.last() else { break };
            cookie = last.0;
            for (_, n) in page {
                assert!(seen.insert(n.clone()), "{n:?} returned twice");
                let ino = d.remove(&n).unwrap();
                let mut renamed = n.clone();
                renamed.push(b'x');
                d.insert(renamed, ino);
            }
        }
        assert_eq!(seen.len(), 100);
    }

    #[test]
    fn atime_policies() {
        let row = |atime, mtime| InodeRow {
            ino: 2,
            kind: libc::S_IFREG,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size: 0,
            atime,
            mtime,
            ctime: mtime,
            rdev: 0,
            target: None,
            clone: None,
        };
        let day = 24 * 3600 * 1_000_000_000i64;
        let now = 10 * day;
        // relatime: after a change, or once a day.
        assert!(AtimePolicy::Relative.due(&row(5, 5), now));
        assert!(AtimePolicy::Relative.due(&row(5, 6), now));
        assert!(!AtimePolicy::Relative.due(&row(now - 1, 5), now));
        assert!(AtimePolicy::Relative.due(&row(now - day, 5), now));
        assert!(AtimePolicy::Strict.due(&row(now - 1, 5), now));
        assert!(!AtimePolicy::Never.due(&row(5, 6), now));
    }

    #[test]
    fn cookies_are_stable_across_removals() {
        let mut d = Dir::default();
        for i in 0..10u8 {
            d.insert(vec![b'a' + i], i as u64 + 10);
        }
        let first: Vec<u64> = d.after(0).take(3).map(|e| e.0).collect();
        for (_, n, _) in d
            .after(0)
            .take(3)
            .map(|(c, n, i)| (c, n.to_vec(), i))
            .collect::<Vec<_>>()
        {
            d.remove(&n);
        }
        // Continuing after the last cookie seen returns the other 7 entries.
        assert_eq!(d.after(*first.last().unwrap()).count(), 7);
        d.insert(b"b".to_vec(), 99);
        assert_eq!(d.get(b"b"), Some(99));
    }
}
