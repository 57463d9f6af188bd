//! The push protocol between the server and agents or edges (DESIGN.md section 4).
//!
//! One WebSocket per agent (`/v1/agent/connect`) or edge (`/v1/edge/connect`), carrying
//! versioned JSON text frames: `{"v": 1, "type": "hello", ...}`. Version 1 lives in [`v1`]
//! and is frozen once shipped; a new version adds a module beside it.
//!
//! [`decode`] is the one way to read a frame: it bounds the size, checks the version and names
//! what is wrong, so a hostile peer gets an error frame rather than a crash.

pub mod v1;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The largest frame either side accepts, in bytes. A full snapshot of a device's desired
/// state must fit.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// WebSocket close codes the server uses when it ends a session, so that an agent can tell
/// "reconnect" from "fix yourself first" without parsing the reason text.
pub mod close {
    /// The peer broke the protocol (a bad or missing `hello`, an unsupported version).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The credential does not match what the peer claims to be.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// The server failed; reconnect later.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// Another session of the same device connected and replaced this one.
    pub const REPLACED: u16 = 4000;
    /// The peer did not answer pings in time.
    pub const TIMEOUT: u16 = 4001;
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {size} bytes is larger than the limit of {MAX_FRAME_BYTES}")]
    TooLarge { size: usize },
    #[error("protocol version {got} is not supported (this side speaks {VERSION})")]
    UnsupportedVersion { got: u64 },
    #[error("frame has no protocol version (`v`)")]
    MissingVersion,
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// A short, fixed name of the kind of failure, for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::UnsupportedVersion { .. } | DecodeError::MissingVersion => "unsupported_version",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::Malformed(_) => "malformed",
        }
    }

    /// The code of the `error` frame that answers a frame that could not be read.
    pub fn code(&self) -> v1::ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => v1::ErrorCode::TooLarge,
            DecodeError::UnsupportedVersion { .. } | DecodeError::MissingVersion => v1::ErrorCode::UnsupportedVersion,
            DecodeError::UnknownType(_) => v1::ErrorCode::UnknownType,
            DecodeError::Malformed(_) => v1::ErrorCode::Malformed,
        }
    }
}

/// Reads one frame into a message of the expected direction (`v1::AgentMessage` on the
/// server, `v1::ServerMessage` on the agent).
pub fn decode<M: DeserializeOwned>(frame: &str) -> Result<M, DecodeError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge { size: frame.len() });
    }
    let value: serde_json::Value = serde_json::from_str(frame).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let object = value.as_object().ok_or_else(|| DecodeError::Malformed("a frame must be a JSON object".into()))?;
    match object.get("v") {
        None => return Err(DecodeError::MissingVersion),
        Some(version) => match version.as_u64() {
            Some(v) if v == u64::from(VERSION) => {}
            Some(v) => return Err(DecodeError::UnsupportedVersion { got: v }),
            None => return Err(DecodeError::Malformed("`v` must be a number".into())),
        },
    }
    let kind = object
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| DecodeError::Malformed("frame has no `type`".into()))?
        .to_owned();
    serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        if message.starts_with("unknown variant") {
            DecodeError::UnknownType(kind)
        } else {
            DecodeError::Malformed(message)
        }
    })
}

/// The hub endpoint agents connect to, below the server's base URL.
pub const AGENT_CONNECT_PATH: &str = "v1/agent/connect";
/// The hub endpoint edges connect to, below the server's base URL.
pub const EDGE_CONNECT_PATH: &str = "v1/edge/connect";

/// The WebSocket URL of the hub endpoint `path` (e.g. [`AGENT_CONNECT_PATH`]) of the server at
/// `server` (`http(s)://host[:port][/prefix]`): `ws://` for `http://`, `wss://` for `https://`,
/// keeping a path prefix and dropping query and fragment. The error says what is wrong with
/// `server`.
pub fn hub_url(server: &str, path: &str) -> Result<url::Url, String> {
    let mut url = url::Url::parse(server).map_err(|error| error.to_string())?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return Err("the scheme must be http or https".to_owned()),
    };
    if url.cannot_be_a_base() || url.host_str().is_none() {
        return Err("the URL names no host".to_owned());
    }
    url.set_scheme(scheme).map_err(|()| "cannot make a WebSocket URL of it".to_owned())?;
    if !url.path().ends_with('/') {
        let prefix = format!("{}/", url.path());
        url.set_path(&prefix);
    }
    url.set_query(None);
    url.set_fragment(None);
    url.join(path).map_err(|error| error.to_string())
}

/// Writes one message as a frame.
pub fn encode<M: Serialize>(message: &M) -> String {
    #[derive(Serialize)]
    struct Framed<'a, M> {
        v: u32,
        #[serde(flatten)]
        message: &'a M,
    }
    // Serializing our own message types cannot fail: they hold no maps with non-string keys.
    serde_json::to_string(&Framed { v: VERSION, message }).unwrap_or_else(|e| {
        tracing::error!(error = %e, "could not encode a protocol message");
        String::from("{}")
    })
}
