//! `edgible device ...`

use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::Subcommand;
use edgible::model::{
    Device, DeviceCreated, DevicePool, DevicePoolId, DeviceSpec, DeviceState, LabelKey, Name, Validate,
};

use crate::Context;
use crate::output::{Details, Format, Table, list, optional, print_json};
use crate::resolve::resolve;

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List devices.
    List,
    /// Show a device.
    Get {
        /// Name or id.
        device: String,
    },
    /// Create a device and print its one-time enrollment token.
    Create {
        name: Name,
        /// The pool (name or id) whose network the device's tunnel address comes from.
        #[arg(long)]
        pool: String,
        /// A label as key=value; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(LabelKey, String)>,
    },
    /// Delete a device (it must have no placements).
    Delete {
        /// Name or id.
        device: String,
    },
}

fn parse_label(text: &str) -> Result<(LabelKey, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not key=value"))?;
    let key = key.parse::<LabelKey>().map_err(|error| error.message)?;
    Ok((key, value.to_owned()))
}

pub fn state_name(state: DeviceState) -> &'static str {
    match state {
        DeviceState::Pending => "pending",
        DeviceState::Online => "online",
        DeviceState::Offline => "offline",
    }
}

pub async fn run(command: DeviceCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        DeviceCommand::List => {
            let (devices, pools) = tokio::try_join!(client.list_all::<Device>(), client.list_all::<DevicePool>())
                .context("listing devices")?;
            match context.format {
                Format::Json => print_json(&devices)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "POOL", "ADDRESS", "STATE", "APPLIED", "LABELS"]);
                    for device in &devices {
                        table.row(vec![
                            device.spec.name.to_string(),
                            device.id.to_string(),
                            pool_name(&pools, device.spec.pool_id),
                            device.status.tunnel_address.to_string(),
                            state_name(device.status.state).to_owned(),
                            optional(device.status.applied_revision),
                            list(device.spec.labels.iter().map(|(key, value)| format!("{key}={value}"))),
                        ]);
                    }
                    table.print();
                }
            }
        }
        DeviceCommand::Get { device } => {
            let device = resolve::<Device>(&client, &device).await?;
            match context.format {
                Format::Json => print_json(&device)?,
                Format::Table => {
                    let pools = client.list_all::<DevicePool>().await.context("listing device pools")?;
                    let status = &device.status;
                    Details::new()
                        .field("name", &device.spec.name)
                        .field("id", device.id)
                        .field("pool", pool_name(&pools, device.spec.pool_id))
                        .field("labels", list(device.spec.labels.iter().map(|(key, value)| format!("{key}={value}"))))
                        .field("tunnel address", status.tunnel_address)
                        .field("state", state_name(status.state))
                        .field("public key", optional(status.public_key.as_ref()))
                        .field("applied revision", optional(status.applied_revision))
                        .field("last seen", optional(status.last_seen_at.map(|at| at.to_rfc3339())))
                        .field(
                            "cloud host",
                            optional(status.cloud_host.map(|capacity| {
                                format!(
                                    "{} vCPU, {} MiB memory, {} MiB disk",
                                    capacity.vcpus, capacity.memory_mib, capacity.disk_mib
                                )
                            })),
                        )
                        .field("revision", device.revision)
                        .field("created", device.created_at.to_rfc3339())
                        .print();
                }
            }
        }
        DeviceCommand::Create { name, pool, labels } => {
            let pool = resolve::<DevicePool>(&client, &pool).await?;
            let spec = DeviceSpec {
                name: name.clone(),
                pool_id: pool.id,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
            };
            spec.validate().with_context(|| format!("invalid device {name}"))?;
            let created: DeviceCreated =
                client.create::<Device>(&spec).await.with_context(|| format!("creating device {name}"))?;
            match context.format {
                Format::Json => print_json(&created)?,
                Format::Table => {
                    let server = client.endpoint().trim_end_matches('/');
                    println!(
                        "Created device {name} ({}) in pool {}, tunnel address {}.",
                        created.device.id, pool.spec.name, created.device.status.tunnel_address
                    );
                    println!(
                        "Enrollment token (shown only this once, valid until {}):",
                        created.enrollment_expires_at.to_rfc3339()
                    );
                    println!("  {}", created.enrollment_token);
                    println!("To enroll the device, run on it:");
                    println!("  edgible-agent enroll --server {server} --token {}", created.enrollment_token);
                }
            }
        }
        DeviceCommand::Delete { device } => {
            let device = resolve::<Device>(&client, &device).await?;
            client
                .delete::<Device>(&device.id)
                .await
                .with_context(|| format!("deleting device {}", device.spec.name))?;
            println!("Deleted device {} ({}).", device.spec.name, device.id);
        }
    }
    Ok(())
}

fn pool_name(pools: &[DevicePool], id: DevicePoolId) -> String {
    pools.iter().find(|pool| pool.id == id).map(|pool| pool.spec.name.to_string()).unwrap_or_else(|| id.to_string())
}
