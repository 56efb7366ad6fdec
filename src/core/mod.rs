//! The filesystem core: the POSIX namespace and data path ([`fs`]), the pure building
//! blocks it is made of ([`acl`], [`alloc`], [`clone`], [`extent`], [`inode`], [`trackset`]), the
//! one path every sync and commit takes ([`durability`]), the lock order ([`locks`]), online
//! migration of an image ([`migrate`]) and
//! opening a
//! volume from its images and database ([`volfile`]).

pub mod acl;
pub mod alloc;
pub mod clone;
pub mod durability;
pub mod extent;
pub mod fs;
pub mod inode;
pub mod locks;
pub mod migrate;
pub mod trackset;
pub mod volfile;

/// Now, in ns since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
