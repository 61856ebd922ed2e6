//! Sans-io core: no syscalls, no clocks, no `unsafe`.
pub mod label;
pub mod raid4;
pub mod scsi;
