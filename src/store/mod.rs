//! Storage: the [`volume::Volume`] trait (read_at, write_at, sync, len) and its
//! implementations — file image, memory, fault injection, crash model, NBD export
//! ([`nbd`]) — plus [`volume::Checked`], which poisons the handle after a failed write
//! or sync; [`migrate::MigratingVolume`], which moves an image while it is in use; and
//! the `flock`s on image files ([`lock`]).

pub mod lock;
pub mod migrate;
pub mod nbd;
pub mod volume;
