//! Front ends.

pub mod control;
pub mod daemon;
pub mod frontend;
pub mod signals;
pub mod ublk;
pub mod ublk_params;

pub use ublk::{UblkOptions, UblkServer, UblkTargetError};
