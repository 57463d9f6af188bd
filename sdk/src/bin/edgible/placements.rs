//! `edgible placement ...`. An application has at most one placement, so a placement is
//! referenced by its application's name or id as well as by its own id.

use anyhow::Context as _;
use clap::{ArgGroup, Subcommand};
use edgible::Client;
use edgible::model::{
    Application, ApplicationId, Device, DeviceId, DevicePool, Placement, PlacementId, PlacementSpec, Region, Validate,
};

use crate::Context;
use crate::output::{Details, Format, Table, print_json};
use crate::resolve::{ResolveError, resolve};

#[derive(Debug, Subcommand)]
pub enum PlacementCommand {
    /// List placements.
    List,
    /// Show a placement.
    Get {
        /// The placement's id, or its application's name or id.
        placement: String,
    },
    /// Place an application on a device, or in the cloud by pool or region.
    #[command(group(ArgGroup::new("target").required(true).multiple(true).args(["device", "pool", "region"])))]
    Create {
        /// The application (name or id).
        #[arg(long = "app")]
        application: String,
        /// Run on this device (name or id).
        #[arg(long, conflicts_with_all = ["cloud", "pool", "region"])]
        device: Option<String>,
        /// Run on an operator cloud host; give --pool, --region or both.
        #[arg(long)]
        cloud: bool,
        /// The cloud pool (name or id) to choose the host from.
        #[arg(long)]
        pool: Option<String>,
        /// The region to choose the host from.
        #[arg(long)]
        region: Option<Region>,
    },
    /// Delete a placement: the application stops running.
    Delete {
        /// The placement's id, or its application's name or id.
        placement: String,
    },
}

pub async fn run(command: PlacementCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        PlacementCommand::List => {
            let (placements, applications, devices, pools) = tokio::try_join!(
                client.list_all::<Placement>(),
                client.list_all::<Application>(),
                client.list_all::<Device>(),
                client.list_all::<DevicePool>(),
            )
            .context("listing placements")?;
            match context.format {
                Format::Json => print_json(&placements)?,
                Format::Table => {
                    let mut table = Table::new(&["APPLICATION", "ID", "STRATEGY", "TARGET", "HOST", "REVISION"]);
                    for placement in &placements {
                        table.row(vec![
                            application_name(&applications, placement.spec.application_id()),
                            placement.id.to_string(),
                            placement.spec.strategy().to_owned(),
                            describe_placement(&placement.spec, &devices, &pools),
                            describe_host(placement.host, &devices),
                            placement.revision.to_string(),
                        ]);
                    }
                    table.print();
                }
            }
        }
        PlacementCommand::Get { placement } => {
            let placement = resolve_placement(&client, &placement).await?;
            match context.format {
                Format::Json => print_json(&placement)?,
                Format::Table => {
                    let (applications, devices, pools) = tokio::try_join!(
                        client.list_all::<Application>(),
                        client.list_all::<Device>(),
                        client.list_all::<DevicePool>(),
                    )
                    .context("looking up the placement's targets")?;
                    Details::new()
                        .field("id", placement.id)
                        .field("application", application_name(&applications, placement.spec.application_id()))
                        .field("strategy", placement.spec.strategy())
                        .field("target", describe_placement(&placement.spec, &devices, &pools))
                        .field("host", describe_host(placement.host, &devices))
                        .field(
                            "migrating",
                            match placement.migration_id {
                                Some(id) => format!("yes: `edgible migration get {id}`"),
                                None => "no".to_owned(),
                            },
                        )
                        .field("revision", placement.revision)
                        .field("created", placement.created_at.to_rfc3339())
                        .field("updated", placement.updated_at.to_rfc3339())
                        .print();
                }
            }
        }
        PlacementCommand::Create { application, device, cloud: _, pool, region } => {
            let application = resolve::<Application>(&client, &application).await?;
            let spec = match device {
                Some(device) => {
                    let device = resolve::<Device>(&client, &device).await?;
                    PlacementSpec::ServingDevice { application_id: application.id, device_id: device.id }
                }
                None => {
                    let pool_id = match pool {
                        Some(pool) => Some(resolve::<DevicePool>(&client, &pool).await?.id),
                        None => None,
                    };
                    PlacementSpec::Cloud { application_id: application.id, pool_id, region }
                }
            };
            let name = &application.spec.name;
            spec.validate().with_context(|| format!("invalid placement of {name}"))?;
            let placement: Placement =
                client.create::<Placement>(&spec).await.with_context(|| format!("placing application {name}"))?;
            match context.format {
                Format::Json => print_json(&placement)?,
                Format::Table => {
                    println!("Placed application {name} ({}): {}.", placement.id, placement.spec.strategy())
                }
            }
        }
        PlacementCommand::Delete { placement } => {
            let placement = resolve_placement(&client, &placement).await?;
            client
                .delete::<Placement>(&placement.id)
                .await
                .with_context(|| format!("deleting placement {}", placement.id))?;
            println!("Deleted placement {}.", placement.id);
        }
    }
    Ok(())
}

/// The placement with id `reference`, or the placement of the application it names.
async fn resolve_placement(client: &Client, reference: &str) -> anyhow::Result<Placement> {
    if let Ok(id) = reference.parse::<PlacementId>() {
        match client.get::<Placement>(&id).await {
            Ok(placement) => return Ok(placement),
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(anyhow::Error::new(error).context(format!("looking up placement {id}"))),
        }
    }
    let application = match resolve::<Application>(client, reference).await {
        Ok(application) => application,
        Err(ResolveError::NotFound { .. }) => {
            anyhow::bail!("no placement has the id {reference:?} and no application is named {reference:?}")
        }
        Err(error) => return Err(error.into()),
    };
    let placements = client.list_all::<Placement>().await.context("listing placements")?;
    placements
        .into_iter()
        .find(|placement| placement.spec.application_id() == application.id)
        .with_context(|| format!("application {} has no placement", application.spec.name))
}

/// Where a placement runs, with names instead of ids where they are known: `device dev1`,
/// `cloud pool eu`, `cloud region eu-west`.
pub fn describe_placement(spec: &PlacementSpec, devices: &[Device], pools: &[DevicePool]) -> String {
    match spec {
        PlacementSpec::ServingDevice { device_id, .. } => {
            let device = devices.iter().find(|device| device.id == *device_id);
            format!(
                "device {}",
                device.map(|device| device.spec.name.to_string()).unwrap_or_else(|| device_id.to_string())
            )
        }
        PlacementSpec::Cloud { pool_id, region, .. } => {
            let pool = pool_id.map(|pool_id| {
                let pool = pools.iter().find(|pool| pool.id == pool_id);
                pool.map(|pool| pool.spec.name.to_string()).unwrap_or_else(|| pool_id.to_string())
            });
            match (pool, region) {
                (Some(pool), Some(region)) => format!("cloud pool {pool} in region {region}"),
                (Some(pool), None) => format!("cloud pool {pool}"),
                (None, Some(region)) => format!("cloud region {region}"),
                (None, None) => "cloud".to_owned(),
            }
        }
    }
}

/// The device a placement runs on: its name if it is one of the organization's devices, else
/// its id (an operator's cloud host, which the organization cannot read), `-` if none.
fn describe_host(host: Option<DeviceId>, devices: &[Device]) -> String {
    match host {
        Some(host) => match devices.iter().find(|device| device.id == host) {
            Some(device) => device.spec.name.to_string(),
            None => host.to_string(),
        },
        None => "-".to_owned(),
    }
}

fn application_name(applications: &[Application], id: ApplicationId) -> String {
    applications
        .iter()
        .find(|application| application.id == id)
        .map(|application| application.spec.name.to_string())
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str) -> Device {
        let json = serde_json::json!({
            "id": DeviceId::new(),
            "organization_id": edgible::model::OrganizationId::new(),
            "revision": 1,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "spec": {"name": name, "pool_id": edgible::model::DevicePoolId::new()},
            "status": {"tunnel_address": "100.96.0.1", "state": "online"}
        });
        serde_json::from_value(json).expect("a valid test device")
    }

    #[test]
    fn hosts_are_named_when_the_organization_can_read_them() {
        let laptop = device("laptop");
        let cloud_host = DeviceId::new();
        assert_eq!(describe_host(Some(laptop.id), std::slice::from_ref(&laptop)), "laptop");
        assert_eq!(describe_host(Some(cloud_host), &[laptop]), cloud_host.to_string(), "an operator's host");
        assert_eq!(describe_host(None, &[]), "-");
    }
}
