//! The seam between whatever decides the routes and the listener that follows them.
//!
//! [`SharedRoutes`] holds the current [`RouteTable`] behind a `watch` channel. Connections
//! read a snapshot (`current`, one `Arc` clone) and keep using it for their routing decision;
//! a writer swaps in a whole new table with `replace`, which never disturbs connections
//! already spliced. The writer is either the routes file (`--routes`, reloaded on SIGHUP,
//! see [`crate::route_file`]) or, for an enrolled edge, the hub client
//! ([`crate::hub_client`]), which replaces the table on every pushed configuration.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::metrics::{MetricSource, write_family};
use crate::routes::{RouteChange, RouteTable};

/// The edge's current route table, shared by every connection and every writer. Cloning
/// shares the same table.
#[derive(Clone)]
pub struct SharedRoutes {
    inner: Arc<Inner>,
}

struct Inner {
    sender: watch::Sender<Arc<RouteTable>>,
    /// How many replacements changed at least one route.
    updates: AtomicU64,
}

impl SharedRoutes {
    pub fn new(table: RouteTable) -> Self {
        let (sender, _) = watch::channel(Arc::new(table));
        Self { inner: Arc::new(Inner { sender, updates: AtomicU64::new(0) }) }
    }

    /// The table as it is now. The snapshot stays valid (and unchanged) while held.
    pub fn current(&self) -> Arc<RouteTable> {
        self.inner.sender.borrow().clone()
    }

    /// Replaces the whole table and answers what changed. Subscribers are only woken when
    /// something did, so a writer may replace with an identical table freely (a periodic
    /// full snapshot, a reload of an unchanged file).
    pub fn replace(&self, table: RouteTable) -> Vec<RouteChange> {
        let mut changes = Vec::new();
        self.inner.sender.send_if_modified(|current| {
            changes = current.diff(&table);
            if changes.is_empty() {
                return false;
            }
            *current = Arc::new(table);
            true
        });
        if !changes.is_empty() {
            self.inner.updates.fetch_add(1, Ordering::Relaxed);
        }
        for change in &changes {
            match change {
                RouteChange::Added(route) => tracing::info!(
                    hostname = %route.hostname,
                    device = %route.target.device_id,
                    address = %route.target.tunnel_address,
                    online = route.target.online,
                    "route added"
                ),
                RouteChange::Removed(route) => tracing::info!(hostname = %route.hostname, "route removed"),
                RouteChange::Changed { hostname, from, to } => tracing::info!(
                    %hostname,
                    from_device = %from.device_id,
                    to_device = %to.device_id,
                    from_address = %from.tunnel_address,
                    to_address = %to.tunnel_address,
                    online = to.online,
                    "route changed"
                ),
            }
        }
        changes
    }

    /// A receiver that sees every table that `replace` installs from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.inner.sender.subscribe()
    }
}

impl Default for SharedRoutes {
    fn default() -> Self {
        Self::new(RouteTable::new())
    }
}

impl MetricSource for SharedRoutes {
    fn write_metrics(&self, out: &mut String) {
        let table = self.current();
        let online = table.iter().filter(|route| route.target.online).count();
        write_family(out, "edgible_edge_routes", "gauge", "Hostnames in the route table, by device state.");
        let _ = writeln!(out, "edgible_edge_routes{{state=\"online\"}} {online}");
        let _ = writeln!(out, "edgible_edge_routes{{state=\"offline\"}} {}", table.len() - online);
        write_family(
            out,
            "edgible_edge_route_table_updates_total",
            "counter",
            "Route table replacements that changed at least one route.",
        );
        let _ = writeln!(out, "edgible_edge_route_table_updates_total {}", self.inner.updates.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::Ipv4Addr;

    use edgible::model::DeviceId;

    use super::*;
    use crate::routes::{Route, RouteTarget};

    fn table(routes: &[(&str, bool)]) -> RouteTable {
        let device_id: DeviceId = "00000000-0000-7000-8000-000000000001".parse().unwrap();
        RouteTable::from_routes(routes.iter().map(|(name, online)| Route {
            hostname: name.parse().unwrap(),
            target: RouteTarget { device_id, tunnel_address: Ipv4Addr::new(100, 96, 0, 2), online: *online },
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn replace_swaps_the_table_and_wakes_subscribers_only_on_change() {
        let routes = SharedRoutes::default();
        let mut receiver = routes.subscribe();
        let snapshot = routes.current();
        assert!(snapshot.is_empty());

        let changes = routes.replace(table(&[("a.example.test", true)]));
        assert_eq!(changes.len(), 1);
        assert!(receiver.has_changed().unwrap());
        receiver.borrow_and_update();
        // The old snapshot is unchanged: connections that hold it are not disturbed.
        assert!(snapshot.is_empty());
        assert_eq!(routes.current().len(), 1);

        assert!(routes.replace(table(&[("a.example.test", true)])).is_empty());
        assert!(!receiver.has_changed().unwrap());

        let changes = routes.replace(table(&[("a.example.test", false)]));
        assert!(matches!(changes.as_slice(), [RouteChange::Changed { .. }]));
        assert!(receiver.has_changed().unwrap());

        let mut metrics = String::new();
        routes.write_metrics(&mut metrics);
        assert!(metrics.contains("edgible_edge_routes{state=\"online\"} 0\n"), "{metrics}");
        assert!(metrics.contains("edgible_edge_routes{state=\"offline\"} 1\n"), "{metrics}");
        assert!(metrics.contains("edgible_edge_route_table_updates_total 2\n"), "{metrics}");
    }
}
