//! Using pairfs as a library, without FUSE: make a volume, write a file through the
//! core, split it, overwrite it (copy-on-write), and read the frozen copy back.
//!
//!     cargo run --release --example library

use pairfs::core::fs::{Ctx, Options};
use pairfs::core::volfile::{self, Paths};
use pairfs::snap::engine::Op;

fn main() -> pairfs::Result<()> {
    let dir = std::env::temp_dir().join(format!("pairfs-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| pairfs::Error::io("temp dir", e))?;
    let paths = Paths::new(&dir.join("vol.img"), None, None);
    volfile::mkfs(&paths, 256 << 20, 64 << 10, true)?;
    let (fs, _lock) = volfile::open(&paths, Options::default())?;

    let root = Ctx {
        uid: 0,
        gid: 0,
        umask: 0,
    };
    let f = fs.create_node(
        root,
        pairfs::core::fs::ROOT,
        b"report.txt",
        libc::S_IFREG | 0o644,
        0,
        None,
    )?;
    let ino = f.row.ino;
    fs.write(ino, 0, b"version 1: the numbers as of the split")?;

    // Freeze the copy: O(1), nothing is copied here.
    fs.control(ino, Op::Split)?;
    // The application goes on writing; the old track is copied first.
    fs.write(ino, 0, b"version 2: newer numbers, after the split")?;

    let (pair, idx, frozen) = fs
        .engine
        .frozen_objects(&fs)
        .into_iter()
        .find(|o| o.2.ino == ino)
        .expect("a frozen copy");
    let copy = fs.engine.read_frozen(&fs, pair, idx, 0, 4096)?;
    let now = fs.read(ino, 0, 4096)?;
    println!(
        "frozen copy ({}): {}",
        frozen.path,
        String::from_utf8_lossy(&copy)
    );
    println!("file now          : {}", String::from_utf8_lossy(&now));
    println!(
        "state: {}",
        fs.engine.status_of(&fs, ino)?.expect("paired").line()
    );
    assert!(copy.starts_with(b"version 1"));
    fs.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
