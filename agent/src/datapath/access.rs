//! The proxy's access table from the desired applications and the server's last `access`
//! message: pure.
//!
//! Every hostname of every desired application gets an entry (public ones too), so a routed
//! hostname missing from the table is a gap the proxy refuses rather than serves. Raw TCP
//! applications are in it as well: the proxy splices only public ones. A hostname claimed
//! twice keeps the first application's policy, like its route ([`super::routes`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::control::link::AccessUpdate;
use crate::proxy::{AccessSettings, AccessTable, ApplicationGate};
use crate::reconcile::DesiredState;

/// The table for `desired`; the settings and secrets come from `access`, `None` until the
/// server first sent one (applications with a policy are then refused).
pub fn table(desired: &DesiredState, access: Option<&AccessUpdate>) -> AccessTable {
    let settings = access.map(|access| {
        AccessSettings::new(&access.login_url, access.assertion_keys.clone(), access.session_ttl_seconds)
    });
    let secrets: HashMap<_, _> = access
        .map(|access| access.applications.iter().map(|secrets| (secrets.application_id, secrets)).collect())
        .unwrap_or_default();
    let mut table = AccessTable::new(settings);
    let mut claimed = HashSet::new();
    for application in desired.applications.values() {
        let gate = Arc::new(ApplicationGate {
            application_id: application.id,
            organization_id: application.organization_id,
            policy: application.spec.access.clone(),
            secrets: secrets.get(&application.id).map(|secrets| (*secrets).clone()),
        });
        for hostname in &application.spec.hostnames {
            let hostname = hostname.to_string();
            if claimed.insert(hostname.clone()) {
                table.insert(&hostname, Arc::clone(&gate));
            }
        }
    }
    table
}
