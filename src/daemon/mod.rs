//! Event loops and services that drive the sans-io core with the I/O layer.
pub mod aggregate;
pub mod backend;
pub mod control;
pub mod fence;
pub mod ha;
pub mod ha_testing;
pub mod identity;
pub mod journal;
pub mod link;
pub mod mailbox;
pub mod nbd_server;
pub mod node;
pub mod pair;
pub mod setup;
