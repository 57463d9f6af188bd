//! The `edgible` command line: log in to a server, manage organizations, members, API keys, device
//! pools, devices, edges, domains, applications and placements, move applications (migrations),
//! deploy stack files, read what devices report (status, logs, events) and metered usage, and
//! fetch the internal CA certificate (`edgible ca`).
//!
//! Each object kind has its own module with its clap arguments and handlers; [`plan`] is the
//! pure stack diff and [`stack`] applies it. Handlers return `anyhow` errors with context
//! (this is the binary's top layer); the reusable parts ([`config`], [`resolve`], [`plan`])
//! have typed errors. `main` prints the error chain as one `error: ...` line and exits 1.

// A binary's root is `src/bin/edgible.rs`, so its submodules would be looked up beside it in
// `src/bin/`, where cargo would take them for binaries of their own; they live in `edgible/`.
#[path = "edgible/access.rs"]
mod access;
#[path = "edgible/applications.rs"]
mod applications;
#[path = "edgible/config.rs"]
mod config;
#[path = "edgible/devices.rs"]
mod devices;
#[path = "edgible/domains.rs"]
mod domains;
#[path = "edgible/edges.rs"]
mod edges;
#[path = "edgible/keys.rs"]
mod keys;
#[path = "edgible/login.rs"]
mod login;
#[path = "edgible/members.rs"]
mod members;
#[path = "edgible/migrations.rs"]
mod migrations;
#[path = "edgible/organizations.rs"]
mod organizations;
#[path = "edgible/output.rs"]
mod output;
#[path = "edgible/placements.rs"]
mod placements;
#[path = "edgible/plan.rs"]
mod plan;
#[path = "edgible/pools.rs"]
mod pools;
#[path = "edgible/progress.rs"]
mod progress;
#[path = "edgible/reports.rs"]
mod reports;
#[path = "edgible/resolve.rs"]
mod resolve;
#[path = "edgible/stack.rs"]
mod stack;
#[path = "edgible/usage.rs"]
mod usage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgible::Client;

use crate::config::{Env, ProcessEnv};
use crate::output::Format;

#[derive(Debug, Parser)]
#[command(name = "edgible", version, about = "Publish workloads on your devices at HTTPS hostnames")]
#[command(after_help = "The server and key come from `edgible login`, saved in the user's configuration \
directory ($EDGIBLE_CONFIG_DIR/config.json when set); EDGIBLE_ENDPOINT and EDGIBLE_API_KEY override them.")]
struct Cli {
    /// How to print results: aligned tables for people, or the API's JSON.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify an API key with a server and save both for the other commands.
    Login(login::LoginArgs),
    /// Show the organization and API key in use.
    Whoami,
    /// Organizations (creating and deleting them needs a platform key).
    #[command(subcommand, visible_alias = "organization")]
    Org(organizations::OrgCommand),
    /// Members of the organization, and their login passwords.
    #[command(subcommand)]
    Member(members::MemberCommand),
    /// API keys of the organization.
    #[command(subcommand, visible_alias = "api-key")]
    Key(keys::KeyCommand),
    /// Device pools: the tunnel networks devices get their addresses from.
    #[command(subcommand, visible_alias = "device-pool")]
    Pool(pools::PoolCommand),
    /// Devices that run applications.
    #[command(subcommand)]
    Device(devices::DeviceCommand),
    /// Edges: the public entry points of pools, routing HTTPS by name to devices.
    #[command(subcommand)]
    Edge(edges::EdgeCommand),
    /// Domains the organization proves it owns (DNS TXT record), for application hostnames.
    #[command(subcommand)]
    Domain(domains::DomainCommand),
    /// Print the server's internal CA certificate (PEM), which signs the certificates devices
    /// serve; trust it to verify them (e.g. `curl --cacert`).
    Ca,
    /// Applications: what runs and at which hostnames.
    #[command(subcommand, visible_alias = "application")]
    App(applications::AppCommand),
    /// Placements: where an application runs.
    #[command(subcommand)]
    Placement(placements::PlacementCommand),
    /// Migrations: moves of applications between devices and the cloud (`edgible app migrate`
    /// starts one).
    #[command(subcommand)]
    Migration(migrations::MigrationCommand),
    /// Stack files: declare applications and placements in one YAML file.
    #[command(subcommand)]
    Stack(stack::StackCommand),
    /// Print an application's recent output, as its device reported it.
    Logs(reports::LogsArgs),
    /// Lifecycle events devices reported (started, exited, restarted, stopped), oldest first.
    Events(reports::EventsArgs),
    /// Metered usage per application and hour (awake time, requests, bytes, wakes), with
    /// totals.
    Usage(usage::UsageArgs),
}

/// What every command handler gets: the output format and where to find the server.
#[derive(Debug)]
pub struct Context {
    pub format: Format,
    env: ProcessEnv,
}

impl Context {
    /// A client for the server and key of the configuration.
    pub fn client(&self) -> anyhow::Result<Client> {
        let config = config::load(&self.env)?;
        Ok(Client::new(&config.endpoint, &config.api_key)?)
    }

    pub fn env(&self) -> &impl Env {
        &self.env
    }
}

fn main() -> ExitCode {
    // The one TLS crypto provider of the process, installed before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let context = Context { format: cli.format, env: ProcessEnv };
    match runtime.block_on(run(cli.command, &context)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", render_error(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, context: &Context) -> anyhow::Result<()> {
    match command {
        Command::Login(args) => login::login(args, context).await,
        Command::Whoami => login::whoami(context).await,
        Command::Org(command) => organizations::run(command, context).await,
        Command::Member(command) => members::run(command, context).await,
        Command::Key(command) => keys::run(command, context).await,
        Command::Pool(command) => pools::run(command, context).await,
        Command::Device(command) => devices::run(command, context).await,
        Command::Edge(command) => edges::run(command, context).await,
        Command::Domain(command) => domains::run(command, context).await,
        Command::Ca => edges::ca(context).await,
        Command::App(command) => applications::run(command, context).await,
        Command::Placement(command) => placements::run(command, context).await,
        Command::Migration(command) => migrations::run(command, context).await,
        Command::Stack(command) => stack::run(command, context).await,
        Command::Logs(args) => reports::logs(args, context).await,
        Command::Events(args) => reports::events(args, context).await,
        Command::Usage(args) => usage::usage(args, context).await,
    }
}

/// The error and its causes on one line, without Debug output or a backtrace. Some errors
/// repeat their source's text in their own message (reqwest's and the client's do); a cause
/// already shown is not shown again.
fn render_error(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Logs go to stderr, quiet unless `RUST_LOG` asks for more, so stdout stays parseable.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot reach the server: {0}")]
        struct Outer(#[source] std::io::Error);

        let error = anyhow::Error::new(Outer(std::io::Error::other("refused"))).context("listing applications");
        assert_eq!(render_error(&error), "listing applications: cannot reach the server: refused");
    }

    #[test]
    fn edge_endpoints_are_checked_when_parsed() {
        let cli = Cli::try_parse_from([
            "edgible",
            "edge",
            "create",
            "gw",
            "--pool",
            "home",
            "--endpoint",
            "203.0.113.1:51820",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        let error =
            Cli::try_parse_from(["edgible", "edge", "create", "gw", "--pool", "home", "--endpoint", "203.0.113.1"])
                .expect_err("no port");
        assert!(error.to_string().contains("host:port"), "{error}");
    }

    #[test]
    fn domains_are_plain_hostnames() {
        assert!(Cli::try_parse_from(["edgible", "domain", "create", "example.com"]).is_ok());
        assert!(Cli::try_parse_from(["edgible", "domain", "create", "Not A Domain"]).is_err());
        assert!(Cli::try_parse_from(["edgible", "domain", "verify", "example.com"]).is_ok());
    }

    #[test]
    fn passwords_never_come_from_the_command_line() {
        assert!(Cli::try_parse_from(["edgible", "member", "set-password", "ana@example.test"]).is_ok());
        assert!(
            Cli::try_parse_from(["edgible", "member", "set-password", "ana@example.test", "--password-stdin"]).is_ok()
        );
        for flag in ["--password", "-p"] {
            let argv = ["edgible", "member", "set-password", "ana@example.test", flag, "hunter2hunter2"];
            assert!(Cli::try_parse_from(argv).is_err(), "{flag} must not exist");
        }
        let argv = ["edgible", "member", "set-password", "ana@example.test", "hunter2hunter2"];
        assert!(Cli::try_parse_from(argv).is_err(), "no positional password");
    }

    #[test]
    fn application_keys_and_short_codes_parse() {
        let cli = Cli::try_parse_from([
            "edgible",
            "app",
            "key",
            "create",
            "web",
            "ci",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        assert!(Cli::try_parse_from(["edgible", "app", "key", "create", "web", "ci", "--expires-at", "soon"]).is_err());
        assert!(Cli::try_parse_from(["edgible", "app", "key", "create", "web", "Not A Name"]).is_err());
        assert!(Cli::try_parse_from(["edgible", "app", "key", "list", "web"]).is_ok());
        assert!(Cli::try_parse_from(["edgible", "app", "key", "delete", "web", "ci"]).is_ok());
        assert!(Cli::try_parse_from(["edgible", "app", "short-code", "web"]).is_ok());
        assert!(Cli::try_parse_from(["edgible", "app", "short-code", "web", "--rotate"]).is_ok());
        assert!(Cli::try_parse_from(["edgible", "key", "create", "robot", "--scope", "access"]).is_ok());
    }

    #[test]
    fn migrations_take_a_target_and_a_timeout() {
        let argv = ["edgible", "app", "migrate", "web", "--to", "cloud:eu-west", "--timeout", "120", "--no-wait"];
        let cli = Cli::try_parse_from(argv);
        assert!(cli.is_ok(), "{cli:?}");
        assert!(Cli::try_parse_from(["edgible", "app", "migrate", "web", "--to", "dev2", "--timeout", "5m"]).is_ok());
        assert!(Cli::try_parse_from(["edgible", "app", "migrate", "web"]).is_err(), "--to is required");
        let error =
            Cli::try_parse_from(["edgible", "app", "migrate", "web", "--to", "rack:dev2"]).expect_err("bad kind");
        assert!(error.to_string().contains("cloud:REGION"), "{error}");
        assert!(
            Cli::try_parse_from(["edgible", "app", "migrate", "web", "--to", "dev2", "--timeout", "soon"]).is_err()
        );
        assert!(Cli::try_parse_from(["edgible", "app", "migrations", "web"]).is_ok());
        let id = edgible::model::MigrationId::new().to_string();
        assert!(Cli::try_parse_from(["edgible", "migration", "get", &id]).is_ok());
        assert!(Cli::try_parse_from(["edgible", "migration", "get", "web"]).is_err(), "an id, not a name");
    }

    #[test]
    fn output_is_a_global_flag() {
        let cli = Cli::try_parse_from(["edgible", "app", "list", "-o", "json"]).unwrap();
        assert_eq!(cli.format, Format::Json);
        let cli = Cli::try_parse_from(["edgible", "-o", "json", "pool", "get", "home"]).unwrap();
        assert_eq!(cli.format, Format::Json);
    }
}
