//! Which storage host a PV lives on: the failure domain raid placement keeps legs apart by.
//!
//! A PV's host is, in order:
//! 1. its tag `host:NAME` (`pvchange --addtag host:NAME`; LVM2 keeps tags in the PV's
//!    `tags` list, so lvm2 reads and keeps them too);
//! 2. else the host of the network extent it lives on, from the device hint the metadata
//!    records (`nbd://HOST[:PORT]/EXPORT`, `nbds://...`, `iscsi://[USER@]HOST[:PORT]/...`);
//!    an NBD export over a Unix socket is on this host (`localhost`);
//! 3. else none: a local file or disk, its own failure domain.
//!
//! A PV with several paths (`PATH1|PATH2`, [`crate::paths`]) is on its tag's host, else on
//! the host of its first path: one host reachable over two networks has two addresses, so
//! tag it (`host:NAME`) or its second path's address would not count as the same host.
//!
//! Host names are compared as written (lower-cased): `nbd://10.0.0.1/a` and
//! `nbd://server1/b` are two hosts even if the name resolves to that address, since a lookup
//! would make placement depend on the resolver of the moment. Tag the PVs when that matters.

use extents::net::NetUri;

use crate::model::PhysicalVolume;
use crate::text::{Item, Value};

/// The tag prefix that names a PV's host.
pub const HOST_TAG: &str = "host:";

/// The host a PV without a tag is on when it is reached through a Unix socket.
pub const LOCALHOST: &str = "localhost";

impl PhysicalVolume {
    /// The PV's tags (`tags = [...]`), in order.
    pub fn tags(&self) -> Vec<String> {
        tags_in(&self.extra)
    }

    /// Replaces the PV's tags; an empty list removes the entry (as lvm2 writes it).
    pub fn set_tags(&mut self, tags: &[String]) {
        let item = Item::Array(tags.iter().cloned().map(Value::Str).collect());
        match self.extra.iter().position(|(k, _)| k == "tags") {
            Some(i) if tags.is_empty() => {
                self.extra.remove(i);
            }
            Some(i) => self.extra[i].1 = item,
            None if tags.is_empty() => {}
            None => self.extra.push(("tags".to_string(), item)),
        }
    }

    /// Whether the metadata flags the PV missing (lvm2 2.03 writes `MISSING` in `flags`;
    /// older versions in `status`): its device was gone when a version was written.
    pub fn is_missing(&self) -> bool {
        self.status.has("MISSING") || self.flags.has("MISSING")
    }

    /// The host this PV lives on (see the module docs), or `None` for a local device.
    pub fn host(&self) -> Option<String> {
        if let Some(h) = self
            .tags()
            .iter()
            .find_map(|t| t.strip_prefix(HOST_TAG).map(str::to_string))
            .filter(|h| !h.is_empty())
        {
            return Some(h.to_ascii_lowercase());
        }
        self.device.as_deref().and_then(uri_host)
    }
}

/// The `tags = [...]` list among a PV's, VG's or LV's other entries, in order.
pub fn tags_in(extra: &[(String, Item)]) -> Vec<String> {
    extra
        .iter()
        .find(|(k, _)| k == "tags")
        .map(|(_, v)| match v {
            Item::Array(list) => list
                .iter()
                .filter_map(|v| match v {
                    Value::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        })
        .unwrap_or_default()
}

/// The host a network extent's name points at, `None` for anything else. Only the authority
/// part is read (`[USER@]HOST[:PORT]`, `[V6]` in brackets), so a device hint whose options
/// no longer parse still names its host.
///
/// A group of paths (`PATH1|PATH2`) is read by its first path.
pub fn uri_host(dev: &str) -> Option<String> {
    let dev = crate::paths::first_path(dev);
    if !NetUri::is_network(dev) {
        return None;
    }
    let (scheme, rest) = dev.split_once("://")?;
    if scheme.ends_with("+unix") {
        return Some(LOCALHOST.to_string());
    }
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => hostport.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Whether `tag` is a valid LVM tag (lvm2: letters, digits and `_+.-/=!:&#`, at most 1024
/// characters, not starting with `-`).
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 1024
        && !tag.starts_with('-')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(device: Option<&str>, tags: &[&str]) -> PhysicalVolume {
        let mut p = PhysicalVolume {
            key: "pv0".into(),
            id: "abcdef-ghij-klmn-opqr-stuv-wxyz-012345".parse().unwrap(),
            device: device.map(str::to_string),
            status: Default::default(),
            flags: Default::default(),
            dev_size: None,
            pe_start: tables::Sectors(2048),
            pe_count: crate::units::Extents(10),
            extra: Vec::new(),
        };
        p.set_tags(&tags.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        p
    }

    #[test]
    fn host_from_tag_then_uri_then_none() {
        assert_eq!(pv(Some("/dev/sdb"), &[]).host(), None);
        assert_eq!(
            pv(Some("nbd://Store1:10810/disk"), &[]).host().as_deref(),
            Some("store1")
        );
        assert_eq!(
            pv(Some("iscsi://u@10.0.0.2/iqn.2024-01.x:t/1"), &[])
                .host()
                .as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(
            pv(Some("nbd+unix:///e?socket=/run/s"), &[])
                .host()
                .as_deref(),
            Some(LOCALHOST)
        );
        assert_eq!(
            pv(Some("nbd://store1/disk"), &["rack:2", "host:B"])
                .host()
                .as_deref(),
            Some("b"),
            "the tag wins over the URI"
        );
        assert_eq!(
            pv(Some("/dev/sdb"), &["host:"]).host(),
            None,
            "an empty name is no host"
        );
        assert_eq!(
            pv(Some("nbds://[fd00::2]:10809/x"), &[]).host().as_deref(),
            Some("fd00::2")
        );
        assert_eq!(pv(Some("nbd:///x"), &[]).host(), None, "no host part");
        assert_eq!(
            pv(Some("nbd://10.0.1.2:10809/d|nbd://10.0.2.2:10809/d"), &[])
                .host()
                .as_deref(),
            Some("10.0.1.2"),
            "a group of paths is on its first path's host"
        );
        assert_eq!(
            pv(Some("nbd://10.0.1.2/d|nbd://10.0.2.2/d"), &["host:h1"])
                .host()
                .as_deref(),
            Some("h1"),
            "the tag wins over the paths"
        );
        assert_eq!(pv(Some("/dev/sdb|nbd://b/d"), &[]).host(), None);
        assert_eq!(
            pv(Some("nbd://h1|nbd://h2"), &[]).host().as_deref(),
            Some("h1"),
            "the first path alone, not the text up to the next slash"
        );
    }

    #[test]
    fn tags_round_trip_and_empty_list_removes_the_entry() {
        let mut p = pv(None, &["a", "host:x"]);
        assert_eq!(p.tags(), vec!["a".to_string(), "host:x".to_string()]);
        p.set_tags(&[]);
        assert!(p.extra.iter().all(|(k, _)| k != "tags"));
        assert!(p.tags().is_empty());
    }

    #[test]
    fn tag_validity_is_lvm2s() {
        assert!(valid_tag("host:node-1.example"));
        assert!(!valid_tag("-x"));
        assert!(!valid_tag("a b"));
        assert!(!valid_tag(""));
    }
}
