//! Fuzzes the route table. The input is lines: `+name` adds a route, any other line is a
//! server name to look up. Lookups must agree with the model's own `Hostname::matches` (exact
//! route first, else the wildcard; names starting with a `*` label match nothing), and
//! diffing then applying must turn one table into another.

#![no_main]

use edgible::model::Hostname;
use edgible_edge::routes::{Route, RouteTable};
use edgible_edge::sni::ServerName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut routes = Vec::new();
    let mut names = Vec::new();
    for (index, line) in data.split(|byte| *byte == b'\n').enumerate() {
        match line.strip_prefix(b"+") {
            Some(hostname) => {
                let parsed = std::str::from_utf8(hostname).ok().and_then(|text| text.parse::<Hostname>().ok());
                if let Some(hostname) = parsed {
                    routes.push(Route { hostname, target: index });
                }
            }
            None => names.push(line),
        }
    }

    let mut table = RouteTable::new();
    for route in &routes {
        table.insert(route.clone());
    }
    // `from_routes` refuses exactly the lists with a duplicate hostname.
    let mut unique: Vec<&str> = routes.iter().map(|route| route.hostname.as_str()).collect();
    unique.sort_unstable();
    unique.dedup();
    match RouteTable::from_routes(routes.clone()) {
        Ok(built) => {
            assert_eq!(unique.len(), routes.len());
            assert_eq!(built, table);
        }
        Err(_) => assert!(unique.len() < routes.len()),
    }
    assert_eq!(table.len(), unique.len());

    for raw in names {
        let normalized = ServerName::parse(raw).ok();
        let candidates = [std::str::from_utf8(raw).ok(), normalized.as_ref().map(ServerName::as_str)];
        for name in candidates.into_iter().flatten() {
            // The model's `matches` takes `*` for an ordinary label; the table never matches
            // a name whose first label is `*` (no parsed server name has one), so such names
            // are checked on their own.
            if name.split('.').next() == Some("*") {
                assert_eq!(table.target(name), None, "{name:?}");
                continue;
            }
            let matching: Vec<&Route<usize>> = table.iter().filter(|route| route.hostname.matches(name)).collect();
            let reference = matching
                .iter()
                .find(|route| !route.hostname.is_wildcard())
                .or_else(|| matching.first())
                .map(|route| &route.target);
            assert_eq!(table.target(name), reference, "{name:?}");
        }
    }

    let (first, second) = routes.split_at(routes.len() / 2);
    let mut from = RouteTable::new();
    first.iter().cloned().for_each(|route| drop(from.insert(route)));
    let mut to = RouteTable::new();
    second.iter().cloned().for_each(|route| drop(to.insert(route)));
    let changes = from.diff(&to);
    from.apply(changes);
    assert_eq!(from, to);
    assert!(from.diff(&to).is_empty());
});
