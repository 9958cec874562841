//! How the daemon's devices stack: which devices a table uses, the order to bring them up in,
//! and the cycles that must never be built (a device that, through other devices or kernel
//! aliases, reads from itself hangs its first request).

use std::collections::{BTreeMap, BTreeSet};

/// Devices in creation order with the names of the devices each one uses.
pub(crate) type DepList = Vec<(String, Vec<String>)>;

/// The order to bring devices up in: every device after the devices it uses, otherwise in
/// creation order. Devices on a dependency cycle are left out and returned with the cycle
/// spelled out; devices that merely use one stay in the order (they fail when built, naming
/// the device they miss).
pub(crate) fn bring_up_order(nodes: &DepList) -> (Vec<String>, Vec<(String, String)>) {
    let known: BTreeSet<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::new();
    loop {
        let next = nodes.iter().find(|(n, deps)| {
            !placed.contains(n.as_str())
                && deps
                    .iter()
                    .all(|d| placed.contains(d.as_str()) || !known.contains(d.as_str()))
        });
        match next {
            Some((n, _)) => {
                placed.insert(n);
                order.push(n.clone());
            }
            None => break,
        }
    }
    let deps: BTreeMap<&str, &[String]> = nodes
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let mut cyclic = Vec::new();
    for (n, _) in nodes.iter().filter(|(n, _)| !placed.contains(n.as_str())) {
        match path_between(n, n, |x| {
            deps.get(x).map(|d| d.to_vec()).unwrap_or_default()
        }) {
            Some(path) => cyclic.push((
                n.clone(),
                format!("dependency cycle: {}", path.join(" -> ")),
            )),
            None => order.push(n.clone()),
        }
    }
    (order, cyclic)
}

/// A path `from -> ... -> to` following `deps`, if there is one (`from == to` finds a
/// cycle through `from`). The path starts with `from` and ends with `to`.
pub(crate) fn path_between(
    from: &str,
    to: &str,
    deps: impl Fn(&str) -> Vec<String>,
) -> Option<Vec<String>> {
    // Depth-first over names, each visited once: bounded by the number of devices even on
    // graphs full of cycles.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<(String, Vec<String>)> = deps(from)
        .into_iter()
        .map(|d| (d, vec![from.to_string()]))
        .collect();
    while let Some((n, mut path)) = stack.pop() {
        path.push(n.clone());
        if n == to {
            return Some(path);
        }
        if !seen.insert(n.clone()) {
            continue;
        }
        for d in deps(&n) {
            stack.push((d, path.clone()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(edges: &[(&str, &[&str])]) -> DepList {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn dependencies_come_first_whatever_the_creation_order() {
        // `top` was created before `base` (a reload later pointed it at base).
        let (order, cyc) = bring_up_order(&g(&[
            ("top", &["mid"]),
            ("mid", &["base"]),
            ("other", &[]),
            ("base", &[]),
        ]));
        assert_eq!(order, vec!["other", "base", "mid", "top"]);
        assert!(cyc.is_empty());
    }

    #[test]
    fn cycles_are_named_and_their_users_still_listed() {
        let (order, cyc) = bring_up_order(&g(&[
            ("a", &["b"]),
            ("b", &["a"]),
            ("self", &["self"]),
            ("user", &["a"]),
            ("ok", &["gone"]),
        ]));
        assert_eq!(order, vec!["ok", "user"]);
        let names: Vec<&str> = cyc.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["a", "b", "self"]);
        assert!(cyc[0].1.contains("a -> b -> a"), "{}", cyc[0].1);
        assert!(cyc[2].1.contains("self -> self"), "{}", cyc[2].1);
    }

    #[test]
    fn path_between_finds_indirect_paths_only_where_they_exist() {
        let graph = g(&[("a", &["b", "c"]), ("b", &["d"]), ("c", &[]), ("d", &["a"])]);
        let deps = |n: &str| {
            graph
                .iter()
                .find(|(x, _)| x == n)
                .map(|(_, d)| d.clone())
                .unwrap_or_default()
        };
        assert_eq!(
            path_between("a", "a", deps),
            Some(vec!["a".into(), "b".into(), "d".into(), "a".into()])
        );
        assert_eq!(path_between("c", "a", deps), None);
    }
}
