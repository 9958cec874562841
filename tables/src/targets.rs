//! Built-in targets (filled in below).
