//! `edgible app ...`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use edgible::model::{
    AccessPolicy, Application, ApplicationSpec, ContainerWorkload, Device, DevicePool, EnvName, Hostname, Name,
    Placement, ProcessWorkload, Validate, ValidationError, Workload, parse_json,
};

use crate::Context;
use crate::access::{AppKeyCommand, access_summary};
use crate::output::{Details, Format, Table, list, optional, print_json};
use crate::placements::describe_placement;
use crate::resolve::resolve;

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// List applications.
    List,
    /// Show an application.
    Get {
        /// Name or id.
        application: String,
    },
    /// Create an application from flags, or from a full spec with --from-file.
    Create(Box<CreateArgs>),
    /// Delete an application (and its placement).
    Delete {
        /// Name or id.
        application: String,
    },
    /// Show what the application's device last reported: phase, message, revision; and who
    /// may reach it.
    Status {
        /// Name or id.
        application: String,
    },
    /// Move the application to another device or to the cloud, with its movable volumes, and
    /// follow the migration phase by phase until it ends.
    Migrate(crate::migrations::MigrateArgs),
    /// List the application's migrations, newest first.
    Migrations {
        /// Name or id.
        application: String,
    },
    /// Keys that let requests through the application's api_key access policy.
    #[command(subcommand)]
    Key(AppKeyCommand),
    /// Show the code visitors enter to pass the application's short_code access policy.
    ShortCode {
        /// Name or id.
        application: String,
        /// Replace a generated code with a new one first; sessions made with the old one end.
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The application's name (overrides the name in --from-file).
    #[arg(required_unless_present = "from_file")]
    name: Option<Name>,
    /// A public hostname; repeat for several.
    #[arg(long = "hostname", value_name = "HOSTNAME", required_unless_present = "from_file")]
    hostnames: Vec<Hostname>,
    /// The port the workload listens on.
    #[arg(long, required_unless_present = "from_file")]
    port: Option<u16>,
    /// Run this program as a process workload.
    #[arg(long, required_unless_present_any = ["image", "from_file"], conflicts_with = "image")]
    command: Option<String>,
    /// An argument of --command; repeat for several.
    #[arg(long = "arg", value_name = "ARG", requires = "command", allow_hyphen_values = true)]
    args: Vec<String>,
    /// Run this container image (its --port is published on the device's loopback).
    #[arg(long)]
    image: Option<String>,
    /// An environment variable as KEY=VALUE; repeat for several.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(EnvName, String)>,
    /// Read the full application spec from a .json or .yaml file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["hostnames", "port", "command", "args", "image", "env"])]
    from_file: Option<PathBuf>,
}

fn parse_env(text: &str) -> Result<(EnvName, String), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let name = name.parse::<EnvName>().map_err(|error| error.message)?;
    Ok((name, value.to_owned()))
}

pub async fn run(command: AppCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        AppCommand::List => {
            let (applications, placements, devices, pools) = tokio::try_join!(
                client.list_all::<Application>(),
                client.list_all::<Placement>(),
                client.list_all::<Device>(),
                client.list_all::<DevicePool>(),
            )
            .context("listing applications")?;
            match context.format {
                Format::Json => print_json(&applications)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "HOSTNAMES", "PORT", "WORKLOAD", "PLACEMENT"]);
                    for application in &applications {
                        let placement =
                            placements.iter().find(|placement| placement.spec.application_id() == application.id);
                        table.row(vec![
                            application.spec.name.to_string(),
                            application.id.to_string(),
                            list(&application.spec.hostnames),
                            application.spec.port.to_string(),
                            workload_summary(&application.spec.workload),
                            optional(placement.map(|placement| describe_placement(&placement.spec, &devices, &pools))),
                        ]);
                    }
                    table.print();
                }
            }
        }
        AppCommand::Get { application } => {
            let application = resolve::<Application>(&client, &application).await?;
            match context.format {
                Format::Json => print_json(&application)?,
                Format::Table => {
                    let (placements, devices, pools) = tokio::try_join!(
                        client.list_all::<Placement>(),
                        client.list_all::<Device>(),
                        client.list_all::<DevicePool>(),
                    )
                    .context("looking up the application's placement")?;
                    let placement =
                        placements.iter().find(|placement| placement.spec.application_id() == application.id);
                    let spec = &application.spec;
                    Details::new()
                        .field("name", &spec.name)
                        .field("id", application.id)
                        .field("hostnames", list(&spec.hostnames))
                        .field("port", spec.port)
                        .field("workload", workload_summary(&spec.workload))
                        .field("env", list(spec.env.keys()))
                        .field("access", access_summary(&spec.access))
                        .field("placement", optional(placement.map(|p| describe_placement(&p.spec, &devices, &pools))))
                        .field("revision", application.revision)
                        .field("created", application.created_at.to_rfc3339())
                        .field("updated", application.updated_at.to_rfc3339())
                        .print();
                }
            }
        }
        AppCommand::Create(args) => {
            let spec = spec_from_args(*args)?;
            let name = spec.name.clone();
            let application: Application =
                client.create::<Application>(&spec).await.with_context(|| format!("creating application {name}"))?;
            match context.format {
                Format::Json => print_json(&application)?,
                Format::Table => println!(
                    "Created application {name} ({}) at {}.",
                    application.id,
                    list(&application.spec.hostnames)
                ),
            }
        }
        AppCommand::Delete { application } => {
            let application = resolve::<Application>(&client, &application).await?;
            client
                .delete::<Application>(&application.id)
                .await
                .with_context(|| format!("deleting application {}", application.spec.name))?;
            println!("Deleted application {} ({}).", application.spec.name, application.id);
        }
        AppCommand::Status { application } => crate::reports::app_status(&client, &application, context).await?,
        AppCommand::Migrate(args) => crate::migrations::migrate(&client, args, context).await?,
        AppCommand::Migrations { application } => crate::migrations::list(&client, &application, context).await?,
        AppCommand::Key(command) => crate::access::run_key(command, context).await?,
        AppCommand::ShortCode { application, rotate } => {
            crate::access::short_code(&client, &application, rotate, context).await?
        }
    }
    Ok(())
}

/// The spec `app create` sends, validated here so that mistakes are caught before the request.
fn spec_from_args(args: CreateArgs) -> anyhow::Result<ApplicationSpec> {
    if let Some(path) = &args.from_file {
        let mut spec = read_spec_file(path)?;
        if let Some(name) = args.name {
            spec.name = name;
        }
        return Ok(spec);
    }
    // clap enforces these when --from-file is absent; the errors are for the impossible case.
    let name = args.name.context("the application needs a NAME")?;
    let port = args.port.context("the application needs --port")?;
    let workload = match (args.command, args.image) {
        (Some(command), None) => {
            Workload::Process(ProcessWorkload { command, args: args.args, env: BTreeMap::new(), working_dir: None })
        }
        (None, Some(image)) => {
            Workload::Container(ContainerWorkload { image, env: BTreeMap::new(), ports: vec![port] })
        }
        _ => anyhow::bail!("give either --command or --image"),
    };
    let spec = ApplicationSpec {
        name,
        hostnames: args.hostnames,
        workload,
        port,
        env: args.env.into_iter().collect(),
        health_check: None,
        access: AccessPolicy::default(),
        storage: Vec::new(),
        sleep: None,
        resources: None,
        protocol: Default::default(),
    };
    spec.validate().with_context(|| format!("invalid application {}", spec.name))?;
    Ok(spec)
}

/// Reads an application spec from JSON or YAML (by extension; by content otherwise), with the
/// same checks the server applies.
fn read_spec_file(path: &Path) -> anyhow::Result<ApplicationSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let extension = path.extension().and_then(|extension| extension.to_str()).unwrap_or_default();
    let is_json = match extension {
        "json" => true,
        "yaml" | "yml" => false,
        _ => text.trim_start().starts_with('{'),
    };
    let parsed: Result<ApplicationSpec, ValidationError> = if is_json {
        parse_json(text.as_bytes())
    } else {
        let value: serde_json::Value =
            serde_yaml::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))?;
        let json = serde_json::to_vec(&value).with_context(|| format!("converting {}", path.display()))?;
        parse_json(&json)
    };
    parsed.with_context(|| format!("invalid application spec in {}", path.display()))
}

pub fn workload_summary(workload: &Workload) -> String {
    match workload {
        Workload::Process(process) if process.args.is_empty() => format!("process {}", process.command),
        Workload::Process(process) => format!("process {} {}", process.command, process.args.join(" ")),
        Workload::Container(container) => format!("container {}", container.image),
        Workload::Vm(vm) => match (&vm.image, &vm.kernel) {
            (Some(image), _) => format!("vm {image}"),
            (None, Some(kernel)) => format!("vm {kernel}"),
            (None, None) => "vm".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn parse(argv: &[&str]) -> Result<CreateArgs, clap::Error> {
        Harness::try_parse_from(std::iter::once("create").chain(argv.iter().copied())).map(|harness| harness.args)
    }

    #[test]
    fn flags_build_a_process_spec() {
        let args = parse(&[
            "web",
            "--hostname",
            "web.example.test",
            "--port",
            "8080",
            "--command",
            "python3",
            "--arg",
            "-m",
            "--arg",
            "http.server",
            "--env",
            "MODE=prod",
        ])
        .unwrap();
        let spec = spec_from_args(args).unwrap();
        assert_eq!(spec.name.as_str(), "web");
        let Workload::Process(process) = &spec.workload else { panic!("expected a process: {spec:?}") };
        assert_eq!(process.args, ["-m", "http.server"]);
        assert_eq!(spec.env.get(&"MODE".parse::<EnvName>().unwrap()).map(String::as_str), Some("prod"));
    }

    #[test]
    fn a_workload_is_required_and_only_one() {
        assert!(parse(&["web", "--hostname", "web.example.test", "--port", "8080"]).is_err());
        assert!(
            parse(&["web", "--hostname", "w.example.test", "--port", "1", "--command", "x", "--image", "y"]).is_err()
        );
        assert!(parse(&["web", "--hostname", "Bad.example.test", "--port", "1", "--image", "y"]).is_err());
    }

    #[test]
    fn a_spec_file_may_be_yaml_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.yaml");
        std::fs::write(
            &path,
            "name: web\nhostnames: [web.example.test]\nport: 80\nworkload:\n  container:\n    image: nginx\n",
        )
        .unwrap();
        let spec = spec_from_args(parse(&["--from-file", path.to_str().unwrap()]).unwrap()).unwrap();
        assert_eq!(spec.name.as_str(), "web");
        let renamed = spec_from_args(parse(&["other", "--from-file", path.to_str().unwrap()]).unwrap()).unwrap();
        assert_eq!(renamed.name.as_str(), "other");

        let path = dir.path().join("app.json");
        std::fs::write(&path, r#"{"name": "web", "hostnames": ["web.example.test"], "port": 0, "workload": {"process": {"command": "x"}}}"#)
            .unwrap();
        let error = spec_from_args(parse(&["--from-file", path.to_str().unwrap()]).unwrap()).unwrap_err();
        assert!(format!("{error:#}").contains("port: must be 1-65535"), "{error:#}");
    }
}
