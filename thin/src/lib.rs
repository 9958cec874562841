//! Thin provisioning.
