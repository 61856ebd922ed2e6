//! Event loops and services that drive the sans-io core with the I/O layer.
pub mod aggregate;
pub mod backend;
pub mod identity;
pub mod journal;
pub mod link;
pub mod nbd_server;
pub mod pair;
pub mod node;
pub mod setup;
