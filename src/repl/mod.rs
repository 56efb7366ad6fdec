//! Synchronous (or asynchronous) replication of a volume to a second node (seed 002).
//!
//! - [`proto`]: frames (length + crc32c), messages, the HMAC-SHA256 handshake.
//! - [`capture`]: the metadata database's committed row changes (temporary triggers)
//!   and their application on the secondary.
//! - [`link`]: the primary: an [`crate::core::durability::Attach`] hook that does the
//!   full sync at mount, wraps both images so every write and discard enters the record
//!   stream, taps every metadata commit, and a
//!   [`crate::core::durability::DurabilitySink`] whose sync points wait for the
//!   secondary's ack (`sync` mode); reconnection with replay of unacked records.
//! - [`bitmap`]: the primary's persistent out-of-sync bitmap and activity log.
//! - [`secondary`]: `pairfs replica serve` and `pairfs replica promote`.
//! - [`follow`]: the secondary's copy mount (`replica serve --copy-mount`), served from
//!   its last committed state while it applies the stream.
//!
//! The stream carries what the primary makes durable in the order it does: so the
//! secondary, applying it in order and fsyncing before every ack, holds at each ack
//! a pairfs volume the primary could have crashed into (docs/replication.md).

pub mod bitmap;
pub mod capture;
pub mod follow;
pub mod link;
pub mod proto;
pub mod secondary;
