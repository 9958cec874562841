//! Front ends.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod control;
pub mod daemon;
pub mod frontend;
mod kick;
pub mod signals;
pub mod ublk;
pub mod ublk_params;

pub use ublk::{UblkOptions, UblkServer, UblkTargetError};
