//! RAID targets.
