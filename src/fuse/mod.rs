//! The two FUSE adapters: [`main_fs`] serves the live tree, [`copy_fs`] the frozen copies.
//! They convert requests to core calls and results to replies, nothing else.

pub mod copy_fs;
pub mod main_fs;
