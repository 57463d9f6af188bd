//! TLS alert records, the edge's only way to tell a client why it refuses a connection: the
//! edge holds no key, so it cannot complete a handshake to send anything richer. An alert is
//! a plaintext record that every TLS client reads before the handshake (RFC 8446 section 6,
//! RFC 5246 section 7.2), so a browser shows a precise error instead of a reset connection.

use crate::sni::SniError;

/// The alert descriptions the edge sends (RFC 8446 section 6, RFC 6066 section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertDescription {
    /// The first bytes were not a ClientHello at all.
    UnexpectedMessage,
    /// The ClientHello could not be parsed or does not fit the edge's bound.
    DecodeError,
    /// The ClientHello's fields are well-formed but not acceptable (an invalid server name).
    IllegalParameter,
    /// The client speaks a record version the edge does not know.
    ProtocolVersion,
    /// The edge knows the name but cannot reach the device serving it.
    InternalError,
    /// No server name, or a name the edge does not route.
    UnrecognizedName,
}

impl AlertDescription {
    /// The description's code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::UnexpectedMessage => 10,
            Self::DecodeError => 50,
            Self::IllegalParameter => 47,
            Self::ProtocolVersion => 70,
            Self::InternalError => 80,
            Self::UnrecognizedName => 112,
        }
    }

    /// The alert that answers a ClientHello the parser refused. `Incomplete` never reaches
    /// here (the caller reads more, or gives up on a timeout without an alert); it maps to
    /// `decode_error` so that the function stays total.
    pub fn for_parse_error(error: &SniError) -> Self {
        match error {
            SniError::NotHandshake { .. } | SniError::NotClientHello { .. } => Self::UnexpectedMessage,
            SniError::UnsupportedVersion { .. } => Self::ProtocolVersion,
            SniError::InvalidServerName(_) => Self::IllegalParameter,
            SniError::Incomplete { .. } | SniError::TooLarge { .. } | SniError::Malformed(_) => Self::DecodeError,
        }
    }
}

/// The length of an alert record: a 5-byte record header and a 2-byte alert.
pub const ALERT_RECORD_LEN: usize = 7;

/// A fatal alert record. The record version is TLS 1.2's (3, 3), which TLS 1.3 also uses for
/// every record after the first (RFC 8446 section 5.1) and which TLS 1.0 to 1.2 clients accept
/// in an alert.
pub fn fatal_alert_record(description: AlertDescription) -> [u8; ALERT_RECORD_LEN] {
    const CONTENT_TYPE_ALERT: u8 = 21;
    const LEVEL_FATAL: u8 = 2;
    [CONTENT_TYPE_ALERT, 3, 3, 0, 2, LEVEL_FATAL, description.code()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sni::ServerNameError;

    #[test]
    fn records_are_fatal_alerts() {
        assert_eq!(fatal_alert_record(AlertDescription::UnrecognizedName), [21, 3, 3, 0, 2, 2, 112]);
        assert_eq!(fatal_alert_record(AlertDescription::InternalError), [21, 3, 3, 0, 2, 2, 80]);
        assert_eq!(fatal_alert_record(AlertDescription::DecodeError), [21, 3, 3, 0, 2, 2, 50]);
    }

    #[test]
    fn parse_errors_map_to_fitting_alerts() {
        let cases = [
            (SniError::NotHandshake { content_type: b'G' }, 10),
            (SniError::NotClientHello { handshake_type: 2 }, 10),
            (SniError::UnsupportedVersion { major: 2 }, 70),
            (SniError::TooLarge { limit: 1 }, 50),
            (SniError::Malformed("x"), 50),
            (SniError::InvalidServerName(ServerNameError::InvalidByte), 47),
        ];
        for (error, code) in cases {
            assert_eq!(AlertDescription::for_parse_error(&error).code(), code, "{error}");
        }
    }
}
