//! Sans-io core: no syscalls, no clocks, no `unsafe`.
pub mod control;
pub mod interconnect;
pub mod label;
pub mod mailbox;
pub mod nbd;
pub mod nvlog;
pub mod raid4;
pub mod ratelimit;
pub mod sim;
pub mod takeover;
