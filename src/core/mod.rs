//! The filesystem core: the POSIX namespace and data path ([`fs`]), the pure building
//! blocks it is made of ([`acl`], [`alloc`], [`extent`], [`inode`], [`trackset`]) and opening a
//! volume from its images and database ([`volfile`]).

pub mod acl;
pub mod alloc;
pub mod extent;
pub mod fs;
pub mod inode;
pub mod trackset;
pub mod volfile;
