//! Table text format (filled in below).
