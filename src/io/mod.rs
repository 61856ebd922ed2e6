//! The I/O layer: every syscall and every `unsafe` block of the project lives below here.
pub mod buf;
pub mod disk;
pub mod engine;
pub mod net;
pub mod sync_engine;
pub mod uring;
pub mod netlink;
pub mod netns;
pub mod packet;
