//! The filesystem core: the POSIX namespace and data path ([`fs`]), the pure building
//! blocks it is made of ([`acl`], [`alloc`], [`extent`], [`inode`], [`trackset`]), the
//! one path every sync and commit takes ([`durability`]), the lock order ([`locks`]) and
//! opening a
//! volume from its images and database ([`volfile`]).

pub mod acl;
pub mod alloc;
pub mod durability;
pub mod extent;
pub mod fs;
pub mod inode;
pub mod locks;
pub mod trackset;
pub mod volfile;
