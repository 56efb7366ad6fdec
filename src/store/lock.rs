//! File locks on images (`flock`): the mount lock ([`VolumeLock`]) and the lock a
//! snapshot mount holds on the copy image, which the live mount takes exclusively before
//! rewriting it ([`lock_copy_for_rewrite`]). Moved out of `core::volfile` so the pair
//! engine can take the copy lock without importing the layer that opens a volume.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// An exclusive (read-write) or shared (read-only) lock on the volume image, held for
/// the life of the mount.
#[derive(Debug)]
pub struct VolumeLock {
    _file: File,
}

/// The lock a snapshot mount holds on the copy image: the live mount takes it
/// exclusively, without waiting, for an update, resync or release of the root pair
/// (which rewrite or free the copy image), and refuses the operation (EBUSY) while a
/// snapshot mount holds it shared.
pub fn lock_copy_for_rewrite(copy: &Path) -> Result<VolumeLock> {
    lock(copy, true).map_err(|_| {
        Error::Busy(format!(
            "{} is served by a snapshot mount (pairfs mount-snapshot): unmount it first",
            copy.display()
        ))
    })
}

pub(crate) fn lock(path: &Path, exclusive: bool) -> Result<VolumeLock> {
    let file = if path.exists() {
        File::open(path)
    } else {
        // A lock file beside the metadata of an NBD volume.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }
    .map_err(|e| Error::io("volume", e))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a valid fd owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(Error::Locked(format!(
            "{} is in use by another pairfs process (already mounted?)",
            path.display()
        )));
    }
    Ok(VolumeLock { _file: file })
}
