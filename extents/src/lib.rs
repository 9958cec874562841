//! Extents: the devices a table names.
