//! Sans-io core: no syscalls, no clocks, no `unsafe`.
pub mod label;
pub mod nbd;
pub mod raid4;
pub mod ratelimit;
pub mod arp;
pub mod ndp;
pub mod netlink;
