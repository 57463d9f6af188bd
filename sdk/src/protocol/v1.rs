//! Version 1 of the push protocol. Frozen once shipped: change it only by adding optional
//! fields; anything else is a new version.
//!
//! A session goes: the agent sends `hello`; the server answers `welcome` and a full
//! `application_update` snapshot; then the server pushes `application_update` deltas whenever
//! what the device should run changes, and pings; the agent acknowledges each revision it
//! applied with `ack`, answers pings with `pong`, and reports `status`, `event` and `logs`.
//! Either side answers a frame it cannot handle with an `error` frame; the server closes the
//! socket after an error only when the session cannot go on (a bad `hello`).
//!
//! Data path: after `welcome` the server sends `edges` (the pool's edges, the device's
//! WireGuard peers) and again whenever that set changes. For each application placed on it the
//! agent generates a key and sends a `certificate_request`; the server answers `certificate`
//! (or an `error` naming the application).
//!
//! Access policies: after `welcome` the server sends `access` (where its login page is, the
//! keys assertions are signed with, and per application the digests of accepted API keys and
//! of the short code), always whole, and again whenever any of it changes (a key created or
//! revoked, a code rotated, a signing key rotated). Which policies an application has is in
//! its spec (`access`), which comes with `application_update`.
//!
//! Edges speak their own session on `/v1/edge/connect`: [`EdgeMessage`] up, [`EdgeServerMessage`]
//! down. The edge sends `edge_hello`; the server answers `edge_welcome` and a full `edge_config`
//! (its peers, routes and ACME HTTP-01 challenges), sends a new full `edge_config` whenever it
//! changes, and pings; the edge acknowledges each configuration it applied with `ack`. Under an
//! ACME issuer the server tells the CA a challenge is ready only once the edges acknowledged a
//! configuration carrying it, and answers a `certificate_request` with `certificate` only
//! once the CA issued (nothing in between; the agent asks again after a while if need be).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::access::AssertionKey;

use crate::model::{Application, ApplicationId, DeviceId, EdgeId, HostCapacity, Hostname, MigrationId, Name, Revision};

/// What an agent sends the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The first frame of a session.
    Hello {
        /// The device the credential belongs to; the server refuses a mismatch.
        device_id: DeviceId,
        /// The device's WireGuard public key (base64), as enrolled.
        public_key: String,
        /// The revision of desired state last applied, if any.
        applied_revision: Option<Revision>,
        /// What this agent can run (`process`, `container`, `vm`).
        #[serde(default)]
        capabilities: Vec<String>,
        agent_version: String,
        /// Present when the agent runs as a cloud host (`--cloud-host`): the capacity it offers.
        /// The server refuses it unless the device is in a `cloud` pool of an operator
        /// organization.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cloud_host: Option<HostCapacity>,
    },
    /// The agent applied desired state at this revision. Acks of revisions older than one
    /// already acknowledged are ignored.
    Ack { revision: Revision },
    /// Per-application status, for applications placed on this device.
    Status { applications: Vec<ApplicationStatus> },
    /// A lifecycle event (started, exited, restarted, adopted, stopped, ...).
    Event { application_id: Option<ApplicationId>, at: DateTime<Utc>, message: String },
    /// Recent output lines of one application, oldest first.
    Logs {
        application_id: ApplicationId,
        lines: Vec<LogLine>,
        /// Lines the agent dropped (its buffer was full) since its previous `logs` frame.
        #[serde(default)]
        dropped: u64,
    },
    /// The answer to a `ping`, with its nonce.
    Pong { nonce: u64 },
    /// Usage counted since the previous records, per application. The agent keeps records
    /// (on disk) until a `usage_ack` covers their `seq`, and sends them again in a new session;
    /// the server stores each `(device, seq)` once, so nothing is counted twice.
    Usage { records: Vec<UsageRecord> },
    /// Asks the server to sign a certificate for an application placed on this device. The
    /// agent generated the key, which never leaves the device.
    CertificateRequest {
        application_id: ApplicationId,
        /// A PEM `CERTIFICATE REQUEST` whose subject alternative names are all among the
        /// application's hostnames.
        csr_pem: String,
    },
    /// How a migration step ended (see [`MigrationStep`]). Sent once per `step_id`, and sent
    /// again if the server repeats a step that already ended.
    MigrationStepResult { migration_id: MigrationId, step_id: u64, outcome: StepOutcome },
    /// Progress of a long step (`snapshot`, `ship`, `restore`): bytes done of the archive's
    /// total. At most a few per second.
    MigrationProgress { migration_id: MigrationId, step_id: u64, bytes_done: u64, bytes_total: u64 },
    /// The agent could not handle a frame the server sent. Never answered with another
    /// `error`, so that two peers cannot bounce errors back and forth.
    Error {
        #[serde(default)]
        code: ErrorCode,
        message: String,
    },
}

/// What the server sends an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        device_id: DeviceId,
        tunnel_address: Ipv4Addr,
        server_version: String,
        /// How often the server pings. An agent that hears nothing from the server for a few
        /// of these periods may consider the connection dead and reconnect.
        #[serde(default)]
        ping_interval_seconds: Option<u64>,
        /// The pool's tunnel network, which the device routes through its tunnel interface.
        #[serde(default)]
        tunnel_cidr: Option<Ipv4Net>,
    },
    /// The edges of the device's pool: its WireGuard peers and the only addresses its proxy
    /// accepts connections from. Always the whole set.
    Edges { edges: Vec<EdgePeer> },
    /// A certificate signed for an application, answering a `certificate_request`.
    Certificate {
        application_id: ApplicationId,
        /// The leaf certificate first, then the chain up to (not including) the root, in PEM.
        chain_pem: String,
        /// The names the certificate is valid for: the application's hostnames.
        hostnames: Vec<Hostname>,
        not_after: DateTime<Utc>,
    },
    /// What the device's proxy needs to enforce access policies. Always the whole set.
    Access {
        /// The base URL of the server's login pages (`<login_url>/login`, `<login_url>/logout`).
        login_url: String,
        /// The keys login assertions may be signed with, the current one first.
        assertion_keys: Vec<AssertionKey>,
        /// How long a login session on the device lasts before the visitor is sent through
        /// the server again (which checks the membership anew).
        session_ttl_seconds: u64,
        /// Secrets of the applications placed on the device that have any.
        applications: Vec<ApplicationAccess>,
    },
    /// Desired state. `full` snapshots replace everything the agent has; deltas upsert
    /// `applications` and remove `removed`. Revisions only grow within and across sessions.
    ApplicationUpdate {
        revision: Revision,
        full: bool,
        applications: Vec<Application>,
        #[serde(default)]
        removed: Vec<ApplicationId>,
    },
    /// Answer with a `pong` carrying the same nonce, or the server closes the session.
    Ping { nonce: u64 },
    /// A step of a migration for this device to execute (DESIGN.md section 9). `step_id` is
    /// unique per step: the server repeats a step with the same id after a reconnect and the
    /// agent must not run it twice (it answers again when it has already ended). The step must
    /// end by `deadline`, after which the server treats it as failed.
    MigrationStep { migration_id: MigrationId, step_id: u64, deadline: DateTime<Utc>, step: MigrationStep },
    /// Every usage record with a `seq` up to this one is settled: stored, or refused for good
    /// (each refusal was named in an `error` frame). The agent drops them all. The `seq` itself
    /// is always one of a stored record, so a refused record alone is never acknowledged.
    UsageAck { seq: u64 },
    /// The server could not handle a frame the agent sent, or is ending the session.
    Error {
        #[serde(default)]
        code: ErrorCode,
        message: String,
    },
}

/// The secrets an application's access policies are checked against, as digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationAccess {
    pub application_id: ApplicationId,
    /// Keys accepted by the `api_key` policy: the application's own keys and the
    /// organization's API keys with the `access` scope. Empty without that policy.
    #[serde(default)]
    pub api_keys: Vec<AccessKeyDigest>,
    /// The `short_code` policy's code; absent without that policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_code: Option<ShortCodeDigest>,
}

/// An accepted API key: [`crate::access::sha256_hex`] of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyDigest {
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A short code: [`crate::access::short_code_digest`] of it, and its version, which grows
/// with every change; a device ends sessions made with an older version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShortCodeDigest {
    pub sha256: String,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// What one application used over `[start, end)`, as the device counted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Grows by one with every record the device makes (across restarts).
    pub seq: u64,
    pub application_id: ApplicationId,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub awake_ms: u64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub wakes: u64,
}

/// One edge, as a device's WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgePeer {
    pub edge_id: EdgeId,
    /// The edge's WireGuard public key (base64).
    pub public_key: String,
    /// `host:port` of the edge's WireGuard socket, resolved by the agent.
    pub endpoint: String,
    /// The edge's address inside the tunnel, from which it opens connections to the device.
    pub tunnel_address: Ipv4Addr,
}

/// What an edge sends the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeMessage {
    /// The first frame of a session.
    EdgeHello {
        /// The edge the credential belongs to; the server refuses a mismatch.
        edge_id: EdgeId,
        /// The edge's WireGuard public key (base64), as enrolled.
        public_key: String,
        /// The configuration revision last applied, if any.
        applied_revision: Option<Revision>,
        edge_version: String,
    },
    /// The edge applied the configuration at this revision.
    Ack {
        revision: Revision,
    },
    Pong {
        nonce: u64,
    },
    Error {
        #[serde(default)]
        code: ErrorCode,
        message: String,
    },
}

/// What the server sends an edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeServerMessage {
    EdgeWelcome {
        edge_id: EdgeId,
        tunnel_address: Ipv4Addr,
        /// The pool's tunnel network, routed through the edge's tunnel interface.
        tunnel_cidr: Ipv4Net,
        server_version: String,
        #[serde(default)]
        ping_interval_seconds: Option<u64>,
    },
    /// The edge's whole configuration; replaces the previous one. Revisions only grow.
    EdgeConfig {
        revision: Revision,
        /// One per enrolled device of the pool; allowed IPs are exactly the device's /32.
        peers: Vec<DevicePeer>,
        routes: Vec<EdgeRoute>,
        /// The ACME HTTP-01 challenges the edge answers on its port 80, all of them (an empty
        /// list clears them). Added after v1 shipped: older servers send none.
        #[serde(default)]
        challenges: Vec<AcmeChallenge>,
    },
    Ping {
        nonce: u64,
    },
    Error {
        #[serde(default)]
        code: ErrorCode,
        message: String,
    },
}

/// One device, as an edge's WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePeer {
    pub device_id: DeviceId,
    pub public_key: String,
    pub tunnel_address: Ipv4Addr,
}

/// One hostname the edge serves, and the device it goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRoute {
    /// Exact (`app.example.test`) or wildcard (`*.example.test`).
    pub hostname: Hostname,
    pub device_id: DeviceId,
    /// The device's tunnel address; the edge connects to port 443 there.
    pub tunnel_address: Ipv4Addr,
    /// Whether the device's agent is connected. Connections to an offline device are refused
    /// at the edge with a TLS alert instead of waiting for a timeout.
    pub online: bool,
}

/// One ACME HTTP-01 challenge an edge answers: the CA fetches
/// `http://{hostname}/.well-known/acme-challenge/{token}` and expects `key_authorization`
/// (`TOKEN.THUMBPRINT`, RFC 8555 section 8.1) as the body. Public by design: it proves control
/// of the name to the CA and holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AcmeChallenge {
    /// An exact hostname; HTTP-01 cannot validate wildcards.
    pub hostname: Hostname,
    pub token: String,
    pub key_authorization: String,
}

/// Why an `error` frame was sent, for programs; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not JSON, not an object, or a message with wrong fields.
    Malformed,
    /// The frame's `type` is not a message of this protocol version.
    UnknownType,
    /// The frame is larger than [`crate::protocol::MAX_FRAME_BYTES`].
    TooLarge,
    /// The frame's `v` is missing or not a version this side speaks.
    UnsupportedVersion,
    /// A well-formed message that is not acceptable now (a second `hello`, an `ack` of a
    /// revision never sent, a `hello` naming another device).
    Unexpected,
    /// Another session of the same device connected; this one is closed.
    Replaced,
    /// The peer did not answer pings in time; the session is closed.
    Timeout,
    /// The server failed; the agent should reconnect later.
    Internal,
    /// A code this build does not know (sent by a newer peer).
    #[default]
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The code as it is written in frames, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    Starting,
    Running,
    Unhealthy,
    Stopped,
    Failed,
    Sleeping,
    Waking,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplicationStatus {
    pub application_id: ApplicationId,
    /// The revision of the application (its `revision`) this status describes.
    pub revision: Revision,
    pub phase: Phase,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub at: DateTime<Utc>,
    pub stream: Stream,
    pub line: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DecodeError, decode, encode};

    #[test]
    fn messages_round_trip_with_their_version() {
        let message = AgentMessage::Ack { revision: 42 };
        let frame = encode(&message);
        assert_eq!(frame, r#"{"v":1,"type":"ack","revision":42}"#);
        assert_eq!(decode::<AgentMessage>(&frame).unwrap(), message);

        let error = ServerMessage::Error { code: ErrorCode::TooLarge, message: "too big".into() };
        let frame = encode(&error);
        assert_eq!(frame, r#"{"v":1,"type":"error","code":"too_large","message":"too big"}"#);
        assert_eq!(decode::<ServerMessage>(&frame).unwrap(), error);

        let error = AgentMessage::Error { code: ErrorCode::Malformed, message: "not json".into() };
        let frame = encode(&error);
        assert_eq!(frame, r#"{"v":1,"type":"error","code":"malformed","message":"not json"}"#);
        assert_eq!(decode::<AgentMessage>(&frame).unwrap(), error);
        assert_eq!(
            decode::<AgentMessage>(r#"{"v":1,"type":"error","message":"m"}"#).unwrap(),
            AgentMessage::Error { code: ErrorCode::Other, message: "m".into() },
            "the code defaults like the server's"
        );
    }

    #[test]
    fn error_code_names_are_their_wire_names() {
        for code in [
            ErrorCode::Malformed,
            ErrorCode::UnknownType,
            ErrorCode::TooLarge,
            ErrorCode::UnsupportedVersion,
            ErrorCode::Unexpected,
            ErrorCode::Replaced,
            ErrorCode::Timeout,
            ErrorCode::Internal,
            ErrorCode::Other,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str(), "{code:?}");
        }
    }

    #[test]
    fn a_hello_decodes_with_defaults() {
        let device_id = DeviceId::new();
        let frame = format!(
            r#"{{"v":1,"type":"hello","device_id":"{device_id}","public_key":"k","applied_revision":null,"agent_version":"0.1.0"}}"#
        );
        let AgentMessage::Hello { device_id: decoded, capabilities, applied_revision, .. } =
            decode::<AgentMessage>(&frame).unwrap()
        else {
            panic!("not a hello");
        };
        assert_eq!(decoded, device_id);
        assert!(capabilities.is_empty());
        assert_eq!(applied_revision, None);
    }

    #[test]
    fn newer_peers_fields_and_codes_are_tolerated() {
        // Version 1 only ever grows optional fields, so unknown fields must be ignored.
        let frame = r#"{"v":1,"type":"ping","nonce":7,"added_later":true}"#;
        assert_eq!(decode::<ServerMessage>(frame).unwrap(), ServerMessage::Ping { nonce: 7 });
        let frame = r#"{"v":1,"type":"error","code":"brand_new","message":"m"}"#;
        assert_eq!(
            decode::<ServerMessage>(frame).unwrap(),
            ServerMessage::Error { code: ErrorCode::Other, message: "m".into() }
        );
    }

    #[test]
    fn hostile_frames_are_named_errors() {
        assert_eq!(decode::<AgentMessage>(r#"{"type":"ack","revision":1}"#), Err(DecodeError::MissingVersion));
        assert_eq!(
            decode::<AgentMessage>(r#"{"v":2,"type":"ack","revision":1}"#),
            Err(DecodeError::UnsupportedVersion { got: 2 })
        );
        assert_eq!(
            decode::<AgentMessage>(r#"{"v":1,"type":"launch_missiles"}"#),
            Err(DecodeError::UnknownType("launch_missiles".into()))
        );
        assert!(matches!(decode::<AgentMessage>(r#"{"v":1,"type":"ack"}"#), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode::<AgentMessage>(r#"{"v":1,"type":"ack","revision":-1}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<AgentMessage>(r#"{"v":"1","type":"ack","revision":1}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode::<AgentMessage>(r#"{"v":1,"type":7}"#), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<AgentMessage>("[1,2]"), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<AgentMessage>("\u{0}"), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<AgentMessage>(""), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<AgentMessage>(&"[".repeat(100_000)), Err(DecodeError::Malformed(_))));
        let huge = format!(r#"{{"v":1,"type":"event","message":"{}"}}"#, "x".repeat(crate::protocol::MAX_FRAME_BYTES));
        assert!(matches!(decode::<AgentMessage>(&huge), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn every_prefix_of_a_valid_frame_fails_cleanly() {
        let frame = encode(&AgentMessage::Logs {
            application_id: ApplicationId::new(),
            lines: vec![LogLine { at: Utc::now(), stream: Stream::Stderr, line: "é\"\\\n".into() }],
            dropped: 3,
        });
        for end in (0..frame.len()).filter(|end| frame.is_char_boundary(*end)) {
            assert!(decode::<AgentMessage>(&frame[..end]).is_err(), "prefix {end} decoded");
        }
        assert!(decode::<AgentMessage>(&frame).is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// Migrations

/// What a device does for a migration. Sent to the source (`quiesce`, `snapshot`, `ship`,
/// `drain`, `resume`, `release`) or the target (`preflight`, `restore`, `release`).
///
/// Archives move through the server's blob store over HTTP, authenticated with the device
/// credential like the push session:
/// - `GET  /v1/agent/migrations/{migration_id}/chunks` lists the chunks stored so far
///   (`{"chunks": [ChunkDigest, ...]}`), so an upload resumes where it stopped;
/// - `PUT  /v1/agent/migrations/{migration_id}/chunks/{index}` stores one chunk (the source
///   only; at most [`MAX_CHUNK_BYTES`]; header `x-edgible-sha256` with the chunk's SHA-256,
///   refused with 422 on mismatch);
/// - `GET  /v1/agent/migrations/{migration_id}/chunks/{index}` fetches one (the target only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MigrationStep {
    /// Target: can this device run the application? Checks the driver, the image, free disk
    /// for the volumes. Changes nothing.
    Preflight { application: Box<Application> },
    /// Source: refuse new requests for the application (503 with `Retry-After`), wait up to
    /// `drain_seconds` for requests in flight, then stop the workload and keep it stopped
    /// (also across an agent restart) until `resume` or `release`.
    Quiesce { application_id: ApplicationId, drain_seconds: u32 },
    /// Source, quiesced: archive every movable volume (tar, zstd) into chunks of
    /// [`CHUNK_BYTES`] kept on the device until `release`. Answers with the manifest.
    Snapshot { application_id: ApplicationId },
    /// Source: upload the snapshot's chunks that the blob store lacks, reporting progress.
    Ship { application_id: ApplicationId, manifest: SnapshotManifest },
    /// Target: download every chunk, check each one's and the whole archive's SHA-256
    /// against the manifest (refusing any mismatch), and replace the application's volumes
    /// with its contents. `manifest` is absent for a stateless application. The server then
    /// adds the application to the target's desired state and waits for it to be healthy.
    Restore { application: Box<Application>, manifest: Option<SnapshotManifest> },
    /// Source, after cutover of a stateless application: end keep-alive connections
    /// (`Connection: close`, HTTP/2 GOAWAY) and wait up to `drain_seconds` for requests in
    /// flight. The server then removes the application from the source's desired state.
    Drain { application_id: ApplicationId, drain_seconds: u32 },
    /// Source, after a failure: serve the application again (undo `quiesce`).
    Resume { application_id: ApplicationId },
    /// Delete the application's volumes and snapshot on this device: on the target after a
    /// failure, on the source once the retention period after cutover has passed. Refused
    /// while the application is in this device's desired state.
    Release { application_id: ApplicationId },
}

impl MigrationStep {
    /// The step's `kind`, as the protocol spells it.
    pub fn name(&self) -> &'static str {
        match self {
            MigrationStep::Preflight { .. } => "preflight",
            MigrationStep::Quiesce { .. } => "quiesce",
            MigrationStep::Snapshot { .. } => "snapshot",
            MigrationStep::Ship { .. } => "ship",
            MigrationStep::Restore { .. } => "restore",
            MigrationStep::Drain { .. } => "drain",
            MigrationStep::Resume { .. } => "resume",
            MigrationStep::Release { .. } => "release",
        }
    }
}

/// How a migration step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StepOutcome {
    /// Done. `manifest` answers `snapshot`.
    Done {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<SnapshotManifest>,
    },
    /// Failed, for this reason (shown to the user as the migration's failure).
    Failed { reason: String },
}

/// The size of every chunk of a snapshot archive but the last.
pub const CHUNK_BYTES: u64 = 8 * 1024 * 1024;

/// The largest chunk the blob store accepts.
pub const MAX_CHUNK_BYTES: u64 = 16 * 1024 * 1024;

/// A snapshot archive: the zstd-compressed tar of the movable volumes (one top-level
/// directory per volume, named after it), cut into chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// The volumes in the archive.
    pub volumes: Vec<Name>,
    /// The archive's size in bytes (the sum of the chunks').
    pub total_bytes: u64,
    /// Lowercase hex SHA-256 of the whole archive.
    pub sha256: String,
    /// In order of `index`, from 0.
    pub chunks: Vec<ChunkDigest>,
}

/// One chunk of a snapshot archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDigest {
    pub index: u32,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the chunk.
    pub sha256: String,
}
