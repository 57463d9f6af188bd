//! The one model of the platform shared by the server, the CLI, the Terraform provider, the
//! agent and the stack file format. No IO happens here.
//!
//! Every object is a `spec` (what a user declares, the body of create and update requests) and
//! the metadata the server adds (`id`, `organization_id`, `revision`, timestamps); devices also
//! carry a `status` that only the platform writes. Specs reject unknown fields, and their
//! string-typed fields are parsed types ([`Hostname`], [`TunnelCidr`], [`Name`], ...), so a spec
//! that deserialized is valid field by field; [`Validate`] adds the rules that span fields.

mod ids;
mod validation;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use ids::{
    ApiKeyId, ApplicationId, ApplicationKeyId, DeviceId, DevicePoolId, DomainId, EdgeId, EventId, MemberId,
    MigrationId, OrganizationId, PlacementId, UserId,
};
pub use validation::{
    AbsolutePath, EdgeEndpoint, EnvName, Hostname, HttpPath, LabelKey, Name, Region, TunnelCidr, ValidationError,
    check_text,
};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// A server-wide, strictly increasing number stamped on every write. An object's revision is
/// the revision of the write that last changed it.
pub type Revision = u64;

/// Cross-field rules of a spec that the types alone cannot express.
pub trait Validate {
    fn validate(&self) -> Result<(), ValidationError>;
}

// ---------------------------------------------------------------------------------------------
// Organizations, members and API keys

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OrganizationSpec {
    pub name: Name,
    /// An operator organization runs cloud hosts that other organizations' `cloud`
    /// placements land on. Only a `platform` key may set it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub operator: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Organization {
    pub id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: OrganizationSpec,
}

/// Answer to creating an organization: the organization and its first admin key, whose
/// secret is shown only here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct OrganizationCreated {
    pub organization: Organization,
    pub admin_key: ApiKeyCreated,
}

/// What a member may do in an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

/// A user's membership in an organization. Users are global (one per e-mail address); a
/// membership is what an organization sees of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    pub role: Role,
}

impl Validate for MemberSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        check_email(&self.email).map_err(|e| e.within("email"))?;
        if let Some(display_name) = &self.display_name {
            check_text("display_name", display_name, 200)?;
        }
        Ok(())
    }
}

/// A plausible e-mail address: one '@' with text on both sides, a dot in the domain, no
/// spaces. Deliverability is not checked.
fn check_email(email: &str) -> Result<(), ValidationError> {
    let plausible = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.contains('@') && !domain.starts_with('.')
        });
    if plausible { Ok(()) } else { Err(ValidationError::new(format!("{email:?} is not an e-mail address"))) }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Member {
    pub id: MemberId,
    pub organization_id: OrganizationId,
    pub user_id: UserId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: MemberSpec,
}

/// What an API key may do. `write` implies `read`; `admin` (keys and members) implies both;
/// `platform` may additionally create organizations. `access` stands apart: it lets the key
/// through the `api_key` access policy of the organization's applications and grants nothing
/// on the API, and no other scope grants it (its hash is pushed to devices, so a key able to
/// change the platform never is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Read,
    Write,
    Admin,
    Platform,
    Access,
}

impl Scope {
    /// Whether holding `self` grants `needed`.
    pub fn grants(self, needed: Scope) -> bool {
        if self == Scope::Access || needed == Scope::Access { self == needed } else { self >= needed }
    }
}

/// A password for a member's user, set by an admin (`PUT /v1/members/{id}/password`). Users
/// log in with it on the server's login page; it is stored only as an argon2 hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PasswordSpec {
    /// 10 to 256 characters.
    pub password: String,
}

impl fmt::Debug for PasswordSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordSpec { .. }")
    }
}

impl Validate for PasswordSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        let length = self.password.chars().count();
        if !(10..=256).contains(&length) {
            return Err(ValidationError::at("password", "must be 10 to 256 characters"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    pub name: Name,
    /// What the key may do; at least one scope.
    pub scopes: BTreeSet<Scope>,
    /// When the key stops working; never if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Validate for ApiKeySpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.scopes.is_empty() {
            return Err(ValidationError::at("scopes", "at least one scope is required (read, write, admin)"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub organization_id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The first characters of the secret, to tell keys apart.
    pub prefix: String,
    pub spec: ApiKeySpec,
}

/// Answer to creating an API key: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiKeyCreated {
    pub api_key: ApiKey,
    pub secret: String,
}

// ---------------------------------------------------------------------------------------------
// Device pools and devices

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// Hardware that users own (`serving-device` placements).
    #[default]
    Devices,
    /// Operator-run cloud hosts (`cloud` placements).
    Cloud,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DevicePoolSpec {
    pub name: Name,
    /// The network every tunnel address of the pool is taken from. Cannot be changed.
    pub tunnel_cidr: TunnelCidr,
    /// Cannot be changed.
    #[serde(default)]
    pub kind: PoolKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
}

impl Validate for DevicePoolSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.kind == PoolKind::Cloud && self.region.is_none() {
            return Err(ValidationError::at("region", "a cloud pool needs a region"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DevicePool {
    pub id: DevicePoolId,
    pub organization_id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: DevicePoolSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    pub name: Name,
    /// The pool the device's tunnel address comes from. Cannot be changed.
    pub pool_id: DevicePoolId,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub labels: BTreeMap<LabelKey, String>,
}

impl Validate for DeviceSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        for (key, value) in &self.labels {
            if value.len() > 255 {
                return Err(ValidationError::at(format!("labels.{key}"), "must be at most 255 bytes"));
            }
        }
        Ok(())
    }
}

/// Whether a device's agent is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Created, not enrolled yet.
    #[default]
    Pending,
    Online,
    Offline,
}

/// What the platform knows about a device; never written by users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DeviceStatus {
    /// The device's /32 inside its pool's tunnel network.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub tunnel_address: Ipv4Addr,
    /// The WireGuard public key (base64), once the device enrolled.
    pub public_key: Option<String>,
    pub state: DeviceState,
    /// The revision of desired state the agent last reported as applied.
    pub applied_revision: Option<Revision>,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// What the device offers as a cloud host (`edgible-agent run --cloud-host`), as its agent
    /// last declared; absent for devices that are not cloud hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_host: Option<HostCapacity>,
}

/// The capacity a cloud host offers to applications' microVMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostCapacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

impl HostCapacity {
    /// What an application placed in the cloud takes of a host: its `resources` (1 vCPU and
    /// 256 MiB if it names none) and the sum of its volumes.
    pub fn required_by(spec: &ApplicationSpec) -> Self {
        let resources = spec.resources.as_ref();
        Self {
            vcpus: resources.map_or(1, |r| r.vcpus),
            memory_mib: resources.map_or(256, |r| u64::from(r.memory_mib)),
            disk_mib: spec.storage.iter().map(|volume| volume.size_mib).sum(),
        }
    }
}

impl Validate for HostCapacity {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.vcpus == 0 {
            return Err(ValidationError::at("vcpus", "must be at least 1"));
        }
        if self.memory_mib < 64 {
            return Err(ValidationError::at("memory_mib", "must be at least 64"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Device {
    pub id: DeviceId,
    pub organization_id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: DeviceSpec,
    pub status: DeviceStatus,
}

/// Answer to creating a device: the one-time token `edgible-agent enroll` exchanges for the
/// device's credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DeviceCreated {
    pub device: Device,
    pub enrollment_token: String,
    pub enrollment_expires_at: DateTime<Utc>,
}

// ---------------------------------------------------------------------------------------------
// Edges

/// An edge: the public entry point of one device pool. It accepts TLS on :443, routes by SNI
/// without decrypting, and forwards over WireGuard to the device that owns the name. Each edge
/// serves exactly one pool, so tunnel networks of different organizations never meet on one
/// edge even when they overlap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    pub name: Name,
    /// The pool this edge serves; its tunnel address comes from the pool's network. Cannot be
    /// changed.
    pub pool_id: DevicePoolId,
    /// Where devices send WireGuard datagrams: `host:port` (an IPv4 address or a DNS name, and
    /// the edge's UDP port), e.g. `203.0.113.1:51820`.
    pub endpoint: EdgeEndpoint,
}

impl Validate for EdgeSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        // Every field is checked as it is parsed.
        Ok(())
    }
}

/// What the platform knows about an edge; never written by users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EdgeStatus {
    /// The edge's address inside its pool's tunnel network.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub tunnel_address: Ipv4Addr,
    /// The WireGuard public key (base64), once the edge enrolled.
    pub public_key: Option<String>,
    /// Online while its hub session is connected (the same states as a device's).
    pub state: DeviceState,
    /// The revision of edge configuration the edge last acknowledged.
    pub applied_revision: Option<Revision>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Edge {
    pub id: EdgeId,
    pub organization_id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: EdgeSpec,
    pub status: EdgeStatus,
}

/// Answer to creating an edge: the one-time token `edgible-edge enroll` exchanges for the
/// edge's credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EdgeCreated {
    pub edge: Edge,
    pub enrollment_token: String,
    pub enrollment_expires_at: DateTime<Utc>,
}

/// The answer to enrolling an edge (`POST /v1/edge/enroll`, body [`EnrollmentRequest`]): the
/// edge and its long-lived credential, shown only here. The edge authenticates its WebSocket
/// to `/v1/edge/connect` with `Authorization: Bearer <credential>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EdgeEnrollment {
    pub edge: Edge,
    /// The network of the edge's pool, for the edge's tunnel interface.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub tunnel_cidr: Ipv4Net,
    pub credential: String,
}

// ---------------------------------------------------------------------------------------------
// Domains

/// The label under which a domain's verification TXT record lives:
/// `_edgible-challenge.<domain>`.
pub const DOMAIN_CHALLENGE_LABEL: &str = "_edgible-challenge";

/// A DNS domain an organization claims. Once verified (its TXT record
/// `_edgible-challenge.<name>` holds the domain's token), the organization may use the domain
/// and every name below it as application hostnames, and no other organization can verify it,
/// a name above it or a name below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    /// The domain, e.g. `example.com` (no wildcard). Cannot be changed.
    pub name: Hostname,
}

impl Validate for DomainSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.name.is_wildcard() {
            return Err(ValidationError::at(
                "name",
                format!("{} is a wildcard; a domain is a plain name such as example.com", self.name),
            ));
        }
        Ok(())
    }
}

/// Whether a domain's ownership has been proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// Created; its TXT record was not found (yet).
    #[default]
    Pending,
    /// Its TXT record held the token; the organization owns the domain.
    Verified,
}

/// What the platform knows about a domain; never written by users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct DomainStatus {
    pub state: DomainState,
    /// The name of the TXT record to create: `_edgible-challenge.<name>`.
    pub txt_record_name: String,
    /// The value the TXT record must hold (not a secret: it is published in DNS).
    pub txt_record_value: String,
    /// When the record was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Domain {
    pub id: DomainId,
    pub organization_id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: DomainSpec,
    pub status: DomainStatus,
}

/// Whether `name` is `domain` itself or a name below it (`a.b.example.com` is below
/// `example.com`; `badexample.com` is not).
pub fn is_at_or_below(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len() && name.ends_with(domain) && name[..name.len() - domain.len()].ends_with('.'))
}

// ---------------------------------------------------------------------------------------------
// Applications

/// What runs. Exactly one variant, written as a single-key object: `{"process": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Workload {
    Process(ProcessWorkload),
    Container(ContainerWorkload),
    Vm(VmWorkload),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ProcessWorkload {
    /// The program to run, a path or a name looked up on the device's PATH.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub env: BTreeMap<EnvName, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<AbsolutePath>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ContainerWorkload {
    /// An image reference such as `registry.example/app:1.2`.
    pub image: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub env: BTreeMap<EnvName, String>,
    /// Container ports to publish on the device's loopback.
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmWorkload {
    /// A kernel image; requires `rootfs`, excludes `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// A root filesystem image; requires `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// A bootable disk image; excludes `kernel` and `rootfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl Validate for Workload {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Workload::Process(process) => {
                check_text("command", &process.command, 4096).map_err(|e| e.within("process"))?;
                check_env(&process.env).map_err(|e| e.within("process.env"))
            }
            Workload::Container(container) => {
                check_text("image", &container.image, 512).map_err(|e| e.within("container"))?;
                if container.image.contains(char::is_whitespace) {
                    return Err(ValidationError::at("container.image", "must not contain spaces"));
                }
                if let Some(index) = container.ports.iter().position(|port| *port == 0) {
                    return Err(ValidationError::at(format!("container.ports[{index}]"), "must be 1-65535"));
                }
                check_env(&container.env).map_err(|e| e.within("container.env"))
            }
            Workload::Vm(vm) => match (&vm.kernel, &vm.rootfs, &vm.image) {
                (Some(_), Some(_), None) | (None, None, Some(_)) => Ok(()),
                (_, _, Some(_)) => {
                    Err(ValidationError::at("vm.image", "give either `image` or `kernel` and `rootfs`, not both"))
                }
                (Some(_), None, None) => Err(ValidationError::at("vm.rootfs", "required with `kernel`")),
                (None, Some(_), None) => Err(ValidationError::at("vm.kernel", "required with `rootfs`")),
                (None, None, None) => Err(ValidationError::at("vm", "give `image`, or `kernel` and `rootfs`")),
            },
        }
    }
}

fn check_env(env: &BTreeMap<EnvName, String>) -> Result<(), ValidationError> {
    for (name, value) in env {
        if value.len() > 32 * 1024 {
            return Err(ValidationError::at(name.as_str(), "must be at most 32 KiB"));
        }
        if value.contains('\0') {
            return Err(ValidationError::at(name.as_str(), "must not contain NUL"));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HealthProtocol {
    Http,
    Tcp,
}

/// How the agent decides that the workload is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub protocol: HealthProtocol,
    /// The path to GET; required for `http`, not allowed for `tcp`. Any 2xx or 3xx passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPath>,
    /// Seconds between checks (1-3600).
    #[serde(default = "HealthCheck::default_interval")]
    pub interval_seconds: u32,
    /// Seconds one check may take (1-300, less than the interval).
    #[serde(default = "HealthCheck::default_timeout")]
    pub timeout_seconds: u32,
    /// Consecutive failures before the application is unhealthy (1-100).
    #[serde(default = "HealthCheck::default_threshold")]
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    fn default_interval() -> u32 {
        10
    }
    fn default_timeout() -> u32 {
        2
    }
    fn default_threshold() -> u32 {
        3
    }
}

impl Validate for HealthCheck {
    fn validate(&self) -> Result<(), ValidationError> {
        match (self.protocol, &self.path) {
            (HealthProtocol::Http, None) => return Err(ValidationError::at("path", "required for http checks")),
            (HealthProtocol::Tcp, Some(_)) => return Err(ValidationError::at("path", "not allowed for tcp checks")),
            _ => {}
        }
        if !(1..=3600).contains(&self.interval_seconds) {
            return Err(ValidationError::at("interval_seconds", "must be 1-3600"));
        }
        if !(1..=300).contains(&self.timeout_seconds) {
            return Err(ValidationError::at("timeout_seconds", "must be 1-300"));
        }
        if self.timeout_seconds >= self.interval_seconds && self.interval_seconds > 1 {
            return Err(ValidationError::at("timeout_seconds", "must be less than interval_seconds"));
        }
        if !(1..=100).contains(&self.unhealthy_threshold) {
            return Err(ValidationError::at("unhealthy_threshold", "must be 1-100"));
        }
        Ok(())
    }
}

/// Who may reach the application. With no policy set the application is public; with several
/// set, a request passing any one of them is let through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// Members of the application's organization, after logging in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<OrganizationAccess>,
    /// Holders of an API key for this application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyAccess>,
    /// Anyone who knows the short code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_code: Option<ShortCodeAccess>,
}

impl AccessPolicy {
    pub fn is_public(&self) -> bool {
        self.organization.is_none() && self.api_key.is_none() && self.short_code.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OrganizationAccess {
    /// Only members with one of these roles; any member if empty.
    #[serde(default)]
    pub roles: BTreeSet<Role>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAccess {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ShortCodeAccess {
    /// The code to ask for (6-64 letters and digits); the server generates one if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Validate for AccessPolicy {
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(ShortCodeAccess { code: Some(code), .. }) = &self.short_code
            && (code.len() < 6 || code.len() > 64 || !code.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(ValidationError::at("short_code.code", "must be 6-64 letters and digits"));
        }
        Ok(())
    }
}

/// A key that lets requests through one application's `api_key` access policy
/// (`/v1/applications/{id}/keys`). Only its SHA-256 hash is stored, and pushed to the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApplicationKeySpec {
    pub name: Name,
    /// When the key stops working; never if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Validate for ApplicationKeySpec {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApplicationKey {
    pub id: ApplicationKeyId,
    pub organization_id: OrganizationId,
    pub application_id: ApplicationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The first characters of the secret, to tell keys apart.
    pub prefix: String,
    pub spec: ApplicationKeySpec,
}

/// Answer to creating an application key: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApplicationKeyCreated {
    pub application_key: ApplicationKey,
    pub secret: String,
}

/// An application's current short code (`GET /v1/applications/{id}/short-code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ShortCode {
    pub application_id: ApplicationId,
    pub code: String,
    /// Grows with every change of the code; sessions made with an older version end.
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether the code comes from the application's spec (`access.short_code.code`) rather
    /// than from the server; only generated codes can be rotated through the API.
    pub set_by_spec: bool,
}

/// A named volume that survives workload restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: Name,
    /// The most the volume may hold, in MiB (1 to 1,048,576).
    pub size_mib: u64,
    /// Where the workload sees the volume.
    pub mount_path: AbsolutePath,
    /// Whether the volume moves with the application when it migrates.
    #[serde(default)]
    pub movable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SleepMode {
    /// Stop the workload; the next request cold-starts it.
    Stop,
    /// Pause (and snapshot) the workload; the next request resumes it.
    Suspend,
}

/// Put the application to sleep when idle and wake it on the next request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SleepPolicy {
    /// Seconds without open connections or requests before sleeping (10 to 604,800).
    pub idle_timeout_seconds: u32,
    pub mode: SleepMode,
    /// Seconds a wake may take before requests get 503 (1 to 600).
    #[serde(default = "SleepPolicy::default_wake_timeout")]
    pub wake_timeout_seconds: u32,
}

impl SleepPolicy {
    fn default_wake_timeout() -> u32 {
        60
    }
}

/// Compute limits for the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs (1-64).
    pub vcpus: u32,
    /// Memory in MiB (16 to 262,144).
    pub memory_mib: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApplicationSpec {
    pub name: Name,
    /// The public names the application answers at; unique across the whole platform.
    pub hostnames: Vec<Hostname>,
    pub workload: Workload,
    /// The port the workload listens on (also given to it as `PORT`).
    pub port: u16,
    /// Environment for the workload, whatever its kind; workload-level `env` wins.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub env: BTreeMap<EnvName, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub access: AccessPolicy,
    #[serde(default)]
    pub storage: Vec<Volume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<SleepPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// What the device's proxy speaks to the workload once it terminated TLS.
    #[serde(default)]
    pub protocol: ApplicationProtocol,
}

/// How an application is exposed behind TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApplicationProtocol {
    /// HTTP/1.1 and HTTP/2: access policies, `X-Forwarded-*`, Host checked against the name.
    #[default]
    Http,
    /// Raw TCP: the decrypted stream is piped to the workload's port as is.
    Tcp,
}

/// The most hostnames one application may have.
pub const MAX_HOSTNAMES: usize = 100;

impl Validate for ApplicationSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.hostnames.is_empty() {
            return Err(ValidationError::at("hostnames", "at least one hostname is required"));
        }
        if self.hostnames.len() > MAX_HOSTNAMES {
            return Err(ValidationError::at("hostnames", format!("at most {MAX_HOSTNAMES} hostnames")));
        }
        let mut seen = BTreeSet::new();
        for (index, hostname) in self.hostnames.iter().enumerate() {
            if !seen.insert(hostname) {
                return Err(ValidationError::at(format!("hostnames[{index}]"), format!("{hostname} is listed twice")));
            }
        }
        if self.port == 0 {
            return Err(ValidationError::at("port", "must be 1-65535"));
        }
        self.workload.validate().map_err(|e| e.within("workload"))?;
        check_env(&self.env).map_err(|e| e.within("env"))?;
        if let Some(health_check) = &self.health_check {
            health_check.validate().map_err(|e| e.within("health_check"))?;
        }
        self.access.validate().map_err(|e| e.within("access"))?;
        if self.protocol == ApplicationProtocol::Tcp && !self.access.is_public() {
            // Policies are checked on HTTP requests; a raw stream has nothing to check them on.
            return Err(ValidationError::at(
                "access",
                "access policies need protocol http; a tcp application is public",
            ));
        }
        let mut volume_names = BTreeSet::new();
        let mut mount_paths = BTreeSet::new();
        for (index, volume) in self.storage.iter().enumerate() {
            let field = format!("storage[{index}]");
            if !volume_names.insert(&volume.name) {
                return Err(ValidationError::at(
                    format!("{field}.name"),
                    format!("volume {} is declared twice", volume.name),
                ));
            }
            if !mount_paths.insert(&volume.mount_path) {
                return Err(ValidationError::at(format!("{field}.mount_path"), "another volume uses this path"));
            }
            if !(1..=1_048_576).contains(&volume.size_mib) {
                return Err(ValidationError::at(format!("{field}.size_mib"), "must be 1 to 1048576"));
            }
        }
        if let Some(sleep) = &self.sleep {
            if !(10..=604_800).contains(&sleep.idle_timeout_seconds) {
                return Err(ValidationError::at("sleep.idle_timeout_seconds", "must be 10 to 604800"));
            }
            if !(1..=600).contains(&sleep.wake_timeout_seconds) {
                return Err(ValidationError::at("sleep.wake_timeout_seconds", "must be 1 to 600"));
            }
        }
        if let Some(resources) = &self.resources {
            if !(1..=64).contains(&resources.vcpus) {
                return Err(ValidationError::at("resources.vcpus", "must be 1-64"));
            }
            if !(16..=262_144).contains(&resources.memory_mib) {
                return Err(ValidationError::at("resources.memory_mib", "must be 16 to 262144"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Application {
    pub id: ApplicationId,
    pub organization_id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: ApplicationSpec,
}

// ---------------------------------------------------------------------------------------------
// Placements

/// Where an application runs. Written with a `strategy` tag:
/// `{"strategy": "serving-device", "application_id": ..., "device_id": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "strategy", rename_all = "kebab-case")]
pub enum PlacementSpec {
    /// On a device the organization owns.
    ServingDevice {
        /// Cannot be changed.
        application_id: ApplicationId,
        device_id: DeviceId,
    },
    /// On an operator cloud host, chosen by the scheduler from a pool or a region.
    Cloud {
        /// Cannot be changed.
        application_id: ApplicationId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool_id: Option<DevicePoolId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<Region>,
    },
}

impl PlacementSpec {
    pub fn application_id(&self) -> ApplicationId {
        match self {
            PlacementSpec::ServingDevice { application_id, .. } | PlacementSpec::Cloud { application_id, .. } => {
                *application_id
            }
        }
    }

    pub fn device_id(&self) -> Option<DeviceId> {
        match self {
            PlacementSpec::ServingDevice { device_id, .. } => Some(*device_id),
            PlacementSpec::Cloud { .. } => None,
        }
    }

    pub fn strategy(&self) -> &'static str {
        match self {
            PlacementSpec::ServingDevice { .. } => "serving-device",
            PlacementSpec::Cloud { .. } => "cloud",
        }
    }
}

/// The flat wire form of [`PlacementSpec`]. Deserializing through it, rather than through
/// serde's internally tagged enum, keeps field paths (serde buffers a tagged enum's body and
/// loses them), so a bad `device_id` is reported as `device_id`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementWire {
    strategy: PlacementStrategy,
    application_id: ApplicationId,
    #[serde(default)]
    device_id: Option<DeviceId>,
    #[serde(default)]
    pool_id: Option<DevicePoolId>,
    #[serde(default)]
    region: Option<Region>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PlacementStrategy {
    ServingDevice,
    Cloud,
}

impl<'de> Deserialize<'de> for PlacementSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let wire = PlacementWire::deserialize(deserializer)?;
        match wire.strategy {
            PlacementStrategy::ServingDevice => {
                if wire.pool_id.is_some() {
                    return Err(D::Error::unknown_field("pool_id", &["application_id", "device_id"]));
                }
                if wire.region.is_some() {
                    return Err(D::Error::unknown_field("region", &["application_id", "device_id"]));
                }
                let device_id = wire.device_id.ok_or_else(|| D::Error::missing_field("device_id"))?;
                Ok(PlacementSpec::ServingDevice { application_id: wire.application_id, device_id })
            }
            PlacementStrategy::Cloud => {
                if wire.device_id.is_some() {
                    return Err(D::Error::unknown_field("device_id", &["application_id", "pool_id", "region"]));
                }
                Ok(PlacementSpec::Cloud {
                    application_id: wire.application_id,
                    pool_id: wire.pool_id,
                    region: wire.region,
                })
            }
        }
    }
}

impl Validate for PlacementSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        if let PlacementSpec::Cloud { pool_id: None, region: None, .. } = self {
            return Err(ValidationError::at("pool_id", "a cloud placement needs `pool_id` or `region`"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Placement {
    pub id: PlacementId,
    pub organization_id: OrganizationId,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub spec: PlacementSpec,
    /// Where the application runs: the device of a `serving-device` placement, or the cloud
    /// host the scheduler chose for a `cloud` one. Written by the platform only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<DeviceId>,
    /// The migration moving the application right now, if one is. While it runs, `spec`
    /// already names the destination and `host` still names the device serving traffic; a
    /// failed migration puts `spec` back to where the application stayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<MigrationId>,
}

// ---------------------------------------------------------------------------------------------
// Migrations (DESIGN.md section 9)

/// The body of `POST /v1/applications/{id}/migrations`: where the application should run.
/// `to.application_id` must be the application of the path. Changing a placement's device or
/// strategy with `PUT /v1/placements/{id}` starts the same migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    pub to: PlacementSpec,
}

impl Validate for MigrationRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        self.to.validate().map_err(|e| e.within("to"))
    }
}

/// The steps of a migration, in order, then its two ends. A stateless application (no
/// volumes) skips `quiesce`, `snapshot` and `ship`: its target starts first and traffic moves
/// with no downtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The target checks it can run the application (driver, image, disk).
    Preflight,
    /// The source refuses new requests, drains in-flight ones and stops the workload.
    Quiesce,
    /// The source archives its movable volumes into checksummed chunks.
    Snapshot,
    /// The source uploads the chunks to the server's blob store.
    Ship,
    /// The target downloads and verifies the chunks, unpacks them, starts the workload and
    /// passes its health check.
    Restore,
    /// The edges route to the target; the source drains and lets go of the application.
    Cutover,
    /// Done: the application runs on the target. The source deletes its copy after the
    /// retention period.
    Completed,
    /// Something failed before cutover: the target was cleaned up and the source resumed.
    Failed,
}

impl MigrationPhase {
    /// The phase's name, as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Preflight => "preflight",
            MigrationPhase::Quiesce => "quiesce",
            MigrationPhase::Snapshot => "snapshot",
            MigrationPhase::Ship => "ship",
            MigrationPhase::Restore => "restore",
            MigrationPhase::Cutover => "cutover",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
        }
    }

    /// Whether the migration has ended, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, MigrationPhase::Completed | MigrationPhase::Failed)
    }
}

/// When a migration entered one of its phases and, once it moved on, when it left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MigrationPhaseRecord {
    pub phase: MigrationPhase,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// One move of one application, as `GET /v1/migrations/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Migration {
    pub id: MigrationId,
    pub organization_id: OrganizationId,
    pub application_id: ApplicationId,
    pub placement_id: PlacementId,
    /// The device the application ran on when the migration started.
    pub source: DeviceId,
    /// The device it moves to (for a `cloud` destination, the host the scheduler chose).
    pub target: DeviceId,
    /// The placement the migration was asked for.
    pub to: PlacementSpec,
    /// Whether the application has volumes, and so goes through quiesce, snapshot and ship.
    pub stateful: bool,
    pub phase: MigrationPhase,
    /// Every phase entered so far, oldest first.
    pub phases: Vec<MigrationPhaseRecord>,
    /// Why it failed, naming the phase; set with `phase: failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The phase it failed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_phase: Option<MigrationPhase>,
    /// Whether the source has confirmed it serves the application again after a failure
    /// (false while the source is offline; it resumes as soon as it returns).
    #[serde(default)]
    pub rolled_back: bool,
    /// Size of the snapshot archive, once made.
    #[serde(default)]
    pub bytes_total: u64,
    /// How much of it has reached the blob store.
    #[serde(default)]
    pub bytes_shipped: u64,
    /// For a stateful migration that completed: from the start of quiesce (the source stops
    /// serving) to cutover (the edges route to the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

// ---------------------------------------------------------------------------------------------
// Agents: enrollment, and what they report about applications

/// The body of `POST /v1/agent/enroll`: a device's one-time enrollment token and the
/// WireGuard public key the agent generated (the private key never leaves the device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRequest {
    pub token: String,
    /// Standard base64 of the 32-byte WireGuard public key.
    pub public_key: String,
}

impl Validate for EnrollmentRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.token.is_empty() || self.token.len() > 256 {
            return Err(ValidationError::at("token", "must be the enrollment token of a device"));
        }
        check_wireguard_key(&self.public_key).map_err(|e| e.within("public_key"))
    }
}

/// Checks that `key` is a WireGuard key: the canonical standard base64 of 32 bytes, which is
/// 43 characters of the alphabet and one `=`, the last character carrying no stray bits.
pub fn check_wireguard_key(key: &str) -> Result<(), ValidationError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let invalid = || ValidationError::new("must be a WireGuard key: the base64 of 32 bytes (44 characters)");
    let bytes = key.as_bytes();
    if bytes.len() != 44 || bytes[43] != b'=' {
        return Err(invalid());
    }
    let mut last = 0;
    for byte in &bytes[..43] {
        last = ALPHABET.iter().position(|candidate| candidate == byte).ok_or_else(invalid)?;
    }
    // 43 characters hold 258 bits; the last two belong to no byte and must be zero.
    if last & 0b11 != 0 {
        return Err(invalid());
    }
    Ok(())
}

/// The answer to enrolling: the device and its long-lived credential, shown only here. The
/// agent authenticates its WebSocket with `Authorization: Bearer <credential>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Enrollment {
    pub device: Device,
    pub credential: String,
}

/// Where an application is in its life on its device, as its agent last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ApplicationPhase {
    /// Not reported yet, or waiting to start.
    Pending,
    Starting,
    Running,
    Unhealthy,
    Stopped,
    Failed,
    /// Asleep after its idle timeout (`sleep` policy); the next request wakes it.
    Sleeping,
    /// Being woken by a request.
    Waking,
}

/// The status of an application: `GET /v1/applications/{id}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApplicationStatus {
    pub application_id: ApplicationId,
    /// The application's current revision; `revision` below catches up with it once the
    /// device runs this version.
    pub application_revision: Revision,
    /// The device the application is placed on, if any.
    pub device_id: Option<DeviceId>,
    pub phase: ApplicationPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The application revision the device reported this status for; absent until it did.
    pub revision: Option<Revision>,
    pub reported_at: Option<DateTime<Utc>>,
    /// When the certificate the server last issued for the application expires; absent until
    /// one was issued. The device keeps serving it while a renewal fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expires_at: Option<DateTime<Utc>>,
    /// The application's certificate: `valid`, `pending` (an ACME order is running) or
    /// `failed: <reason>`; absent until the device asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_status: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// Usage of one application in one hour (`GET /v1/usage`), summed over what its devices
/// reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UsageHour {
    pub application_id: ApplicationId,
    /// The start of the hour (UTC, on the hour).
    pub hour: DateTime<Utc>,
    /// Milliseconds the workload was awake (running, not asleep).
    pub awake_ms: u64,
    pub requests: u64,
    /// Bytes from clients to the workload and back, as the device's proxy counted them.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub wakes: u64,
}

/// The answer of `GET /v1/usage?from=..&to=..[&organization_id=..]`: an organization's usage
/// per application and hour, oldest first, with the totals over the period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct UsageReport {
    pub organization_id: OrganizationId,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub hours: Vec<UsageHour>,
}

/// One output line of an application's workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LogEntry {
    /// When the agent read the line.
    pub at: DateTime<Utc>,
    pub device_id: DeviceId,
    pub stream: LogStream,
    pub line: String,
}

/// Recent output of an application: `GET /v1/applications/{id}/logs`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApplicationLogs {
    pub application_id: ApplicationId,
    pub lines: Vec<LogEntry>,
    /// Lines lost before they reached the server (dropped by a full buffer on the device or
    /// pushed out of the server's window).
    pub dropped: u64,
}

/// A lifecycle event an agent reported: `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Event {
    pub id: EventId,
    pub organization_id: OrganizationId,
    pub device_id: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_id: Option<ApplicationId>,
    /// When it happened, by the device's clock.
    pub at: DateTime<Utc>,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Envelopes shared by every endpoint

/// One page of a listing, in creation order. Pass `next_cursor` as `cursor` to get the next;
/// it is absent on the last page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ErrorDetail {
    /// A stable, machine-readable code such as `not_found`, `conflict`, `invalid`.
    pub code: String,
    pub message: String,
    /// The path of the offending field in the request body (`hostnames[1]`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Parses a JSON request body into `T` and runs its cross-field rules, naming the offending
/// field on failure. The server, the CLI and the provider all use this, so they agree.
pub fn parse_json<T>(body: &[u8]) -> Result<T, ValidationError>
where
    T: for<'de> Deserialize<'de> + Validate,
{
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let field = error.path().to_string();
        let message = error.inner().to_string();
        // serde_json appends " at line L column C", which says nothing more than the path.
        let message = match message.rfind(" at line ") {
            Some(cut) => message[..cut].to_owned(),
            None => message,
        };
        let field = name_reported_field(field, &message);
        if field == "." { ValidationError::new(message) } else { ValidationError::at(field, message) }
    })?;
    deserializer.end().map_err(|error| ValidationError::new(error.to_string()))?;
    value.validate()?;
    Ok(value)
}

/// serde reports a missing field (and an unknown one found by hand-written code) at the
/// parent's path; this appends the field's own name, taken from serde's message, unless the
/// path already ends with it.
pub(crate) fn name_reported_field(path: String, message: &str) -> String {
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix).and_then(|rest| rest.split('`').next()));
    match named {
        Some(name) if path == "." || path.is_empty() => name.to_owned(),
        Some(name) if path != name && !path.ends_with(&format!(".{name}")) => format!("{path}.{name}"),
        _ => path,
    }
}

impl Validate for OrganizationSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn app(value: serde_json::Value) -> Result<ApplicationSpec, ValidationError> {
        parse_json(value.to_string().as_bytes())
    }

    fn minimal_app() -> serde_json::Value {
        json!({
            "name": "web",
            "hostnames": ["web.example.test"],
            "workload": {"process": {"command": "/bin/web"}},
            "port": 8080
        })
    }

    #[test]
    fn a_minimal_application_parses_with_defaults() {
        let spec = app(minimal_app()).unwrap();
        assert!(spec.access.is_public());
        assert!(spec.storage.is_empty());
        assert_eq!(
            spec.workload,
            Workload::Process(ProcessWorkload {
                command: "/bin/web".into(),
                args: vec![],
                env: BTreeMap::new(),
                working_dir: None,
            })
        );
    }

    #[test]
    fn errors_name_the_field() {
        let mut body = minimal_app();
        body["hostnames"] = json!(["ok.example.test", "Bad.example.test"]);
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("hostnames[1]"));

        let mut body = minimal_app();
        body["surprise"] = json!(1);
        let error = app(body).unwrap_err();
        assert!(error.message.contains("unknown field `surprise`"), "{error}");
        assert_eq!(error.field.as_deref(), Some("surprise"));

        let mut body = minimal_app();
        body["workload"]["process"].as_object_mut().unwrap().remove("command");
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("workload.process.command"));

        let mut body = minimal_app();
        body["workload"] = json!({"process": {"command": "x", "env": {"9BAD": "v"}}});
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("workload.process.env.9BAD"));

        let mut body = minimal_app();
        body["health_check"] = json!({"protocol": "http"});
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("health_check.path"));

        let mut body = minimal_app();
        body["storage"] = json!([
            {"name": "data", "size_mib": 10, "mount_path": "/data"},
            {"name": "data", "size_mib": 10, "mount_path": "/other"}
        ]);
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("storage[1].name"));

        let mut body = minimal_app();
        body["hostnames"] = json!(["a.example.test", "a.example.test"]);
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("hostnames[1]"));

        let mut body = minimal_app();
        body["workload"] = json!({"vm": {"kernel": "/k"}});
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("workload.vm.rootfs"));

        let mut body = minimal_app();
        body["port"] = json!(70000);
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("port"));
    }

    #[test]
    fn placements_are_tagged_by_strategy() {
        let application_id = ApplicationId::new();
        let device_id = DeviceId::new();
        let body = json!({"strategy": "serving-device", "application_id": application_id, "device_id": device_id});
        let spec: PlacementSpec = parse_json(body.to_string().as_bytes()).unwrap();
        assert_eq!(spec.device_id(), Some(device_id));
        assert_eq!(serde_json::to_value(&spec).unwrap(), body);

        let missing = json!({"strategy": "serving-device", "application_id": application_id});
        let error = parse_json::<PlacementSpec>(missing.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("device_id"), "{error}");

        let extra = json!({"strategy": "serving-device", "application_id": application_id, "device_id": device_id, "region": "x"});
        let error = parse_json::<PlacementSpec>(extra.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("region"), "{error}");

        let bad_id = json!({"strategy": "serving-device", "application_id": application_id, "device_id": "nope"});
        let error = parse_json::<PlacementSpec>(bad_id.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("device_id"), "{error}");

        let cloud = json!({"strategy": "cloud", "application_id": application_id});
        let error = parse_json::<PlacementSpec>(cloud.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("pool_id"));

        let unknown = json!({"strategy": "moon", "application_id": application_id});
        assert!(parse_json::<PlacementSpec>(unknown.to_string().as_bytes()).is_err());
    }

    #[test]
    fn scopes_are_ordered_by_power() {
        assert!(Scope::Admin.grants(Scope::Write));
        assert!(Scope::Write.grants(Scope::Read));
        assert!(!Scope::Read.grants(Scope::Write));
        assert!(!Scope::Admin.grants(Scope::Platform));
    }

    #[test]
    fn wireguard_keys_are_44_characters_of_canonical_base64() {
        assert!(check_wireguard_key("YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=").is_ok());
        assert!(check_wireguard_key(&format!("{}=", "A".repeat(43))).is_ok());
        assert!(check_wireguard_key("YWJj").is_err());
        assert!(check_wireguard_key(&format!("{}=", "B".repeat(43))).is_err(), "stray low bits");
        assert!(check_wireguard_key(&format!("{}=", "-".repeat(43))).is_err(), "URL-safe alphabet");
        assert!(check_wireguard_key(&"A".repeat(44)).is_err());
        let body = json!({"token": "edgenr_x", "public_key": "nope"});
        let error = parse_json::<EnrollmentRequest>(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("public_key"));
    }

    #[test]
    fn domains_cover_themselves_and_names_below_only() {
        assert!(is_at_or_below("example.com", "example.com"));
        assert!(is_at_or_below("a.b.example.com", "example.com"));
        assert!(!is_at_or_below("badexample.com", "example.com"));
        assert!(!is_at_or_below("example.com", "a.example.com"));
        let wildcard = parse_json::<DomainSpec>(br#"{"name": "*.example.com"}"#).unwrap_err();
        assert_eq!(wildcard.field.as_deref(), Some("name"));
        let spec = parse_json::<DomainSpec>(br#"{"name": "example.com"}"#).unwrap();
        assert_eq!(spec.name.as_str(), "example.com");
    }

    #[test]
    fn a_tcp_application_cannot_have_access_policies() {
        let mut body = minimal_app();
        body["protocol"] = json!("tcp");
        assert!(app(body.clone()).is_ok(), "a public tcp application is fine");
        body["access"] = json!({"api_key": {}});
        assert_eq!(app(body).unwrap_err().field.as_deref(), Some("access"));
    }

    #[test]
    fn the_access_scope_grants_and_is_granted_by_nothing_else() {
        assert!(Scope::Access.grants(Scope::Access));
        assert!(!Scope::Access.grants(Scope::Read));
        assert!(!Scope::Platform.grants(Scope::Access));
        assert!(Scope::Admin.grants(Scope::Write));
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let body = format!("{} {{}}", minimal_app());
        assert!(parse_json::<ApplicationSpec>(body.as_bytes()).is_err());
    }
}
