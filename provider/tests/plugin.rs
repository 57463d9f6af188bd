//! The provider binary as Terraform sees it: started with the go-plugin environment, it prints
//! the handshake line, serves gRPC only to the client certificate Terraform passed (ECDSA
//! P-521, self-signed and marked as a CA, like go-plugin's), and exits on `Shutdown`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use terraform_provider_edgible::plugin::handshake::{MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE};
use terraform_provider_edgible::proto::plugin::Empty;
use terraform_provider_edgible::proto::plugin::grpc_controller_client::GrpcControllerClient;
use terraform_provider_edgible::proto::tfplugin6::get_provider_schema;
use terraform_provider_edgible::proto::tfplugin6::provider_client::ProviderClient;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

const BINARY: &str = env!("CARGO_BIN_EXE_terraform-provider-edgible");

/// A client certificate made the way go-plugin makes Terraform's.
struct ClientIdentity {
    pem: String,
    certificate: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl ClientIdentity {
    fn generate() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512)?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "HashiCorp");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let certificate = params.self_signed(&key)?;
        Ok(Self {
            pem: certificate.pem(),
            certificate: certificate.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

/// The provider process; killed when dropped if it is still running.
struct PluginProcess {
    child: Child,
    address: SocketAddr,
    server_certificate: CertificateDer<'static>,
}

impl PluginProcess {
    fn start(client: &ClientIdentity) -> anyhow::Result<Self> {
        let mut child = Command::new(BINARY)
            .env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
            .env("PLUGIN_PROTOCOL_VERSIONS", "5,6")
            .env("PLUGIN_CLIENT_CERT", &client.pem)
            .env("EDGIBLE_PROVIDER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let fields: Vec<&str> = line.trim_end().split('|').collect();
        anyhow::ensure!(fields.len() == 6, "unexpected handshake line {line:?}");
        assert_eq!(&fields[..3], ["1", "6", "tcp"]);
        assert_eq!(fields[4], "grpc");
        let address: SocketAddr = fields[3].parse()?;
        assert!(address.ip().is_loopback(), "the provider must listen on loopback only");
        let der = base64::engine::general_purpose::STANDARD_NO_PAD.decode(fields[5])?;
        Ok(Self { child, address, server_certificate: CertificateDer::from(der) })
    }

    /// A gRPC channel that authenticates with `client` and checks the provider's certificate
    /// the way go-plugin does (the certificate from the handshake, for `localhost`).
    async fn channel(&self, client: &ClientIdentity) -> anyhow::Result<Channel> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.server_certificate.clone())?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![client.certificate.clone()], PrivateKeyDer::Pkcs8(client.key.clone_key()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let address = self.address;
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = TcpStream::connect(address).await?;
                    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await?;
        Ok(channel)
    }

    fn wait_for_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(Instant::now() < deadline, "the provider did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test]
async fn terraforms_certificate_is_served_and_shutdown_stops_the_process() -> anyhow::Result<()> {
    let terraform = ClientIdentity::generate()?;
    let mut plugin = PluginProcess::start(&terraform)?;
    let channel = plugin.channel(&terraform).await?;

    let schema =
        ProviderClient::new(channel.clone()).get_provider_schema(get_provider_schema::Request {}).await?.into_inner();
    assert!(schema.resource_schemas.contains_key("edgible_application"));
    assert!(schema.data_source_schemas.contains_key("edgible_organization"));

    GrpcControllerClient::new(channel).shutdown(Empty {}).await?;
    let status = plugin.wait_for_exit(Duration::from_secs(10))?;
    assert!(status.success(), "the provider exited with {status}");
    Ok(())
}

#[tokio::test]
async fn any_other_client_certificate_is_refused() -> anyhow::Result<()> {
    let terraform = ClientIdentity::generate()?;
    let intruder = ClientIdentity::generate()?;
    let plugin = PluginProcess::start(&terraform)?;

    let refused = match plugin.channel(&intruder).await {
        // With TLS 1.3 the server checks the client certificate after the client considers
        // the handshake done, so the refusal may only show on the first request.
        Ok(channel) => ProviderClient::new(channel).get_provider_schema(get_provider_schema::Request {}).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client with another certificate got an answer");

    // The refusal did not take the provider down: Terraform's own certificate still works.
    let channel = plugin.channel(&terraform).await?;
    ProviderClient::new(channel).get_provider_schema(get_provider_schema::Request {}).await?;
    Ok(())
}

#[test]
fn started_by_hand_it_explains_itself_and_exits_1() -> anyhow::Result<()> {
    let output = Command::new(BINARY).env_remove(MAGIC_COOKIE_KEY).stdin(Stdio::null()).output()?;
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "nothing may look like a handshake line");
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.contains("plugin for Terraform"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    Ok(())
}

#[test]
fn without_a_client_certificate_it_refuses_to_serve() -> anyhow::Result<()> {
    let output = Command::new(BINARY)
        .env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
        .env_remove("PLUGIN_CLIENT_CERT")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8(output.stderr)?.contains("PLUGIN_CLIENT_CERT"));
    Ok(())
}
