//! Hostname ownership: which organization may use which application hostname.
//!
//! Two kinds of names exist. Names below a *platform zone* (`--platform-zone apps.example.com`,
//! one or more labels below it) are handed out first come, first served: hostnames are
//! already unique across the server, so the first application to claim a name holds it. Any
//! other name must be at or below a *domain* the organization verified: it creates the domain
//! (`POST /v1/domains`), publishes the token the API answers as the TXT record
//! `_edgible-challenge.<domain>`, and asks the server to look (`POST /v1/domains/{id}/verify`),
//! which queries the record with a real resolver ([`TxtResolver`], `hickory-resolver`; the
//! system's unless `--dns-resolver ADDR:PORT` names one).
//!
//! A verified domain belongs to one organization for good: no other organization can verify
//! it, a name above it or a name below it while it is held, and it cannot be deleted while
//! applications of its organization use names under it. Domains cannot overlap a platform zone
//! (neither at, above nor below one), so the two kinds never meet.
//!
//! Compatibility: enforcement is on only when the server is started with at least one
//! `--platform-zone` or with `--require-domain-ownership`. Without either, hostnames are
//! checked for uniqueness only, as before domains existed; domains can still be created and
//! verified, so an operator can turn enforcement on later. Hostnames an application already
//! holds are never re-checked on update, so turning enforcement on does not freeze existing
//! applications; only names they add are.
//!
//! This module is pure policy plus the DNS lookup; the database side (the `domains` table,
//! the checks inside write transactions) is `crate::db`'s `domains` module.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edgible::model::{DOMAIN_CHALLENGE_LABEL, Hostname, is_at_or_below};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::RData;
use rand::Rng;

/// How long one DNS query may take before it is retried.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);
/// How many times a timed-out DNS query is sent in all.
const DNS_ATTEMPTS: usize = 2;

/// Which hostnames an organization may give its applications.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostnamePolicy {
    /// Zones whose names (one or more labels below them) are first come, first served.
    pub platform_zones: Vec<Hostname>,
    /// Check ownership even without platform zones: every hostname needs a verified domain.
    pub require_ownership: bool,
}

/// Where a hostname stands under a policy, before looking at the organization's domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing<'a> {
    /// Ownership is not enforced: any (unique) hostname goes.
    Unchecked,
    /// Below this platform zone: first come, first served.
    PlatformZone(&'a Hostname),
    /// Needs a verified domain of the organization at or above it.
    NeedsDomain,
}

impl HostnamePolicy {
    /// Whether application hostnames are checked at all.
    pub fn enforced(&self) -> bool {
        self.require_ownership || !self.platform_zones.is_empty()
    }

    /// Where `hostname` stands. A wildcard stands for the names one label below its parent, so
    /// `*.x.apps.example.com` is below the zone `apps.example.com`, while `*.apps.example.com`
    /// would cover the whole zone and is not.
    pub fn standing(&self, hostname: &Hostname) -> Standing<'_> {
        if !self.enforced() {
            return Standing::Unchecked;
        }
        let name = base_name(hostname);
        match self.platform_zones.iter().find(|zone| name != zone.as_str() && is_at_or_below(name, zone.as_str())) {
            Some(zone) => Standing::PlatformZone(zone),
            None => Standing::NeedsDomain,
        }
    }

    /// The platform zone a would-be domain overlaps (is, is above or is below), if any.
    pub fn overlapping_zone(&self, domain: &Hostname) -> Option<&Hostname> {
        self.platform_zones.iter().find(|zone| {
            is_at_or_below(domain.as_str(), zone.as_str()) || is_at_or_below(zone.as_str(), domain.as_str())
        })
    }

    /// The zones for messages: `apps.example.com, apps.example.net`.
    pub fn zones_text(&self) -> String {
        self.platform_zones.iter().map(Hostname::as_str).collect::<Vec<_>>().join(", ")
    }
}

/// The name a hostname's ownership is decided on: the hostname itself, or for a wildcard the
/// name it stands under (a wildcard is owned with the domain its parent is at or below).
pub fn base_name(hostname: &Hostname) -> &str {
    if hostname.is_wildcard() { hostname.parent() } else { hostname.as_str() }
}

/// Whether `hostname` is covered by a verified domain named `domain`.
pub fn covered_by(hostname: &Hostname, domain: &str) -> bool {
    is_at_or_below(base_name(hostname), domain)
}

/// The fully qualified name of a domain's verification record (with the root's dot, so no
/// search domain is ever appended).
pub fn challenge_fqdn(domain: &str) -> String {
    format!("{DOMAIN_CHALLENGE_LABEL}.{domain}.")
}

/// The name of a domain's verification record, as users write it.
pub fn challenge_name(domain: &str) -> String {
    format!("{DOMAIN_CHALLENGE_LABEL}.{domain}")
}

/// A new verification token: 256 random bits, URL-safe base64 (43 characters, fits one TXT
/// character-string).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Why a TXT lookup gave no answer to check.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The name has no TXT record (NXDOMAIN, or the name exists without TXT).
    #[error("no TXT record found at {name}")]
    NotFound { name: String },
    /// The DNS answered with an error code (SERVFAIL, REFUSED, ...): the zone is broken or
    /// unreachable for the resolver.
    #[error("the DNS answered {code} for the TXT record {name}")]
    Refused { name: String, code: String },
    /// No answer at all (timeouts, no name server configured); retrying later may help.
    #[error("cannot query the TXT record {name}: {message}")]
    Unavailable { name: String, message: String },
}

/// Looks up TXT records with a real resolver: the system's (`/etc/resolv.conf`) or the one
/// `--dns-resolver` names. A new resolver is built for every lookup, so nothing is cached: a
/// user who publishes the record after a failed attempt is seen at once.
#[derive(Debug, Clone, Default)]
pub struct TxtResolver {
    /// The name server to ask instead of the system's (UDP, and TCP for long answers).
    pub server: Option<SocketAddr>,
}

impl TxtResolver {
    /// Every TXT value at `fqdn` (each record's character-strings joined, as RFC 7208 reads
    /// them), in the order the server sent them.
    pub async fn lookup(&self, fqdn: &str) -> Result<Vec<String>, LookupError> {
        let display = fqdn.trim_end_matches('.').to_owned();
        let unavailable = |message: String| LookupError::Unavailable { name: display.clone(), message };
        let mut builder = match self.server {
            Some(server) => {
                let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut name_server.connections {
                    connection.port = server.port();
                }
                hickory_resolver::Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![name_server]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => hickory_resolver::Resolver::builder_tokio()
                .map_err(|error| unavailable(format!("no system resolver configuration: {error}")))?,
        };
        let options = builder.options_mut();
        options.timeout = DNS_TIMEOUT;
        options.attempts = DNS_ATTEMPTS;
        options.cache_size = 0;
        let resolver = builder.build().map_err(|error| unavailable(error.to_string()))?;
        match resolver.txt_lookup(fqdn).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => Some(txt.txt_data.iter().map(|part| String::from_utf8_lossy(part)).collect()),
                    _ => None,
                })
                .collect()),
            Err(NetError::Dns(DnsError::NoRecordsFound(_))) => Err(LookupError::NotFound { name: display }),
            Err(NetError::Dns(DnsError::ResponseCode(code))) => {
                Err(LookupError::Refused { name: display, code: code.to_string() })
            }
            Err(error) => Err(unavailable(error.to_string())),
        }
    }
}

/// What the domain parts of the server are configured with.
#[derive(Debug, Clone, Default)]
pub struct DomainSettings {
    pub policy: HostnamePolicy,
    pub resolver: TxtResolver,
}

/// Why a verification did not find the token, in words for the user: the record's name and
/// what it held.
pub fn mismatch_message(domain: &str, found: &[String]) -> String {
    let shown: Vec<String> = found.iter().take(5).map(|value| format!("{value:?}")).collect();
    format!(
        "the TXT record {} holds {} but not this domain's token; set it to the domain's txt_record_value",
        challenge_name(domain),
        shown.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> Hostname {
        name.parse().expect("a test hostname")
    }

    fn zoned() -> HostnamePolicy {
        HostnamePolicy { platform_zones: vec![host("apps.example.test")], require_ownership: false }
    }

    #[test]
    fn without_zones_or_the_flag_nothing_is_checked() {
        let policy = HostnamePolicy::default();
        assert!(!policy.enforced());
        assert_eq!(policy.standing(&host("anything.example.org")), Standing::Unchecked);
        let strict = HostnamePolicy { platform_zones: vec![], require_ownership: true };
        assert_eq!(strict.standing(&host("anything.example.org")), Standing::NeedsDomain);
    }

    #[test]
    fn names_strictly_below_a_zone_are_first_come_first_served() {
        let policy = zoned();
        let zone = host("apps.example.test");
        assert_eq!(policy.standing(&host("web.apps.example.test")), Standing::PlatformZone(&zone));
        assert_eq!(policy.standing(&host("a.b.apps.example.test")), Standing::PlatformZone(&zone));
        assert_eq!(policy.standing(&host("*.team.apps.example.test")), Standing::PlatformZone(&zone));
        // The zone itself, a wildcard over the whole zone, and look-alikes are not.
        assert_eq!(policy.standing(&host("apps.example.test")), Standing::NeedsDomain);
        assert_eq!(policy.standing(&host("*.apps.example.test")), Standing::NeedsDomain);
        assert_eq!(policy.standing(&host("webapps.example.test")), Standing::NeedsDomain);
        assert_eq!(policy.standing(&host("web.example.test")), Standing::NeedsDomain);
    }

    #[test]
    fn domains_cover_themselves_and_names_below() {
        assert!(covered_by(&host("example.org"), "example.org"));
        assert!(covered_by(&host("www.example.org"), "example.org"));
        assert!(covered_by(&host("*.example.org"), "example.org"));
        assert!(covered_by(&host("*.a.example.org"), "example.org"));
        assert!(!covered_by(&host("badexample.org"), "example.org"));
        assert!(!covered_by(&host("example.org"), "www.example.org"));
    }

    #[test]
    fn domains_may_not_overlap_a_zone() {
        let policy = zoned();
        assert!(policy.overlapping_zone(&host("apps.example.test")).is_some());
        assert!(policy.overlapping_zone(&host("x.apps.example.test")).is_some());
        assert!(policy.overlapping_zone(&host("example.test")).is_some());
        assert!(policy.overlapping_zone(&host("other.example.test")).is_none());
    }

    #[test]
    fn tokens_are_random_and_fit_a_txt_string() {
        let (first, second) = (new_token(), new_token());
        assert_ne!(first, second);
        assert_eq!(first.len(), 43);
        assert!(first.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'));
        assert_eq!(challenge_fqdn("example.org"), "_edgible-challenge.example.org.");
    }

    #[test]
    fn mismatches_say_what_was_found() {
        let message = mismatch_message("example.org", &["nope".into()]);
        assert!(message.contains("_edgible-challenge.example.org"), "{message}");
        assert!(message.contains("\"nope\""), "{message}");
    }
}
