//! The proxy's route table from the desired applications: pure.

use edgible::model::ApplicationProtocol;

use crate::proxy::Route;
use crate::reconcile::DesiredState;

/// Every hostname of every desired application → its workload's port (on the address its
/// driver gives, which the proxy asks per request), spliced as raw TCP for `tcp` applications. Hostnames are unique across the platform, so no two
/// applications claim one name; were it to happen, the application with the smaller id wins,
/// deterministically.
pub fn routes(desired: &DesiredState) -> Vec<(String, Route)> {
    let mut routes: Vec<(String, Route)> = Vec::new();
    for application in desired.applications.values() {
        let route =
            Route { port: application.spec.port, raw_tcp: application.spec.protocol == ApplicationProtocol::Tcp };
        for hostname in &application.spec.hostnames {
            let hostname = hostname.to_string();
            if routes.iter().any(|(name, _)| *name == hostname) {
                tracing::warn!(%hostname, application = %application.id, "a hostname claimed twice; keeping the first");
                continue;
            }
            routes.push((hostname, route));
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use edgible::model::Hostname;

    use super::*;
    use crate::reconcile::DesiredUpdate;
    use crate::reconcile::plan::tests::application;

    fn hostname(name: &str) -> Hostname {
        name.parse().expect("a hostname")
    }

    #[test]
    fn every_hostname_routes_to_its_applications_port_and_protocol() {
        let mut web = application("web", 1, "serve");
        web.spec.hostnames = vec![hostname("web.example.test"), hostname("*.web.example.test")];
        web.spec.port = 8080;
        let mut db = application("db", 1, "serve");
        db.spec.hostnames = vec![hostname("db.example.test")];
        db.spec.port = 5432;
        db.spec.protocol = ApplicationProtocol::Tcp;
        let mut desired = DesiredState::default();
        desired.apply(DesiredUpdate::full(1, vec![web, db]));

        let mut table = routes(&desired);
        table.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            table,
            [
                ("*.web.example.test".to_owned(), Route { port: 8080, raw_tcp: false }),
                ("db.example.test".to_owned(), Route { port: 5432, raw_tcp: true }),
                ("web.example.test".to_owned(), Route { port: 8080, raw_tcp: false }),
            ]
        );
        assert!(routes(&DesiredState::default()).is_empty());
    }
}
