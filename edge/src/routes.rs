//! The edge's route table: which device serves a requested server name. Pure data, no IO.
//!
//! A table is built from the list of routes the server pushes ([`RouteTable::from_routes`]).
//! Lookups try the exact name first, then the wildcard one level up: `*.example.test` matches
//! `app.example.test` but neither `example.test` nor `a.app.example.test`, as in certificates
//! (RFC 6125 section 6.4.3). Two tables compare with [`RouteTable::diff`], so that an update
//! can be logged (and counted) as the routes it adds, removes and moves, and applied in place
//! with [`RouteTable::apply`].

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::Ipv4Addr;

use edgible::model::{DeviceId, Hostname};

/// Where the edge sends a connection: the device that serves the name and its address inside
/// the tunnel (the device's proxy listens there on port 443).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteTarget {
    pub device_id: DeviceId,
    pub tunnel_address: Ipv4Addr,
    /// Whether the device is connected. A name of an offline device stays routed (it is still
    /// the device's name) but is refused at once with an `internal_error` alert, instead of
    /// letting every client wait for a connect timeout. A change of this flag shows in a
    /// [`RouteTable::diff`] as a [`RouteChange::Changed`].
    pub online: bool,
}

/// One entry of a route table: a hostname (exact or wildcard) and its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<T = RouteTarget> {
    pub hostname: Hostname,
    pub target: T,
}

/// A route that matched a lookup, and whether it matched exactly or through a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch<'a, T = RouteTarget> {
    pub route: &'a Route<T>,
    pub wildcard: bool,
}

/// A difference between two route tables, in the order of [`RouteTable::diff`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange<T = RouteTarget> {
    Added(Route<T>),
    Removed(Route<T>),
    /// The hostname stays routed, to another target (a placement moved, a device was
    /// re-addressed).
    Changed {
        hostname: Hostname,
        from: T,
        to: T,
    },
}

impl<T> RouteChange<T> {
    pub fn hostname(&self) -> &Hostname {
        match self {
            Self::Added(route) | Self::Removed(route) => &route.hostname,
            Self::Changed { hostname, .. } => hostname,
        }
    }
}

/// Why a list of routes does not make a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteTableError {
    /// The same hostname appears twice. The server keeps hostnames unique, so this is a bug
    /// upstream; refusing the list keeps the edge on its previous, consistent table instead
    /// of silently picking one of the two targets.
    #[error("hostname {0} appears more than once in the route list")]
    DuplicateHostname(Hostname),
}

/// Hostname → target, with exact names and one-label wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable<T = RouteTarget> {
    /// Exact routes, keyed by the hostname.
    exact: BTreeMap<String, Route<T>>,
    /// Wildcard routes, keyed by the name they stand under (`example.test` for
    /// `*.example.test`), so a lookup needs no allocation.
    wildcard: BTreeMap<String, Route<T>>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self { exact: BTreeMap::new(), wildcard: BTreeMap::new() }
    }
}

impl<T> RouteTable<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a table from a list of routes, refusing duplicate hostnames.
    pub fn from_routes(routes: impl IntoIterator<Item = Route<T>>) -> Result<Self, RouteTableError> {
        let mut table = Self::new();
        for route in routes {
            let hostname = route.hostname.clone();
            if table.insert(route).is_some() {
                return Err(RouteTableError::DuplicateHostname(hostname));
            }
        }
        Ok(table)
    }

    /// Adds or replaces the route for its hostname, returning the route it replaced.
    pub fn insert(&mut self, route: Route<T>) -> Option<Route<T>> {
        let (map, key) = self.map_and_key_mut(&route.hostname);
        map.insert(key, route)
    }

    /// Removes the route of exactly this hostname (a wildcard removes the wildcard route).
    pub fn remove(&mut self, hostname: &Hostname) -> Option<Route<T>> {
        let (map, key) = self.map_and_key_mut(hostname);
        map.remove(&key)
    }

    /// The route of exactly this hostname, without wildcard matching.
    pub fn get(&self, hostname: &Hostname) -> Option<&Route<T>> {
        if hostname.is_wildcard() { self.wildcard.get(hostname.parent()) } else { self.exact.get(hostname.as_str()) }
    }

    /// The route for a requested server name: the exact route if there is one, otherwise the
    /// wildcard directly above it. `server_name` must already be normalized (lowercase,
    /// without a trailing dot), as [`crate::sni::ServerName`] is; a name starting with `*`
    /// matches only an exact route, never a wildcard.
    pub fn lookup(&self, server_name: &str) -> Option<RouteMatch<'_, T>> {
        if let Some(route) = self.exact.get(server_name) {
            return Some(RouteMatch { route, wildcard: false });
        }
        let (label, parent) = server_name.split_once('.')?;
        if label.is_empty() || label == "*" {
            return None;
        }
        self.wildcard.get(parent).map(|route| RouteMatch { route, wildcard: true })
    }

    /// The target for a requested server name; see [`RouteTable::lookup`].
    pub fn target(&self, server_name: &str) -> Option<&T> {
        self.lookup(server_name).map(|matched| &matched.route.target)
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// Every route: exact ones in hostname order, then wildcards in order of their parent.
    pub fn iter(&self) -> impl Iterator<Item = &Route<T>> {
        self.exact.values().chain(self.wildcard.values())
    }

    fn map_and_key_mut(&mut self, hostname: &Hostname) -> (&mut BTreeMap<String, Route<T>>, String) {
        if hostname.is_wildcard() {
            (&mut self.wildcard, hostname.parent().to_owned())
        } else {
            (&mut self.exact, hostname.as_str().to_owned())
        }
    }
}

impl<T: Clone + PartialEq> RouteTable<T> {
    /// The changes that turn `self` into `desired`: removals first, then changes, then
    /// additions, each in the order of [`RouteTable::iter`]. Applying them to `self` with
    /// [`RouteTable::apply`] yields a table equal to `desired`.
    pub fn diff(&self, desired: &RouteTable<T>) -> Vec<RouteChange<T>> {
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        let mut added = Vec::new();
        for (current, wanted) in [(&self.exact, &desired.exact), (&self.wildcard, &desired.wildcard)] {
            for (key, route) in current {
                match wanted.get(key) {
                    None => removed.push(RouteChange::Removed(route.clone())),
                    Some(new) if new.target != route.target => changed.push(RouteChange::Changed {
                        hostname: route.hostname.clone(),
                        from: route.target.clone(),
                        to: new.target.clone(),
                    }),
                    Some(_) => {}
                }
            }
            for (key, route) in wanted {
                if !current.contains_key(key) {
                    added.push(RouteChange::Added(route.clone()));
                }
            }
        }
        removed.into_iter().chain(changed).chain(added).collect()
    }

    /// Applies changes as computed by [`RouteTable::diff`]. Each change is applied whatever
    /// the table holds: a removal of a missing route does nothing, a change of a missing
    /// route adds it, so applying a diff twice is harmless.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = RouteChange<T>>) {
        for change in changes {
            match change {
                RouteChange::Added(route) => {
                    self.insert(route);
                }
                RouteChange::Removed(route) => {
                    self.remove(&route.hostname);
                }
                RouteChange::Changed { hostname, to, .. } => {
                    let (map, key) = self.map_and_key_mut(&hostname);
                    match map.entry(key) {
                        Entry::Occupied(mut entry) => entry.get_mut().target = to,
                        Entry::Vacant(entry) => {
                            entry.insert(Route { hostname, target: to });
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hostname(name: &str) -> Hostname {
        name.parse().unwrap()
    }

    fn route(name: &str, target: u32) -> Route<u32> {
        Route { hostname: hostname(name), target }
    }

    fn table(routes: &[(&str, u32)]) -> RouteTable<u32> {
        RouteTable::from_routes(routes.iter().map(|(name, target)| route(name, *target))).unwrap()
    }

    #[test]
    fn exact_names_win_over_wildcards() {
        let routes = table(&[("*.example.test", 1), ("app.example.test", 2), ("example.test", 3)]);
        assert_eq!(routes.target("app.example.test"), Some(&2));
        let matched = routes.lookup("app.example.test").unwrap();
        assert!(!matched.wildcard);
        assert_eq!(matched.route.hostname.as_str(), "app.example.test");

        assert_eq!(routes.target("other.example.test"), Some(&1));
        let matched = routes.lookup("other.example.test").unwrap();
        assert!(matched.wildcard);
        assert_eq!(matched.route.hostname.as_str(), "*.example.test");

        assert_eq!(routes.target("example.test"), Some(&3));
    }

    #[test]
    fn a_wildcard_matches_exactly_one_label() {
        let routes = table(&[("*.example.test", 1)]);
        assert_eq!(routes.target("a.example.test"), Some(&1));
        assert_eq!(routes.target("example.test"), None);
        assert_eq!(routes.target("a.b.example.test"), None);
        assert_eq!(routes.target(".example.test"), None);
        // A literal `*` label is not a name the wildcard stands for (and no parsed server
        // name has one).
        assert_eq!(routes.target("*.example.test"), None);
        assert_eq!(routes.target("aexample.test"), None);
        assert_eq!(routes.target("a.example.test.evil"), None);
        assert_eq!(routes.target(""), None);
        assert_eq!(routes.target("test"), None);
    }

    #[test]
    fn nested_wildcards_are_independent() {
        let routes = table(&[("*.example.test", 1), ("*.eu.example.test", 2)]);
        assert_eq!(routes.target("eu.example.test"), Some(&1));
        assert_eq!(routes.target("app.eu.example.test"), Some(&2));
        assert_eq!(routes.target("app.us.example.test"), None);
    }

    #[test]
    fn lookups_are_exact_strings() {
        // Normalization is the parser's job: the table compares normalized names only.
        let routes = table(&[("app.example.test", 1)]);
        assert_eq!(routes.target("APP.example.test"), None);
        assert_eq!(routes.target("app.example.test."), None);
    }

    #[test]
    fn duplicate_hostnames_are_refused() {
        let error = RouteTable::from_routes([route("app.example.test", 1), route("app.example.test", 2)]).unwrap_err();
        assert_eq!(error, RouteTableError::DuplicateHostname(hostname("app.example.test")));
        assert!(RouteTable::from_routes([route("*.example.test", 1), route("*.example.test", 2)]).is_err());
        // An exact name and the wildcard over it are different routes.
        assert_eq!(table(&[("*.example.test", 1), ("a.example.test", 2)]).len(), 2);
    }

    #[test]
    fn insert_get_and_remove() {
        let mut routes = RouteTable::new();
        assert!(routes.is_empty());
        assert_eq!(routes.insert(route("*.example.test", 1)), None);
        assert_eq!(routes.insert(route("app.example.test", 2)), None);
        assert_eq!(routes.insert(route("app.example.test", 3)), Some(route("app.example.test", 2)));
        assert_eq!(routes.len(), 2);
        assert_eq!(routes.get(&hostname("*.example.test")), Some(&route("*.example.test", 1)));
        assert_eq!(routes.get(&hostname("other.example.test")), None);

        assert_eq!(routes.remove(&hostname("*.example.test")), Some(route("*.example.test", 1)));
        assert_eq!(routes.target("other.example.test"), None);
        assert_eq!(routes.target("app.example.test"), Some(&3));
        assert_eq!(routes.remove(&hostname("*.example.test")), None);
    }

    #[test]
    fn iteration_is_ordered() {
        let routes = table(&[("b.example.test", 1), ("*.z.test", 2), ("a.example.test", 3), ("*.a.test", 4)]);
        let names: Vec<&str> = routes.iter().map(|route| route.hostname.as_str()).collect();
        assert_eq!(names, ["a.example.test", "b.example.test", "*.a.test", "*.z.test"]);
    }

    #[test]
    fn diff_lists_removals_changes_and_additions() {
        let current = table(&[("a.example.test", 1), ("b.example.test", 2), ("*.example.test", 3)]);
        let desired = table(&[("b.example.test", 5), ("c.example.test", 6), ("*.example.test", 3), ("*.x.test", 7)]);
        let changes = current.diff(&desired);
        assert_eq!(
            changes,
            [
                RouteChange::Removed(route("a.example.test", 1)),
                RouteChange::Changed { hostname: hostname("b.example.test"), from: 2, to: 5 },
                RouteChange::Added(route("c.example.test", 6)),
                RouteChange::Added(route("*.x.test", 7)),
            ]
        );
        let names: Vec<&str> = changes.iter().map(|change| change.hostname().as_str()).collect();
        assert_eq!(names, ["a.example.test", "b.example.test", "c.example.test", "*.x.test"]);

        let mut updated = current.clone();
        updated.apply(changes.clone());
        assert_eq!(updated, desired);
        // Applying the same changes again changes nothing.
        updated.apply(changes);
        assert_eq!(updated, desired);
        assert!(updated.diff(&desired).is_empty());
    }

    #[test]
    fn diff_between_empty_tables_is_empty_and_to_empty_removes_everything() {
        let empty = RouteTable::<u32>::new();
        assert!(empty.diff(&empty).is_empty());
        let routes = table(&[("a.example.test", 1), ("*.example.test", 2)]);
        let changes = routes.diff(&empty);
        assert!(changes.iter().all(|change| matches!(change, RouteChange::Removed(_))));
        let mut cleared = routes.clone();
        cleared.apply(changes);
        assert!(cleared.is_empty());
        let mut rebuilt = RouteTable::new();
        rebuilt.apply(empty.diff(&routes));
        assert_eq!(rebuilt, routes);
    }

    #[test]
    fn a_change_of_a_missing_route_adds_it() {
        let mut routes = RouteTable::new();
        routes.apply([RouteChange::Changed { hostname: hostname("*.example.test"), from: 1, to: 2 }]);
        assert_eq!(routes.target("a.example.test"), Some(&2));
    }

    #[test]
    fn lookup_agrees_with_the_model_s_hostname_matching() {
        // The model's `Hostname::matches` is an independent statement of the same rule: the
        // table must pick the exact route when one matches, else the only matching wildcard.
        let names = [
            "example.test",
            "a.example.test",
            "b.example.test",
            "a.b.example.test",
            "b.a.example.test",
            "x.a.example.test",
            "other.test",
            "a.other.test",
            "test",
        ];
        let all_routes = ["a.example.test", "*.example.test", "*.a.example.test", "example.test", "*.other.test"];
        // Every subset of the routes, as a bit mask.
        for mask in 0..(1u32 << all_routes.len()) {
            let chosen: Vec<(&str, u32)> = all_routes
                .iter()
                .enumerate()
                .filter(|(index, _)| mask & (1 << index) != 0)
                .map(|(index, name)| (*name, u32::try_from(index).unwrap()))
                .collect();
            let routes = table(&chosen);
            for name in names {
                let matching: Vec<&Route<u32>> = routes.iter().filter(|route| route.hostname.matches(name)).collect();
                let reference = matching
                    .iter()
                    .find(|route| !route.hostname.is_wildcard())
                    .or_else(|| matching.first())
                    .map(|route| &route.target);
                assert_eq!(routes.target(name), reference, "{name} in {chosen:?}");
            }
        }
    }

    #[test]
    fn works_with_device_targets() {
        let device_id = DeviceId::new();
        let target = RouteTarget { device_id, tunnel_address: Ipv4Addr::new(100, 96, 0, 2), online: true };
        let routes = RouteTable::from_routes([Route { hostname: hostname("app.example.test"), target }]).unwrap();
        assert_eq!(routes.target("app.example.test"), Some(&target));
    }
}
