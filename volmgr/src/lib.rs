//! Volume management library.
