//! hapair: high-availability block storage for a pair of Linux servers that share disks.
//!
//! Layout (see `../shared/DESIGN.md`):
//! - [`core`]: sans-io logic. Takes bytes, events and `now` as arguments and returns decisions.
//! - [`io`]: every syscall and every `unsafe` block.
//! - [`daemon`]: the loops that drive `core` with `io`.

// Byte ranges are passed as slices of ranges (`persist(&[0..4096])`); one range is common.
#![allow(clippy::single_range_in_vec_init)]
pub mod config;
pub mod core;
pub mod daemon;
pub mod io;
