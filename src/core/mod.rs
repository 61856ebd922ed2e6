//! Sans-io core: no syscalls, no clocks, no `unsafe`.
pub mod arp;
pub mod control;
pub mod fence;
pub mod interconnect;
pub mod label;
pub mod mailbox;
pub mod nbd;
pub mod ndp;
pub mod netlink;
pub mod nvlog;
pub mod raid4;
pub mod ratelimit;
pub mod scsi;
pub mod sim;
pub mod takeover;
