//! The I/O layer: every syscall and every `unsafe` block of the project lives below here.
pub mod buf;
pub mod clock;
pub mod disk;
pub mod engine;
pub mod mailbox;
pub mod net;
pub mod netlink;
pub mod netns;
pub mod nvram;
pub mod packet;
pub mod sdnotify;
pub mod sg;
pub mod sync_engine;
pub mod uring;
