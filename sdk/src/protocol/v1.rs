//! Version 1 of the push protocol. Frozen once shipped: change it only by adding optional
//! fields; anything else is a new version.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Application, ApplicationId, DeviceId, Revision};

/// What an agent sends the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The first frame of a session.
    Hello {
        device_id: DeviceId,
        /// The device's WireGuard public key (base64).
        public_key: String,
        /// The revision of desired state last applied, if any.
        applied_revision: Option<Revision>,
        /// What this agent can run (`process`, `container`, `vm`).
        #[serde(default)]
        capabilities: Vec<String>,
        agent_version: String,
    },
    /// The agent applied desired state at this revision.
    Ack {
        revision: Revision,
    },
    /// Per-application status.
    Status {
        applications: Vec<ApplicationStatus>,
    },
    Event {
        application_id: Option<ApplicationId>,
        at: DateTime<Utc>,
        message: String,
    },
    Logs {
        application_id: ApplicationId,
        lines: Vec<LogLine>,
    },
    Pong {
        nonce: u64,
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
    },
    /// Desired state. `full` snapshots replace everything the agent has; deltas upsert
    /// `applications` and remove `removed`.
    ApplicationUpdate {
        revision: Revision,
        full: bool,
        applications: Vec<Application>,
        #[serde(default)]
        removed: Vec<ApplicationId>,
    },
    Ping {
        nonce: u64,
    },
    /// The server could not handle a frame the agent sent.
    Error {
        message: String,
    },
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplicationStatus {
    pub application_id: ApplicationId,
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
        assert!(matches!(decode::<AgentMessage>("[1,2]"), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode::<AgentMessage>("\u{0}"), Err(DecodeError::Malformed(_))));
        let huge = format!(r#"{{"v":1,"type":"event","message":"{}"}}"#, "x".repeat(crate::protocol::MAX_FRAME_BYTES));
        assert!(matches!(decode::<AgentMessage>(&huge), Err(DecodeError::TooLarge { .. })));
    }
}
