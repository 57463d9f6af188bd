//! Static routes from a file, for an edge run without the server's hub
//! (`edgible-edge run --routes FILE`): a fixed set of devices reachable at known addresses.
//! The binary loads the file at start and again on every SIGHUP; a file that does not parse
//! or holds a duplicate hostname is refused as a whole and the edge keeps its current table.
//!
//! The format is YAML (so JSON works too):
//!
//! ```yaml
//! routes:
//!   - hostname: app.example.test
//!     device_id: 0192f0c4-6f1e-7cc3-9a4b-0b2f3c4d5e6f   # the device's id in the platform
//!     tunnel_address: 100.96.0.2                          # its tunnel address; port 443 by default
//!   - hostname: "*.apps.example.test"                     # a wildcard matches one label
//!     device_id: 0192f0c4-6f1e-7cc3-9a4b-0b2f3c4d5e70
//!     tunnel_address: 100.96.0.3
//!     online: false                                       # refuse with internal_error (maintenance)
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use edgible::model::{DeviceId, Hostname};
use serde::Deserialize;

use crate::route_source::SharedRoutes;
use crate::routes::{Route, RouteChange, RouteTable, RouteTableError, RouteTarget};

/// The file's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    #[serde(default)]
    routes: Vec<RouteEntry>,
}

/// One route as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    hostname: Hostname,
    device_id: DeviceId,
    tunnel_address: Ipv4Addr,
    #[serde(default = "online_by_default")]
    online: bool,
}

fn online_by_default() -> bool {
    true
}

impl From<RouteEntry> for Route {
    fn from(entry: RouteEntry) -> Self {
        Route {
            hostname: entry.hostname,
            target: RouteTarget {
                device_id: entry.device_id,
                tunnel_address: entry.tunnel_address,
                online: entry.online,
            },
        }
    }
}

/// Why a routes file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum RouteFileError {
    #[error("cannot read the routes file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// serde_yaml's message names the line, column and field at fault.
    #[error("invalid routes file {path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("invalid routes file {path}: {source}")]
    Table { path: PathBuf, source: RouteTableError },
}

/// Parses the text of a routes file.
pub fn parse(text: &str, path: &Path) -> Result<RouteTable, RouteFileError> {
    // An empty file is an empty table, not a YAML error.
    if text.trim().is_empty() {
        return Ok(RouteTable::new());
    }
    let file: RouteFile =
        serde_yaml::from_str(text).map_err(|source| RouteFileError::Parse { path: path.to_owned(), source })?;
    RouteTable::from_routes(file.routes.into_iter().map(Route::from))
        .map_err(|source| RouteFileError::Table { path: path.to_owned(), source })
}

/// Reads and parses a routes file.
pub fn load(path: &Path) -> Result<RouteTable, RouteFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| RouteFileError::Read { path: path.to_owned(), source })?;
    parse(&text, path)
}

/// Loads the file and installs it as the edge's table, answering what changed. On error the
/// current table stays.
pub fn reload(path: &Path, routes: &SharedRoutes) -> Result<Vec<RouteChange>, RouteFileError> {
    let table = load(path)?;
    Ok(routes.replace(table))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DEVICE: &str = "0192f0c4-6f1e-7cc3-9a4b-0b2f3c4d5e6f";

    fn parse_text(text: &str) -> Result<RouteTable, RouteFileError> {
        parse(text, Path::new("routes.yaml"))
    }

    #[test]
    fn the_documented_example_parses() {
        let text = format!(
            "routes:\n  - hostname: app.example.test\n    device_id: {DEVICE}\n    tunnel_address: 100.96.0.2\n  - hostname: \"*.apps.example.test\"\n    device_id: {DEVICE}\n    tunnel_address: 100.96.0.3\n    online: false\n"
        );
        let table = parse_text(&text).unwrap();
        assert_eq!(table.len(), 2);
        let exact = table.target("app.example.test").unwrap();
        assert_eq!(exact.tunnel_address, Ipv4Addr::new(100, 96, 0, 2));
        assert!(exact.online);
        assert!(!table.target("x.apps.example.test").unwrap().online);
    }

    #[test]
    fn json_and_empty_files_work() {
        let json = format!(
            r#"{{"routes": [{{"hostname": "a.example.test", "device_id": "{DEVICE}", "tunnel_address": "100.96.0.9"}}]}}"#
        );
        assert_eq!(parse_text(&json).unwrap().len(), 1);
        assert!(parse_text("").unwrap().is_empty());
        assert!(parse_text("routes: []\n").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_place_at_fault() {
        let unknown = format!(
            "routes:\n  - hostname: a.example.test\n    device_id: {DEVICE}\n    tunnel_address: 100.96.0.2\n    port: 8443\n"
        );
        let message = parse_text(&unknown).unwrap_err().to_string();
        assert!(
            message.contains("routes.yaml")
                && message.contains("routes[0]: unknown field `port`")
                && message.contains("line 5"),
            "{message}"
        );

        let bad_host =
            format!("routes:\n  - hostname: Not A Host\n    device_id: {DEVICE}\n    tunnel_address: 100.96.0.2\n");
        let message = parse_text(&bad_host).unwrap_err().to_string();
        assert!(
            message.contains("routes[0]") && message.contains("Not A Host") && message.contains("line 2"),
            "{message}"
        );

        let bad_address = format!(
            "routes:\n  - hostname: a.example.test\n    device_id: {DEVICE}\n    tunnel_address: 2001:db8::1\n"
        );
        assert!(matches!(parse_text(&bad_address), Err(RouteFileError::Parse { .. })));

        let duplicate = format!(
            "routes:\n  - {{hostname: a.example.test, device_id: {DEVICE}, tunnel_address: 100.96.0.2}}\n  - {{hostname: a.example.test, device_id: {DEVICE}, tunnel_address: 100.96.0.3}}\n"
        );
        let error = parse_text(&duplicate).unwrap_err();
        assert!(
            matches!(error, RouteFileError::Table { source: RouteTableError::DuplicateHostname(_), .. }),
            "{error}"
        );
    }

    #[test]
    fn a_failed_reload_keeps_the_current_table() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("routes.yaml");
        std::fs::write(
            &path,
            format!("routes:\n  - {{hostname: a.example.test, device_id: {DEVICE}, tunnel_address: 100.96.0.2}}\n"),
        )
        .unwrap();
        let routes = SharedRoutes::default();
        assert_eq!(reload(&path, &routes).unwrap().len(), 1);
        std::fs::write(&path, "routes: [").unwrap();
        assert!(reload(&path, &routes).is_err());
        assert_eq!(routes.current().len(), 1);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(reload(&path, &routes), Err(RouteFileError::Read { .. })));
        assert_eq!(routes.current().len(), 1);
    }
}
