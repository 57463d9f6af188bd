//! The command line of `edgible-server`, the one typed configuration of the binary. Every
//! option that has an environment variable names it in a constant here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use edgible::model::{Hostname, Name};

/// Where the database URL may also come from.
pub const DATABASE_URL_ENV: &str = "EDGIBLE_DATABASE_URL";
/// Where the listen address may also come from.
pub const LISTEN_ENV: &str = "EDGIBLE_LISTEN";
/// Where the log format may also come from.
pub const LOG_FORMAT_ENV: &str = "EDGIBLE_LOG_FORMAT";
/// Where the certificate issuer may also come from.
pub const ISSUER_ENV: &str = "EDGIBLE_ISSUER";
/// Where the ACME directory URL may also come from.
pub const ACME_DIRECTORY_ENV: &str = "EDGIBLE_ACME_DIRECTORY";
/// Where the ACME External Account Binding HMAC key may also come from (kept off command lines).
pub const ACME_EAB_HMAC_KEY_ENV: &str = "EDGIBLE_ACME_EAB_HMAC_KEY";
/// Where the server key file's path may also come from.
pub const SERVER_KEY_FILE_ENV: &str = "EDGIBLE_SERVER_KEY_FILE";
/// Where the public URL of the login pages may also come from.
pub const PUBLIC_URL_ENV: &str = "EDGIBLE_PUBLIC_URL";

#[derive(Debug, Parser)]
#[command(name = "edgible-server", version, about = "The Edgible control plane")]
pub struct Config {
    /// How log lines are written to standard error; the level comes from `RUST_LOG` (default
    /// `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = LOG_FORMAT_ENV)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Who issues devices' certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Issuer {
    /// The server's internal CA.
    Internal,
    /// An ACME CA (`--acme-directory`).
    Acme,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

// The command line is parsed once per process; boxing `ServeConfig` would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API until SIGTERM or SIGINT.
    Serve(Box<ServeConfig>),
    /// Create the first organization and a `platform` key on an empty database, printing the
    /// key's secret; refuses once any organization exists.
    Bootstrap(BootstrapConfig),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// The database: `sqlite://PATH?mode=rwc` or `postgres://USER:PASSWORD@HOST/DB`.
    #[arg(long = "database", env = DATABASE_URL_ENV)]
    pub database_url: String,

    /// The address to listen on; port 0 picks a free port (see `--ready-file`).
    #[arg(long, env = LISTEN_ENV, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Once listening, write the server's base URL (`http://IP:PORT`) to this file.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,

    /// On an empty database, create this organization with a `platform` key.
    #[arg(long, requires = "bootstrap_key_file")]
    pub bootstrap: Option<Name>,

    /// Where `--bootstrap` writes the new key's secret (mode 0600); left alone when the
    /// database already holds organizations.
    #[arg(long, requires = "bootstrap")]
    pub bootstrap_key_file: Option<PathBuf>,

    /// Seconds to let open requests finish after SIGTERM or SIGINT before exiting anyway.
    #[arg(long, default_value_t = 10)]
    pub drain_seconds: u64,

    /// Seconds between the pings the server sends each connected agent.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub agent_ping_seconds: u64,

    /// Seconds an agent may take to answer a ping before its session is closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub agent_pong_timeout_seconds: u64,

    /// Who issues the certificates devices serve: `internal` (this server's own CA, for
    /// offline and local use; clients must trust `GET /v1/ca.pem`) or `acme` (an ACME CA such
    /// as Let's Encrypt, HTTP-01 answered by the edges; needs `--acme-directory` and
    /// `--server-key-file`). Devices always keep their private keys: only CSRs reach the server.
    #[arg(long, value_enum, default_value_t = Issuer::Internal, env = ISSUER_ENV)]
    pub issuer: Issuer,

    /// The ACME CA's directory URL (`https://...`), e.g.
    /// `https://acme-v02.api.letsencrypt.org/directory`. Required with `--issuer acme`.
    #[arg(long, value_name = "URL", required_if_eq("issuer", "acme"), env = ACME_DIRECTORY_ENV)]
    pub acme_directory: Option<String>,

    /// A contact e-mail address for the ACME account (`mailto:` is added). Repeatable, or
    /// several separated by commas.
    #[arg(long = "acme-contact", value_name = "EMAIL", value_delimiter = ',')]
    pub acme_contacts: Vec<String>,

    /// The key identifier of the External Account Binding the CA requires, if any (with
    /// `--acme-eab-hmac-key`).
    #[arg(long, value_name = "KID", requires = "acme_eab_hmac_key")]
    pub acme_eab_kid: Option<String>,

    /// The External Account Binding's HMAC key, base64url as CAs hand it out (with
    /// `--acme-eab-kid`).
    #[arg(long, value_name = "KEY", requires = "acme_eab_kid", env = ACME_EAB_HMAC_KEY_ENV, hide_env_values = true)]
    pub acme_eab_hmac_key: Option<String>,

    /// PEM file of the root certificates to trust for the ACME CA's own HTTPS (a private CA, or
    /// Pebble in tests), instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    pub acme_ca_bundle: Option<PathBuf>,

    /// How many ACME orders run at once; more requests wait their turn. Bounds the rate at
    /// which this server asks the CA for certificates.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub acme_max_concurrent_orders: u32,

    /// The server key (32 random bytes, base64) that encrypts secrets at rest in the database
    /// (the ACME account's key and the login assertion signing keys, with ChaCha20-Poly1305).
    /// Created, mode 0600, if missing; keep a copy: without it the stored account and keys
    /// cannot be used. Required with `--issuer acme`.
    #[arg(long, value_name = "FILE", required_if_eq("issuer", "acme"), env = SERVER_KEY_FILE_ENV)]
    pub server_key_file: Option<PathBuf>,

    /// A DNS zone whose names (one or more labels below it, e.g. `web.apps.example.com`)
    /// applications take first come, first served. Repeatable. With at least one zone,
    /// hostname ownership is enforced: any other hostname must be under a domain the
    /// organization verified (`POST /v1/domains`). Without any zone and without
    /// `--require-domain-ownership`, hostnames are only checked for uniqueness.
    #[arg(long = "platform-zone", value_name = "ZONE", value_parser = parse_platform_zone)]
    pub platform_zones: Vec<Hostname>,

    /// Enforce hostname ownership even without a platform zone: every application hostname
    /// must be under a domain the organization verified. Hostnames an application already
    /// holds are not re-checked.
    #[arg(long)]
    pub require_domain_ownership: bool,

    /// The DNS server (`ADDR:PORT`, UDP and TCP) that domain verification asks for TXT
    /// records, instead of the system's resolvers (`/etc/resolv.conf`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dns_resolver: Option<SocketAddr>,

    /// The URL under which browsers reach this server (`https://login.example.com`): devices
    /// send visitors of `organization`-protected applications to `<URL>/login`. Its login
    /// cookie is `Secure` when it is https. Default: `http://<listen address>`.
    #[arg(long, value_name = "URL", value_parser = parse_public_url, env = PUBLIC_URL_ENV)]
    pub public_url: Option<String>,

    /// Seconds a visitor's login session on a device lasts before the device sends them
    /// through the login page again, which checks their membership anew. Bounds how long a
    /// removed member keeps access.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub access_session_ttl: u64,

    /// Seconds a cloud host may stay offline before its stateless applications (those
    /// without volumes) are rescheduled onto other cloud hosts.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub cloud_reschedule_after: u64,

    /// Seconds each step of a migration may take (and the restored application to report
    /// running on the target) before the migration fails and rolls back.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub migration_step_timeout: u64,

    /// Seconds a migrated application's source keeps its copy (volumes, snapshot) after the
    /// migration completed, before it is told to delete it.
    #[arg(long, value_name = "SECONDS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub migration_retention: u64,

    /// Seconds a migration's source waits for requests in flight when it stops serving
    /// (quiesce) or hands over (drain).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub migration_drain_seconds: u32,

    /// The directory of the blob store that migration snapshots pass through (created if
    /// missing). Default: `blobs/` beside a SQLite database file, or `edgible-blobs/` in the
    /// system's temporary directory with PostgreSQL.
    #[arg(long, value_name = "DIR")]
    pub blob_dir: Option<PathBuf>,

    /// Keep migration snapshots in an S3-compatible bucket instead of a directory:
    /// `s3://BUCKET[/PREFIX]`. Region, credentials and endpoint come from the standard `AWS_*`
    /// environment variables (`AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_ENDPOINT_URL`, ...). The server writes and deletes a probe object at start.
    #[arg(long, value_name = "URL", conflicts_with = "blob_dir")]
    pub blob_url: Option<String>,

    /// The S3 endpoint of `--blob-url` (e.g. MinIO's), over `AWS_ENDPOINT_URL`.
    #[arg(long, value_name = "URL", requires = "blob_url")]
    pub blob_s3_endpoint: Option<String>,

    /// Allow a plain `http://` S3 endpoint (refused otherwise).
    #[arg(long, requires = "blob_url")]
    pub blob_s3_allow_http: bool,
}

impl ServeConfig {
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    /// Hostname ownership and domain verification, as the flags configure them.
    pub fn domain_settings(&self) -> crate::domains::DomainSettings {
        crate::domains::DomainSettings {
            policy: crate::domains::HostnamePolicy {
                platform_zones: self.platform_zones.clone(),
                require_ownership: self.require_domain_ownership,
            },
            resolver: crate::domains::TxtResolver { server: self.dns_resolver },
        }
    }

    /// Access policies' settings; `listening` is the bound address, the public URL's default.
    /// Loads (or creates) the server key when `--server-key-file` is given.
    pub fn access_settings(
        &self,
        listening: SocketAddr,
    ) -> Result<crate::access::AccessSettings, crate::certs::sealed::SealError> {
        let server_key =
            self.server_key_file.as_deref().map(crate::certs::sealed::ServerKey::load_or_create).transpose()?;
        let public_url = self.public_url.clone().unwrap_or_else(|| format!("http://{listening}"));
        Ok(crate::access::AccessSettings::new(&public_url, Duration::from_secs(self.access_session_ttl), server_key))
    }

    /// How long a cloud host may stay offline before its applications are moved.
    pub fn cloud_reschedule_after(&self) -> Duration {
        Duration::from_secs(self.cloud_reschedule_after)
    }

    /// Where the migration blob store lives: `--blob-dir`, or its default.
    pub fn blob_dir(&self) -> PathBuf {
        if let Some(dir) = &self.blob_dir {
            return dir.clone();
        }
        let sqlite_file = self
            .database_url
            .strip_prefix("sqlite://")
            .or_else(|| self.database_url.strip_prefix("sqlite:"))
            .map(|rest| rest.split('?').next().unwrap_or(rest))
            .filter(|path| !path.is_empty() && !path.starts_with(":memory:"));
        match sqlite_file.map(std::path::Path::new).and_then(std::path::Path::parent) {
            Some(parent) if !parent.as_os_str().is_empty() => parent.join("blobs"),
            Some(_) => PathBuf::from("blobs"),
            None => std::env::temp_dir().join("edgible-blobs"),
        }
    }

    /// How migrations are timed, and their blob store.
    pub fn migration_settings(&self) -> Result<crate::migrations::driver::MigrationSettings, crate::blobs::BlobError> {
        Ok(crate::migrations::driver::MigrationSettings {
            step_timeout: Duration::from_secs(self.migration_step_timeout),
            drain_seconds: self.migration_drain_seconds,
            retention: Duration::from_secs(self.migration_retention),
            blobs: match &self.blob_url {
                Some(url) => crate::blobs::BlobStore::s3(&crate::blobs::S3Location {
                    url: url.clone(),
                    endpoint: self.blob_s3_endpoint.clone(),
                    allow_http: self.blob_s3_allow_http,
                })?,
                None => crate::blobs::BlobStore::local(&self.blob_dir())?,
            },
        })
    }

    /// The timing of agent sessions.
    pub fn session_config(&self) -> crate::hub::agent::SessionConfig {
        crate::hub::agent::SessionConfig {
            ping_interval: Duration::from_secs(self.agent_ping_seconds),
            pong_timeout: Duration::from_secs(self.agent_pong_timeout_seconds),
            ..crate::hub::agent::SessionConfig::default()
        }
    }
}

/// A `--public-url`: an http or https URL without query or fragment.
fn parse_public_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| format!("{text} must start with https:// (or http:// for local use)"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(['?', '#', ' ']) {
        return Err(format!("{text} must be a base URL such as https://login.example.com, without query or fragment"));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// A `--platform-zone`: a plain hostname (no wildcard).
fn parse_platform_zone(text: &str) -> Result<Hostname, String> {
    let zone: Hostname = text.parse().map_err(|error: edgible::model::ValidationError| error.message)?;
    if zone.is_wildcard() {
        return Err(format!("{zone} is a wildcard; a platform zone is a plain name such as apps.example.com"));
    }
    Ok(zone)
}

#[derive(Debug, Clone, clap::Args)]
pub struct BootstrapConfig {
    /// The database: `sqlite://PATH?mode=rwc` or `postgres://USER:PASSWORD@HOST/DB`.
    #[arg(long = "database", env = DATABASE_URL_ENV)]
    pub database_url: String,

    /// The name of the first organization.
    #[arg(long)]
    pub organization: Name,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("edgible-server").chain(args.iter().copied()))
    }

    #[test]
    fn serve_takes_the_documented_options() {
        let config = parse(&[
            "serve",
            "--database",
            "sqlite:///tmp/x.db?mode=rwc",
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            "/tmp/ready",
            "--bootstrap",
            "platform",
            "--bootstrap-key-file",
            "/tmp/key",
        ])
        .expect("valid command line");
        let Command::Serve(serve) = config.command else { panic!("expected serve") };
        assert_eq!(serve.listen.port(), 0);
        assert_eq!(serve.bootstrap.as_ref().map(Name::as_str), Some("platform"));
    }

    #[test]
    fn platform_zones_repeat_and_refuse_wildcards() {
        let config = parse(&[
            "serve",
            "--database",
            "sqlite://x",
            "--platform-zone",
            "apps.example.test",
            "--platform-zone",
            "apps.example.net",
            "--dns-resolver",
            "127.0.0.1:5353",
        ])
        .expect("valid command line");
        let Command::Serve(serve) = config.command else { panic!("expected serve") };
        let settings = serve.domain_settings();
        assert_eq!(settings.policy.platform_zones.len(), 2);
        assert!(settings.policy.enforced());
        assert_eq!(settings.resolver.server.map(|server| server.port()), Some(5353));
        let error = parse(&["serve", "--database", "sqlite://x", "--platform-zone", "*.example.test"])
            .expect_err("a wildcard zone");
        assert!(error.to_string().contains("--platform-zone"), "{error}");

        let config = parse(&["serve", "--database", "sqlite://x"]).expect("valid command line");
        let Command::Serve(serve) = config.command else { panic!("expected serve") };
        assert!(!serve.domain_settings().policy.enforced(), "off by default");
    }

    #[test]
    fn acme_needs_a_directory_and_a_server_key_and_takes_its_options() {
        let serve = |extra: &[&str]| {
            let mut args = vec!["serve", "--database", "sqlite://x"];
            args.extend_from_slice(extra);
            parse(&args).map(|config| match config.command {
                Command::Serve(serve) => serve,
                Command::Bootstrap(_) => panic!("expected serve"),
            })
        };
        let internal = serve(&[]).expect("internal needs nothing");
        assert_eq!(internal.issuer, Issuer::Internal);
        assert_eq!(internal.acme_max_concurrent_orders, 10);

        let error = serve(&["--issuer", "acme", "--server-key-file", "/k"]).expect_err("no directory");
        assert!(error.to_string().contains("--acme-directory"), "{error}");
        let error = serve(&["--issuer", "acme", "--acme-directory", "https://ca/dir"]).expect_err("no key");
        assert!(error.to_string().contains("--server-key-file"), "{error}");
        let error = serve(&["--acme-eab-kid", "kid"]).expect_err("a kid without its key");
        assert!(error.to_string().contains("--acme-eab-hmac-key"), "{error}");
        let error = serve(&["--acme-max-concurrent-orders", "0"]).expect_err("at least one");
        assert!(error.to_string().contains("--acme-max-concurrent-orders"), "{error}");

        let acme = serve(&[
            "--issuer",
            "acme",
            "--acme-directory",
            "https://ca.example/dir",
            "--server-key-file",
            "/k",
            "--acme-contact",
            "a@example.com,b@example.com",
            "--acme-contact",
            "c@example.com",
            "--acme-eab-kid",
            "kid",
            "--acme-eab-hmac-key",
            "aGVsbG8",
            "--acme-ca-bundle",
            "/roots.pem",
            "--acme-max-concurrent-orders",
            "3",
        ])
        .expect("valid");
        assert_eq!(acme.issuer, Issuer::Acme);
        assert_eq!(acme.acme_contacts, ["a@example.com", "b@example.com", "c@example.com"]);
        assert_eq!(acme.acme_max_concurrent_orders, 3);
    }

    #[test]
    fn access_options_have_defaults_and_are_checked() {
        let serve = |extra: &[&str]| {
            let mut args = vec!["serve", "--database", "sqlite://x"];
            args.extend_from_slice(extra);
            parse(&args).map(|config| match config.command {
                Command::Serve(serve) => serve,
                Command::Bootstrap(_) => panic!("expected serve"),
            })
        };
        let listening: SocketAddr = "127.0.0.1:7070".parse().expect("address");
        let defaults = serve(&[]).expect("defaults");
        let settings = defaults.access_settings(listening).expect("settings");
        assert_eq!(settings.public_url, "http://127.0.0.1:7070");
        assert_eq!(settings.session_ttl, Duration::from_secs(300));
        assert!(!settings.https());

        let set = serve(&["--public-url", "https://login.example.test/", "--access-session-ttl", "60"]).expect("set");
        let settings = set.access_settings(listening).expect("settings");
        assert_eq!(settings.public_url, "https://login.example.test");
        assert_eq!(settings.session_ttl, Duration::from_secs(60));
        assert!(settings.https());

        for bad in ["login.example.test", "ftp://x", "https://", "https://x/?a=b"] {
            let error = serve(&["--public-url", bad]).expect_err(bad);
            assert!(error.to_string().contains("--public-url"), "{error}");
        }
        assert!(serve(&["--access-session-ttl", "0"]).is_err());
    }

    #[test]
    fn bootstrap_needs_a_key_file_and_a_valid_name() {
        assert!(parse(&["serve", "--database", "sqlite://x", "--bootstrap", "platform"]).is_err());
        assert!(parse(&["bootstrap", "--database", "sqlite://x", "--organization", "Not Valid"]).is_err());
        assert!(parse(&["bootstrap", "--database", "sqlite://x", "--organization", "acme"]).is_ok());
    }

    #[test]
    fn cloud_hosts_are_rescheduled_after_five_minutes_unless_told_otherwise() {
        let serve = |extra: &[&str]| {
            let mut args = vec!["serve", "--database", "sqlite://x"];
            args.extend_from_slice(extra);
            parse(&args).map(|config| match config.command {
                Command::Serve(serve) => serve.cloud_reschedule_after(),
                Command::Bootstrap(_) => panic!("expected serve"),
            })
        };
        assert_eq!(serve(&[]).expect("the default"), Duration::from_secs(300));
        assert_eq!(serve(&["--cloud-reschedule-after", "5"]).expect("five seconds"), Duration::from_secs(5));
        assert!(serve(&["--cloud-reschedule-after", "0"]).is_err(), "never would strand applications");
    }

    #[test]
    fn migrations_have_documented_defaults_and_a_blob_dir_beside_the_database() {
        let serve = |args: &[&str]| match parse(args).expect("valid command line").command {
            Command::Serve(serve) => serve,
            Command::Bootstrap(_) => panic!("expected serve"),
        };
        let defaults = serve(&["serve", "--database", "sqlite:///var/lib/edgible/edgible.db?mode=rwc"]);
        assert_eq!(
            (defaults.migration_step_timeout, defaults.migration_retention, defaults.migration_drain_seconds),
            (300, 86_400, 10)
        );
        assert_eq!(defaults.blob_dir(), PathBuf::from("/var/lib/edgible/blobs"));
        let postgres = serve(&["serve", "--database", "postgres://u:p@db/edgible"]);
        assert_eq!(postgres.blob_dir(), std::env::temp_dir().join("edgible-blobs"));
        let set = serve(&[
            "serve",
            "--database",
            "postgres://u:p@db/edgible",
            "--blob-dir",
            "/srv/blobs",
            "--migration-step-timeout",
            "5",
            "--migration-retention",
            "0",
            "--migration-drain-seconds",
            "1",
        ]);
        assert_eq!(set.blob_dir(), PathBuf::from("/srv/blobs"));
        assert_eq!((set.migration_step_timeout, set.migration_retention, set.migration_drain_seconds), (5, 0, 1));
        assert!(parse(&["serve", "--database", "sqlite://x", "--migration-step-timeout", "0"]).is_err());
    }

    #[test]
    fn an_s3_blob_url_excludes_a_blob_dir_and_plain_http_needs_consent() {
        let base = ["serve", "--database", "sqlite://x"];
        let serve = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&args).map(|config| match config.command {
                Command::Serve(serve) => serve,
                Command::Bootstrap(_) => panic!("expected serve"),
            })
        };
        let both = serve(&["--blob-url", "s3://snapshots", "--blob-dir", "/srv/blobs"]).expect_err("exclusive");
        assert!(both.to_string().contains("--blob-dir"), "{both}");
        assert!(serve(&["--blob-s3-allow-http"]).is_err(), "only with --blob-url");
        assert!(serve(&["--blob-s3-endpoint", "http://127.0.0.1:9000"]).is_err(), "only with --blob-url");

        let plain = ["--blob-url", "s3://snapshots/edgible", "--blob-s3-endpoint", "http://127.0.0.1:9000"];
        let refused = serve(&plain).expect("parsed").migration_settings().expect_err("plain HTTP is refused");
        assert!(refused.to_string().contains("--blob-s3-allow-http"), "{refused}");
        let allowed: Vec<&str> = plain.iter().copied().chain(["--blob-s3-allow-http"]).collect();
        serve(&allowed).expect("parsed").migration_settings().expect("plain HTTP when allowed");
        for bad in ["snapshots", "s3://", "s3:///prefix", "s3://Not_A_Bucket"] {
            let error = serve(&["--blob-url", bad, "--blob-s3-endpoint", "https://s3.example.test"])
                .expect("parsed")
                .migration_settings()
                .expect_err(bad);
            assert!(error.to_string().contains("--blob-url"), "{bad}: {error}");
        }
    }
}
