//! hapair: high-availability block storage for a pair of Linux servers that share disks.
//!
//! Layout (see `../shared/DESIGN.md`):
//! - [`core`]: sans-io logic. Takes bytes, events and `now` as arguments and returns decisions.
//! - [`io`]: every syscall and every `unsafe` block.
//! - [`daemon`]: the loops that drive `core` with `io`.
pub mod config;
pub mod core;
pub mod daemon;
pub mod io;
