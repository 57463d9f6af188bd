//! The go-plugin handshake: Terraform starts the plugin with a magic cookie and the protocol
//! versions it speaks in the environment, and the plugin answers with one line on stdout
//! saying where it listens and with which certificate.

use std::net::SocketAddr;

use base64::Engine as _;

/// The environment variable Terraform sets to prove that it, not a person, started the binary.
pub const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
/// The value Terraform sets it to (fixed for all Terraform plugins).
pub const MAGIC_COOKIE_VALUE: &str = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";
/// The plugin protocol versions Terraform offers, comma-separated.
pub const PROTOCOL_VERSIONS_ENV: &str = "PLUGIN_PROTOCOL_VERSIONS";
/// Terraform's client certificate (PEM) for mutual TLS.
pub const CLIENT_CERT_ENV: &str = "PLUGIN_CLIENT_CERT";

/// go-plugin's own protocol version.
pub const CORE_PROTOCOL_VERSION: u32 = 1;
/// The Terraform plugin protocol major version this provider speaks.
pub const APP_PROTOCOL_VERSION: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(
        "This binary is a plugin for Terraform and is not meant to be run directly.\n\
         Use it from a Terraform configuration with `source = \"edgible/edgible\"` \
         (or a dev_overrides entry pointing at this binary's directory) and run `terraform plan`."
    )]
    NotLaunchedByTerraform,
    #[error(
        "Terraform offers plugin protocol versions {offered:?}, but this provider speaks only version \
         {APP_PROTOCOL_VERSION}: use Terraform 1.0 or newer"
    )]
    UnsupportedProtocol { offered: String },
    #[error(
        "Terraform did not pass its client certificate ({CLIENT_CERT_ENV}); the provider only serves over mutual TLS"
    )]
    MissingClientCertificate,
}

/// What the plugin needs from its environment to start.
#[derive(Debug, Clone, Default)]
pub struct PluginEnv {
    pub magic_cookie: Option<String>,
    pub protocol_versions: Option<String>,
    pub client_cert_pem: Option<String>,
}

impl PluginEnv {
    /// Reads the settings through `lookup` (the process environment in `main`).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            magic_cookie: lookup(MAGIC_COOKIE_KEY),
            protocol_versions: lookup(PROTOCOL_VERSIONS_ENV),
            client_cert_pem: lookup(CLIENT_CERT_ENV),
        }
    }

    /// Checks that Terraform started the plugin with protocol 6 and a client certificate, and
    /// returns that certificate (PEM).
    pub fn check(&self) -> Result<&str, HandshakeError> {
        if self.magic_cookie.as_deref() != Some(MAGIC_COOKIE_VALUE) {
            return Err(HandshakeError::NotLaunchedByTerraform);
        }
        // Without the list, go-plugin falls back to the version in the handshake line.
        if let Some(offered) = &self.protocol_versions {
            let speaks_ours = offered.split(',').any(|version| version.trim() == APP_PROTOCOL_VERSION.to_string());
            if !speaks_ours {
                return Err(HandshakeError::UnsupportedProtocol { offered: offered.clone() });
            }
        }
        match self.client_cert_pem.as_deref() {
            Some(pem) if !pem.trim().is_empty() => Ok(pem),
            _ => Err(HandshakeError::MissingClientCertificate),
        }
    }
}

/// The line the plugin prints once it listens:
/// `CORE|APP|tcp|ADDRESS|grpc|CERTIFICATE`, the certificate as unpadded standard base64 of DER.
pub fn handshake_line(address: SocketAddr, server_certificate_der: &[u8]) -> String {
    let certificate = base64::engine::general_purpose::STANDARD_NO_PAD.encode(server_certificate_der);
    format!("{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|tcp|{address}|grpc|{certificate}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cookie: Option<&str>, versions: Option<&str>, cert: Option<&str>) -> PluginEnv {
        PluginEnv {
            magic_cookie: cookie.map(str::to_owned),
            protocol_versions: versions.map(str::to_owned),
            client_cert_pem: cert.map(str::to_owned),
        }
    }

    #[test]
    fn only_terraform_with_protocol_6_and_a_certificate_may_start_the_plugin() {
        assert!(matches!(env(None, None, Some("pem")).check(), Err(HandshakeError::NotLaunchedByTerraform)));
        assert!(matches!(env(Some("wrong"), None, Some("pem")).check(), Err(HandshakeError::NotLaunchedByTerraform)));
        assert!(matches!(
            env(Some(MAGIC_COOKIE_VALUE), Some("4,5"), Some("pem")).check(),
            Err(HandshakeError::UnsupportedProtocol { .. })
        ));
        assert!(matches!(
            env(Some(MAGIC_COOKIE_VALUE), Some("5,6"), None).check(),
            Err(HandshakeError::MissingClientCertificate)
        ));
        assert_eq!(env(Some(MAGIC_COOKIE_VALUE), Some("5,6"), Some("pem")).check().unwrap(), "pem");
        assert_eq!(env(Some(MAGIC_COOKIE_VALUE), None, Some("pem")).check().unwrap(), "pem");
    }

    #[test]
    fn the_handshake_line_has_six_fields_and_unpadded_base64() {
        let line = handshake_line("127.0.0.1:4242".parse().unwrap(), &[1, 2, 3, 4]);
        assert_eq!(line, "1|6|tcp|127.0.0.1:4242|grpc|AQIDBA");
        assert_eq!(line.split('|').count(), 6);
    }

    #[test]
    fn the_human_message_says_what_to_do() {
        let message = HandshakeError::NotLaunchedByTerraform.to_string();
        assert!(message.contains("plugin for Terraform"));
        assert!(message.contains("terraform plan"));
    }
}
