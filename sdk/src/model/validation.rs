//! Value types that can only hold valid values: each is parsed once, at the edge, from a string
//! and is then trusted everywhere. Parse errors say what is wrong; the caller (serde, through
//! `serde_path_to_error`, or [`ValidationError::at`]) adds the field.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// A value that failed validation, with the path of the field it came from
/// (`hostnames[1]`, `workload.process.command`) when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ValidationError {
    pub field: Option<String>,
    pub message: String,
}

impl ValidationError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { field: None, message: message.into() }
    }

    /// An error for a known field.
    pub fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), message: message.into() }
    }

    /// Prefixes the field path with `parent` (`port` inside `health_check` becomes
    /// `health_check.port`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = Some(match self.field {
            Some(field) if field.starts_with('[') => format!("{parent}{field}"),
            Some(field) => format!("{parent}.{field}"),
            None => parent.to_owned(),
        });
        self
    }
}

/// Implements the serde and string conversions shared by every parsed string type: the type
/// (de)serializes as a plain string and only a valid string deserializes.
macro_rules! parsed_string {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                value.parse()
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValidationError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                value.parse()
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                raw.parse().map_err(|e: ValidationError| serde::de::Error::custom(e.message))
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(<$name>::DESCRIPTION))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

/// The name of a platform object: 1 to 63 characters of lowercase letters, digits and hyphens,
/// starting with a letter and not ending with a hyphen (a DNS label, so names can appear in
/// hostnames and interface names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub const DESCRIPTION: &'static str =
        "1-63 lowercase letters, digits or '-', starting with a letter, not ending with '-'";
}

impl FromStr for Name {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ValidationError::new("must not be empty"));
        }
        if s.len() > 63 {
            return Err(ValidationError::new(format!("must be at most 63 characters, got {}", s.len())));
        }
        if let Some(bad) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
            return Err(ValidationError::new(format!(
                "invalid character {bad:?} in {s:?}: use lowercase letters, digits and '-'"
            )));
        }
        if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(ValidationError::new(format!("{s:?} must start with a lowercase letter")));
        }
        if s.ends_with('-') {
            return Err(ValidationError::new(format!("{s:?} must not end with '-'")));
        }
        Ok(Self(s.to_owned()))
    }
}

parsed_string!(Name);

/// A DNS hostname per RFC 1123, lowercase, without a trailing dot; optionally a wildcard whose
/// leftmost label is exactly `*` (`*.example.com`), which matches one label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hostname(String);

impl Hostname {
    pub const DESCRIPTION: &'static str =
        "a lowercase RFC 1123 hostname such as app.example.com, or a wildcard *.example.com";

    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// The name a wildcard stands under (`example.com` for `*.example.com`), or for a plain
    /// name, the name its covering wildcard would stand under (`example.com` for
    /// `app.example.com`).
    pub fn parent(&self) -> &str {
        self.0.split_once('.').map(|(_, rest)| rest).unwrap_or("")
    }

    /// The wildcard that would cover this name (`*.example.com` for `app.example.com`), if
    /// that wildcard would itself be valid.
    pub fn covering_wildcard(&self) -> Option<Hostname> {
        if self.is_wildcard() {
            return None;
        }
        format!("*.{}", self.parent()).parse().ok()
    }

    /// Whether this name (exact or wildcard) matches the concrete name `name`.
    pub fn matches(&self, name: &str) -> bool {
        if self.is_wildcard() {
            match name.split_once('.') {
                Some((label, rest)) => !label.is_empty() && rest == self.parent(),
                None => false,
            }
        } else {
            self.0 == name
        }
    }
}

impl FromStr for Hostname {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ValidationError::new("hostname must not be empty"));
        }
        if s.len() > 253 {
            return Err(ValidationError::new(format!("hostname must be at most 253 characters, got {}", s.len())));
        }
        if s.ends_with('.') {
            return Err(ValidationError::new(format!("hostname {s:?} must not end with '.'")));
        }
        if s.parse::<std::net::IpAddr>().is_ok() {
            return Err(ValidationError::new(format!("{s:?} is an IP address, not a hostname")));
        }
        let labels: Vec<&str> = s.split('.').collect();
        if labels.len() < 2 {
            return Err(ValidationError::new(format!(
                "hostname {s:?} must have at least two labels (like app.example.com)"
            )));
        }
        for (index, label) in labels.iter().enumerate() {
            if *label == "*" {
                if index != 0 {
                    return Err(ValidationError::new(format!(
                        "hostname {s:?}: '*' is only allowed as the whole leftmost label"
                    )));
                }
                if labels.len() < 3 {
                    return Err(ValidationError::new(format!(
                        "wildcard {s:?} must stand under a name of at least two labels (like *.example.com)"
                    )));
                }
                continue;
            }
            check_label(s, label)?;
        }
        let top = labels[labels.len() - 1];
        if top.chars().all(|c| c.is_ascii_digit()) {
            return Err(ValidationError::new(format!("hostname {s:?}: the top-level label must not be all digits")));
        }
        Ok(Self(s.to_owned()))
    }
}

fn check_label(hostname: &str, label: &str) -> Result<(), ValidationError> {
    if label.is_empty() {
        return Err(ValidationError::new(format!("hostname {hostname:?} has an empty label")));
    }
    if label.len() > 63 {
        return Err(ValidationError::new(format!(
            "hostname {hostname:?}: label {label:?} is longer than 63 characters"
        )));
    }
    if let Some(bad) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
        return Err(ValidationError::new(format!("hostname {hostname:?}: invalid character {bad:?}")));
    }
    if label.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(ValidationError::new(format!("hostname {hostname:?} must be lowercase")));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(ValidationError::new(format!(
            "hostname {hostname:?}: label {label:?} must not start or end with '-'"
        )));
    }
    Ok(())
}

parsed_string!(Hostname);

/// Where an edge receives WireGuard: `host:port`, the host an IPv4 address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeEndpoint(String);

impl EdgeEndpoint {
    pub const DESCRIPTION: &'static str = "host:port, the host an IPv4 address or a DNS name, e.g. 203.0.113.1:51820";

    /// The host part (an address or a name to resolve).
    pub fn host(&self) -> &str {
        self.0.rsplit_once(':').map(|(host, _)| host).unwrap_or(&self.0)
    }

    /// The UDP port.
    pub fn port(&self) -> u16 {
        self.0.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or(0)
    }
}

impl FromStr for EdgeEndpoint {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(ValidationError::new(format!("{s:?} must be host:port, e.g. 203.0.113.1:51820")));
        };
        match port.parse::<u16>() {
            Ok(port) if port != 0 => {}
            _ => return Err(ValidationError::new(format!("{s:?}: the port must be a number from 1 to 65535"))),
        }
        if host.parse::<std::net::Ipv4Addr>().is_err() {
            check_dns_name(s, host)?;
        }
        Ok(Self(s.to_owned()))
    }
}

/// A DNS name to resolve (not a wildcard; a single label such as `localhost` is allowed).
fn check_dns_name(whole: &str, host: &str) -> Result<(), ValidationError> {
    if host.is_empty() || host.len() > 253 {
        return Err(ValidationError::new(format!("{whole:?}: the host must be an IPv4 address or a DNS name")));
    }
    for label in host.split('.') {
        check_label(host, label).map_err(|e| ValidationError::new(format!("{whole:?}: {}", e.message)))?;
    }
    Ok(())
}

parsed_string!(EdgeEndpoint);

/// The IPv4 network a device pool addresses its tunnels from, in canonical form (no host bits
/// set), between /8 and /30 so that it holds at least two addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelCidr(Ipv4Net);

impl TunnelCidr {
    pub const DESCRIPTION: &'static str = "an IPv4 network in CIDR notation, /8 to /30, such as 100.96.0.0/16";

    pub fn net(&self) -> Ipv4Net {
        self.0
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        self.0.contains(&address)
    }

    /// Addresses that may be handed out: every address but the network and broadcast ones.
    pub fn assignable(&self) -> impl Iterator<Item = Ipv4Addr> {
        self.0.hosts()
    }

    /// How many addresses [`Self::assignable`] yields.
    pub fn capacity(&self) -> u64 {
        (1u64 << (32 - self.0.prefix_len())) - 2
    }
}

impl FromStr for TunnelCidr {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            return Err(ValidationError::new(format!("{s:?}: tunnel networks must be IPv4")));
        }
        let net: Ipv4Net = s.parse().map_err(|_| {
            ValidationError::new(format!("{s:?} is not an IPv4 network in CIDR notation (like 100.96.0.0/16)"))
        })?;
        if net.prefix_len() < 8 || net.prefix_len() > 30 {
            return Err(ValidationError::new(format!(
                "{s:?}: the prefix length must be between /8 and /30, got /{}",
                net.prefix_len()
            )));
        }
        if net.addr() != net.network() {
            return Err(ValidationError::new(format!(
                "{s:?} has host bits set; did you mean {}/{}?",
                net.network(),
                net.prefix_len()
            )));
        }
        Ok(Self(net))
    }
}

impl fmt::Display for TunnelCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for TunnelCidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TunnelCidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(|e: ValidationError| serde::de::Error::custom(e.message))
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for TunnelCidr {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(Self::DESCRIPTION))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for TunnelCidr {}

/// The name of an environment variable: a letter or '_' followed by letters, digits or '_'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvName(String);

impl EnvName {
    pub const DESCRIPTION: &'static str = "an environment variable name: [A-Za-z_][A-Za-z0-9_]*";
}

impl FromStr for EnvName {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut chars = s.chars();
        match chars.next() {
            None => return Err(ValidationError::new("environment variable name must not be empty")),
            Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
                return Err(ValidationError::new(format!(
                    "environment variable name {s:?} must start with a letter or '_'"
                )));
            }
            Some(_) => {}
        }
        if chars.any(|c| !(c.is_ascii_alphanumeric() || c == '_')) {
            return Err(ValidationError::new(format!(
                "environment variable name {s:?} may only hold letters, digits and '_'"
            )));
        }
        Ok(Self(s.to_owned()))
    }
}

parsed_string!(EnvName);

/// A label key: 1 to 63 characters of letters, digits, '-', '_', '.' and '/'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelKey(String);

impl LabelKey {
    pub const DESCRIPTION: &'static str = "1-63 letters, digits, '-', '_', '.' or '/'";
}

impl FromStr for LabelKey {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 63 {
            return Err(ValidationError::new(format!("label key {s:?} must be 1 to 63 characters")));
        }
        if let Some(bad) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))) {
            return Err(ValidationError::new(format!("label key {s:?}: invalid character {bad:?}")));
        }
        Ok(Self(s.to_owned()))
    }
}

parsed_string!(LabelKey);

/// An absolute filesystem path inside a workload (a working directory or a volume mount).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AbsolutePath(String);

impl AbsolutePath {
    pub const DESCRIPTION: &'static str = "an absolute path such as /var/lib/app";
}

impl FromStr for AbsolutePath {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with('/') {
            return Err(ValidationError::new(format!("{s:?} must be an absolute path")));
        }
        if s.contains('\0') {
            return Err(ValidationError::new("path must not contain NUL"));
        }
        if s.split('/').any(|part| part == "..") {
            return Err(ValidationError::new(format!("{s:?} must not contain '..'")));
        }
        Ok(Self(s.to_owned()))
    }
}

parsed_string!(AbsolutePath);

/// An HTTP request path for health checks: starts with '/', printable ASCII only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpPath(String);

impl HttpPath {
    pub const DESCRIPTION: &'static str = "an HTTP path starting with '/'";
}

impl FromStr for HttpPath {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with('/') {
            return Err(ValidationError::new(format!("{s:?} must start with '/'")));
        }
        if s.len() > 2048 || s.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(ValidationError::new(format!(
                "{s:?} must be at most 2048 printable ASCII characters without spaces"
            )));
        }
        Ok(Self(s.to_owned()))
    }
}

parsed_string!(HttpPath);

/// A region of operator cloud hosts (`eu-west`, `us-east-1`): same rules as [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region(String);

impl Region {
    pub const DESCRIPTION: &'static str = "a region name such as eu-west-1";
}

impl FromStr for Region {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::from_str(s).map(|name| Self(name.0))
    }
}

parsed_string!(Region);

/// A non-empty, single-line text field of at most `max` bytes.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::at(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(ValidationError::at(field, format!("must be at most {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::at(field, "must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_accept_rfc1123_names() {
        for good in [
            "app.example.com",
            "a.b",
            "x1.example.test",
            "my-app.example.test",
            "1app.example.com",
            "xn--bcher-kva.example",
            "*.example.com",
            "*.apps.example.com",
            &format!("{}.example.com", "a".repeat(63)),
        ] {
            assert!(good.parse::<Hostname>().is_ok(), "{good} should parse");
        }
    }

    #[test]
    fn hostnames_refuse_what_rfc1123_refuses() {
        for (bad, why) in [
            ("", "empty"),
            ("localhost", "at least two labels"),
            ("app.example.com.", "must not end with '.'"),
            ("App.example.com", "lowercase"),
            ("-app.example.com", "must not start or end"),
            ("app-.example.com", "must not start or end"),
            ("app..example.com", "empty label"),
            ("app_1.example.com", "invalid character '_'"),
            ("app example.com", "invalid character ' '"),
            ("192.0.2.1", "IP address"),
            ("2001:db8::1", "IP address"),
            ("app.example.123", "all digits"),
            ("*.com", "at least two labels"),
            ("a.*.example.com", "leftmost label"),
            ("*app.example.com", "invalid character '*'"),
            ("**.example.com", "invalid character '*'"),
        ] {
            let error = bad.parse::<Hostname>().expect_err(bad);
            assert!(error.message.contains(why), "{bad}: {} should mention {why}", error.message);
        }
        let long_label = format!("{}.example.com", "a".repeat(64));
        assert!(long_label.parse::<Hostname>().unwrap_err().message.contains("longer than 63"));
        let long_name = format!("{}.com", ["abcdefghi"; 26].join("."));
        assert!(long_name.len() > 253);
        assert!(long_name.parse::<Hostname>().unwrap_err().message.contains("253"));
    }

    #[test]
    fn wildcards_match_exactly_one_label() {
        let wildcard: Hostname = "*.example.com".parse().unwrap();
        assert!(wildcard.is_wildcard());
        assert_eq!(wildcard.parent(), "example.com");
        assert!(wildcard.matches("app.example.com"));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches("a.b.example.com"));
        assert!(!wildcard.matches(".example.com"));
        let exact: Hostname = "app.example.com".parse().unwrap();
        assert!(exact.matches("app.example.com"));
        assert!(!exact.matches("other.example.com"));
        assert_eq!(exact.covering_wildcard().unwrap().as_str(), "*.example.com");
        assert_eq!("example.com".parse::<Hostname>().unwrap().covering_wildcard(), None);
    }

    #[test]
    fn tunnel_cidrs_are_canonical_ipv4_networks() {
        let cidr: TunnelCidr = "100.96.0.0/16".parse().unwrap();
        assert_eq!(cidr.capacity(), 65534);
        assert_eq!(cidr.assignable().next(), Some(Ipv4Addr::new(100, 96, 0, 1)));
        assert_eq!(cidr.assignable().last(), Some(Ipv4Addr::new(100, 96, 255, 254)));
        let smallest: TunnelCidr = "100.64.0.0/30".parse().unwrap();
        assert_eq!(smallest.assignable().count(), 2);
        assert_eq!(smallest.capacity(), 2);
        assert!("10.0.0.0/8".parse::<TunnelCidr>().is_ok());

        for (bad, why) in [
            ("100.96.0.1/16", "did you mean 100.96.0.0/16"),
            ("100.64.0.0/31", "between /8 and /30"),
            ("100.64.0.0/32", "between /8 and /30"),
            ("0.0.0.0/0", "between /8 and /30"),
            ("100.64.0.0/7", "between /8 and /30"),
            ("100.64.0.0", "CIDR notation"),
            ("100.64.0.0/33", "CIDR notation"),
            ("256.0.0.0/8", "CIDR notation"),
            ("fd00::/64", "IPv4"),
            ("", "CIDR notation"),
        ] {
            let error = bad.parse::<TunnelCidr>().expect_err(bad);
            assert!(error.message.contains(why), "{bad}: {} should mention {why}", error.message);
        }
    }

    #[test]
    fn names_are_dns_labels() {
        assert!("web".parse::<Name>().is_ok());
        assert!("web-2".parse::<Name>().is_ok());
        assert!("a".repeat(63).parse::<Name>().is_ok());
        for bad in ["", "Web", "2web", "web-", "web_2", "web.app", &"a".repeat(64)] {
            assert!(bad.parse::<Name>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn other_parsed_strings() {
        assert!("PORT".parse::<EnvName>().is_ok());
        assert!("_x9".parse::<EnvName>().is_ok());
        assert!("9X".parse::<EnvName>().is_err());
        assert!("A-B".parse::<EnvName>().is_err());
        assert!("/data".parse::<AbsolutePath>().is_ok());
        assert!("data".parse::<AbsolutePath>().is_err());
        assert!("/a/../b".parse::<AbsolutePath>().is_err());
        assert!("/healthz?x=1".parse::<HttpPath>().is_ok());
        assert!("healthz".parse::<HttpPath>().is_err());
        assert!("/a b".parse::<HttpPath>().is_err());
        assert!("edgible.io/role".parse::<LabelKey>().is_ok());
        assert!("".parse::<LabelKey>().is_err());
    }

    #[test]
    fn errors_name_their_field() {
        let error = ValidationError::at("port", "must be positive").within("health_check");
        assert_eq!(error.to_string(), "health_check.port: must be positive");
        let error = ValidationError::at("[2]", "bad").within("hostnames");
        assert_eq!(error.field.as_deref(), Some("hostnames[2]"));
    }
}
