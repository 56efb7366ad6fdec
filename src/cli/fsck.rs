//! `pairfs fsck`: offline consistency check of a volume, with `--repair` for the safe
//! fixes (dangling entries, link counts, orphans). Works on the raw rows, so it can
//! report problems that would make a mount refuse the volume.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::core::volfile::Paths;
use crate::error::{Error, Result};
use crate::meta::Meta;

/// The outcome of a check.
#[derive(Debug, Default)]
pub struct Report {
    /// Problems found (human readable).
    pub problems: Vec<String>,
    /// Fixes applied.
    pub fixed: Vec<String>,
    /// Summary figures.
    pub stats: BTreeMap<&'static str, u64>,
}

/// Checks (and with `repair`, fixes) a volume that is not mounted.
pub fn fsck(p: &Paths, repair: bool) -> Result<Report> {
    if !crate::core::volfile::is_uri(&p.volume) && !p.volume.exists() {
        return Err(Error::NotFound(format!(
            "volume image {}",
            p.volume.display()
        )));
    }
    let _lock = crate::core::volfile::lock_volume(p, true).map_err(|e| match e {
        Error::Locked(_) => Error::Locked(format!(
            "{} is mounted; unmount it first",
            p.volume.display()
        )),
        e => e,
    })?;
    let meta = Meta::open(&p.meta, !repair)?;
    let g = meta.geometry().clone();
    let mut r = Report::default();
    for x in meta.integrity_check()? {
        r.problems.push(format!("sqlite: {x}"));
    }
    for (path, magic, what) in [
        (&p.volume, b"PAIRFSV1", "volume image"),
        (&p.copy, b"PAIRFSC1", "copy image"),
    ] {
        match crate::core::volfile::open_image(path, false, "image") {
            Ok(v) => {
                let mut h = [0u8; 64];
                if v.len() < g.size {
                    r.problems
                        .push(format!("{what} is {} bytes, expected {}", v.len(), g.size));
                } else if let Err(e) = v
                    .read_at(0, &mut h)
                    .and_then(|_| crate::core::volfile::check_header(&h, magic, &g, what))
                {
                    r.problems.push(e.to_string());
                }
            }
            Err(e) => r.problems.push(format!("{what}: {e}")),
        }
    }
    let l = meta.load_all()?;
    let tracks = g.tracks();
    let kinds: HashMap<u64, u32> = l.inodes.iter().map(|i| (i.ino, i.kind)).collect();
    // Extents: inside the volume, never overlapping.
    let mut owner: HashMap<u64, u64> = HashMap::new();
    let mut used = 0u64;
    for (ino, e) in &l.extents {
        if !kinds.contains_key(ino) {
            r.problems
                .push(format!("extent {e:?} belongs to missing inode {ino}"));
            continue;
        }
        if e.len == 0 || e.vol == 0 || e.vol.checked_add(e.len).is_none_or(|end| end > tracks) {
            r.problems.push(format!(
                "inode {ino}: extent {e:?} lies outside the volume (1..{tracks})"
            ));
            continue;
        }
        for t in e.vol..e.vol + e.len {
            if let Some(other) = owner.insert(t, *ino) {
                r.problems
                    .push(format!("track {t} is mapped by inodes {other} and {ino}"));
            }
        }
        used += e.len;
    }
    let mut pinned = HashSet::new();
    for pair in &l.pairs {
        for t in pair.pinned_tracks().iter() {
            if t == 0 || t >= tracks {
                r.problems.push(format!(
                    "pair {}: frozen track {t} outside the volume",
                    pair.id
                ));
            } else {
                pinned.insert(t);
            }
        }
    }
    // Named generations: of an existing pair; records inside the volume (pinned);
    // slots inside the volume and mapped by no file.
    let mut slots = HashSet::new();
    for g in &l.gens {
        if !l.pairs.iter().any(|p| p.id == g.row.pair) {
            r.problems.push(format!(
                "generation {} ({}) belongs to pair {}, which does not exist",
                g.id, g.row.name, g.row.pair
            ));
        }
        for t in crate::snap::gens::tracks_of(&g.frozen).iter() {
            if t == 0 || t >= tracks {
                r.problems.push(format!(
                    "generation {}: frozen track {t} outside the volume",
                    g.id
                ));
            } else {
                pinned.insert(t);
            }
        }
        for &(v, s) in &g.saved {
            if let Some(ino) = owner.get(&s) {
                r.problems.push(format!(
                    "generation {}: the slot of saved track {v} (track {s}) is mapped by inode {ino}",
                    g.id
                ));
            }
            slots.insert(s);
        }
    }
    let pinned_only = pinned
        .iter()
        .filter(|t| !owner.contains_key(t) && !slots.contains(*t))
        .count() as u64;
    // Writable clones: each reads from a frozen copy that must still be there.
    let mut clones = 0u64;
    for i in &l.inodes {
        let Some(c) = i.clone else { continue };
        clones += 1;
        let frozen = l
            .pairs
            .iter()
            .find(|p| p.id == c.pair)
            .filter(|p| p.state.is_frozen());
        if i.kind != libc::S_IFREG || frozen.is_none() {
            r.problems.push(format!(
                "inode {}: a clone of inode {} in pair {}, which has no frozen copy{}",
                i.ino,
                c.src,
                c.pair,
                if i.kind != libc::S_IFREG {
                    " (and not a regular file)"
                } else {
                    ""
                }
            ));
        }
    }
    // Entries and link counts.
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut dangling = Vec::new();
    for (parent, name, ino) in &l.dirents {
        let pname = String::from_utf8_lossy(name);
        match (kinds.get(parent), kinds.get(ino)) {
            (Some(&pk), Some(&k)) if pk == libc::S_IFDIR => {
                *links.entry(*ino).or_default() += 1;
                if k == libc::S_IFDIR {
                    *subdirs.entry(*parent).or_default() += 1;
                }
            }
            _ => {
                r.problems.push(format!("entry {pname:?} in {parent} points to missing inode {ino} or a non-directory parent"));
                dangling.push((*parent, name.clone()));
            }
        }
    }
    let mut nlink_fix = Vec::new();
    let mut orphans = Vec::new();
    for i in &l.inodes {
        let n = links.get(&i.ino).copied().unwrap_or(0);
        if i.ino != 1 && n == 0 {
            r.problems
                .push(format!("inode {} has no name (orphan)", i.ino));
            orphans.push(i.ino);
            continue;
        }
        let want = if i.kind == libc::S_IFDIR {
            2 + subdirs.get(&i.ino).copied().unwrap_or(0)
        } else {
            n
        };
        if i.nlink != want {
            r.problems.push(format!(
                "inode {}: link count {} should be {want}",
                i.ino, i.nlink
            ));
            nlink_fix.push((i.ino, want));
        }
        if i.kind == libc::S_IFLNK && i.size != i.target.as_ref().map_or(0, |t| t.len() as u64) {
            r.problems.push(format!(
                "symlink {}: size {} does not match its target",
                i.ino, i.size
            ));
        }
    }
    // The tree must be a tree (mount no longer reads every row to check it): a
    // directory has one name, the root none, and every named inode is reachable.
    let mut names: HashMap<u64, usize> = HashMap::new();
    let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
    for (parent, _, ino) in &l.dirents {
        *names.entry(*ino).or_default() += 1;
        children.entry(*parent).or_default().push(*ino);
    }
    for i in l.inodes.iter().filter(|i| i.kind == libc::S_IFDIR) {
        let want = usize::from(i.ino != 1);
        let n = names.get(&i.ino).copied().unwrap_or(0);
        if n != want && !(n == 0 && orphans.contains(&i.ino)) {
            r.problems.push(format!(
                "directory {} has {n} names (expected {want})",
                i.ino
            ));
        }
    }
    let mut reached: std::collections::HashSet<u64> = std::collections::HashSet::from([1]);
    let mut queue = vec![1u64];
    while let Some(d) = queue.pop() {
        for &c in children.get(&d).map(Vec::as_slice).unwrap_or(&[]) {
            if reached.insert(c) {
                queue.push(c);
            }
        }
    }
    for i in &l.inodes {
        if names.contains_key(&i.ino) && !reached.contains(&i.ino) {
            r.problems.push(format!(
                "inode {} is not reachable from the root (directory cycle)",
                i.ino
            ));
        }
    }
    let stored: Option<String> = meta
        .conn()
        .query_row(
            "SELECT value FROM super WHERE key = 'inode_count'",
            [],
            |r| r.get(0),
        )
        .ok();
    let real = (l.inodes.len() - orphans.len()) as u64;
    let fix_count = match stored.as_deref().map(str::parse::<u64>) {
        Some(Ok(n)) if n == real + orphans.len() as u64 || n == real => false,
        Some(_) => {
            r.problems.push(format!(
                "stored inode count {} differs from the {real} inodes in use",
                stored.as_deref().unwrap_or("")
            ));
            true
        }
        None => false,
    };
    r.stats.insert("tracks", tracks);
    r.stats.insert("used_tracks", used);
    r.stats.insert("pinned_only_tracks", pinned_only);
    let slots = slots.len() as u64;
    r.stats.insert("generations", l.gens.len() as u64);
    r.stats.insert("generation_slot_tracks", slots);
    r.stats.insert(
        "free_tracks",
        (tracks - 1).saturating_sub(used + pinned_only + slots),
    );
    r.stats.insert("inodes", l.inodes.len() as u64);
    r.stats.insert("pairs", l.pairs.len() as u64);
    r.stats.insert("clones", clones);
    if repair && !r.problems.is_empty() {
        crate::core::volfile::forget_repl_bitmap(&p.meta)?;
        let c = meta.conn();
        let tx = c.unchecked_transaction()?;
        // A repaired volume is no longer what its replica (or its primary) holds: the
        // next replica link does a full sync.
        tx.execute(
            "DELETE FROM super WHERE key IN ('repl_peer_stream', 'repl_peer_seq', 'repl_stream')",
            [],
        )?;
        for (p, n) in &dangling {
            tx.execute(
                "DELETE FROM dirents WHERE parent = ?1 AND name = ?2",
                rusqlite::params![p, n],
            )?;
            r.fixed.push(format!("removed dangling entry in {p}"));
        }
        for ino in &orphans {
            tx.execute("DELETE FROM inodes WHERE ino = ?1", [ino])?;
            tx.execute("DELETE FROM extents WHERE ino = ?1", [ino])?;
            tx.execute("DELETE FROM xattrs WHERE ino = ?1", [ino])?;
            r.fixed
                .push(format!("removed orphan inode {ino} and freed its tracks"));
        }
        for (ino, n) in &nlink_fix {
            tx.execute(
                "UPDATE inodes SET nlink = ?1 WHERE ino = ?2",
                rusqlite::params![n, ino],
            )?;
            r.fixed
                .push(format!("set link count of inode {ino} to {n}"));
        }
        tx.execute(
            "DELETE FROM extents WHERE ino NOT IN (SELECT ino FROM inodes)",
            [],
        )?;
        if stored.is_some() {
            tx.execute(
                "UPDATE super SET value = (SELECT CAST(count(*) AS TEXT) FROM inodes) \
                 WHERE key = 'inode_count'",
                [],
            )?;
            if fix_count {
                r.fixed.push("set the stored inode count".into());
            }
        }
        tx.commit()?;
    }
    Ok(r)
}
