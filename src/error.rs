//! The one error type of pairfs and its explicit errno mapping.
//!
//! Every fallible call in the core returns [`Result<T>`]. The FUSE adapters turn an
//! [`Error`] into an errno with [`Error::errno`]; the CLI prints its `Display` text.
//! There is deliberately no blanket `From<io::Error>`: an I/O failure must say which
//! image it came from ([`Error::Io`]), and maps to `EIO` unless the OS gave `ENOSPC`.

use std::io;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in pairfs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No such file, directory or pair (`ENOENT`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The name already exists (`EEXIST`).
    #[error("already exists: {0}")]
    Exists(String),
    /// A directory was expected (`ENOTDIR`).
    #[error("not a directory")]
    NotDir,
    /// A non-directory was expected (`EISDIR`).
    #[error("is a directory")]
    IsDir,
    /// Directory not empty (`ENOTEMPTY`).
    #[error("directory not empty")]
    NotEmpty,
    /// Invalid argument or a transition not allowed in this state (`EINVAL`).
    #[error("invalid: {0}")]
    Invalid(String),
    /// An operation is already running (`EBUSY`).
    #[error("busy: {0}")]
    Busy(String),
    /// The volume (or copy image) is full (`ENOSPC`).
    #[error("no space left on {0}")]
    NoSpace(&'static str),
    /// Operation not permitted (`EPERM`).
    #[error("operation not permitted")]
    NotPermitted,
    /// Permission denied (`EACCES`).
    #[error("permission denied")]
    Access,
    /// Name too long (`ENAMETOOLONG`).
    #[error("name too long")]
    NameTooLong,
    /// Too many links (`EMLINK`).
    #[error("too many links")]
    TooManyLinks,
    /// File too large (`EFBIG`).
    #[error("file too large")]
    TooBig,
    /// No such attribute (`ENODATA`).
    #[error("no such attribute")]
    NoData,
    /// Result buffer too small (`ERANGE`).
    #[error("result too large for buffer")]
    Range,
    /// Not supported by pairfs (`EOPNOTSUPP`).
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// Read-only filesystem (`EROFS`).
    #[error("read-only filesystem")]
    ReadOnly,
    /// Bad file handle (`EBADF`).
    #[error("bad file handle")]
    BadHandle,
    /// Too many open files (`ENFILE`).
    #[error("too many open files")]
    TooManyOpen,
    /// The object changed under the caller (`ESTALE`).
    #[error("stale: the frozen copy changed; reopen the file")]
    Stale,
    /// No data or hole at or after the offset (`ENXIO`).
    #[error("offset beyond the end of the file")]
    NoSuchOffset,
    /// Cross-device (`EXDEV`).
    #[error("cross-device link")]
    CrossDevice,
    /// An I/O error on one of the images (`EIO`, or `ENOSPC` if the host said so).
    #[error("I/O error on {what}: {source}")]
    Io {
        /// Which object failed: "volume", "copy image", "metadata"...
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The volume handle is poisoned after a failed write or sync (`EIO`).
    #[error("{0} is poisoned by an earlier write or sync failure; remount after fixing it")]
    Poisoned(&'static str),
    /// The metadata database failed (`EIO`).
    #[error("metadata database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The on-disk format is wrong: foreign, truncated or corrupt image or database.
    #[error("corrupt or foreign volume: {0}")]
    Corrupt(String),
    /// The volume is in use by another pairfs process.
    #[error("volume is locked: {0}")]
    Locked(String),
}

impl Error {
    /// Wraps an I/O error, naming the object it came from.
    pub fn io(what: &'static str, source: io::Error) -> Self {
        Error::Io { what, source }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// The errno the kernel should see for this error.
    pub fn errno(&self) -> i32 {
        use libc::*;
        match self {
            Error::NotFound(_) => ENOENT,
            Error::Exists(_) => EEXIST,
            Error::NotDir => ENOTDIR,
            Error::IsDir => EISDIR,
            Error::NotEmpty => ENOTEMPTY,
            Error::Invalid(_) => EINVAL,
            Error::Busy(_) => EBUSY,
            Error::NoSpace(_) => ENOSPC,
            Error::NotPermitted => EPERM,
            Error::Access => EACCES,
            Error::NameTooLong => ENAMETOOLONG,
            Error::TooManyLinks => EMLINK,
            Error::TooBig => EFBIG,
            Error::NoData => ENODATA,
            Error::Range => ERANGE,
            Error::NotSupported(_) => EOPNOTSUPP,
            Error::ReadOnly => EROFS,
            Error::BadHandle => EBADF,
            Error::TooManyOpen => ENFILE,
            Error::CrossDevice => EXDEV,
            Error::NoSuchOffset => ENXIO,
            Error::Stale => ESTALE,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(ENOSPC) => ENOSPC,
                Some(EDQUOT) => ENOSPC,
                _ => EIO,
            },
            Error::Poisoned(_) => EIO,
            Error::Db(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull =>
            {
                ENOSPC
            }
            Error::Db(_) => EIO,
            Error::Corrupt(_) => EIO,
            Error::Locked(_) => EBUSY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_enospc_and_map_the_rest_to_eio() {
        let full = Error::io("volume", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.errno(), libc::ENOSPC);
        let notfound = Error::io("volume", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(notfound.errno(), libc::EIO);
        assert_eq!(Error::NotFound("x".into()).errno(), libc::ENOENT);
        assert_eq!(Error::Busy("split".into()).errno(), libc::EBUSY);
    }
}
