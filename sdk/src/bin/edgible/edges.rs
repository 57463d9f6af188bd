//! `edgible edge ...` and `edgible ca`.

use anyhow::Context as _;
use clap::Subcommand;
use edgible::Client;
use edgible::model::{DevicePool, DevicePoolId, Edge, EdgeCreated, EdgeEndpoint, EdgeSpec, Name, Validate};

use crate::Context;
use crate::devices::state_name;
use crate::output::{Details, Format, Table, optional, print_json};
use crate::resolve::resolve;

#[derive(Debug, Subcommand)]
pub enum EdgeCommand {
    /// List edges.
    List,
    /// Show an edge.
    Get {
        /// Name or id.
        edge: String,
    },
    /// Create an edge for a pool and print its one-time enrollment token.
    Create {
        name: Name,
        /// The pool (name or id) the edge serves; its tunnel address comes from the pool's network.
        #[arg(long)]
        pool: String,
        /// Where devices send WireGuard datagrams: host:port of the edge's UDP socket, e.g.
        /// 203.0.113.1:51820.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: EdgeEndpoint,
    },
    /// Delete an edge.
    Delete {
        /// Name or id.
        edge: String,
    },
}

pub async fn run(command: EdgeCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        EdgeCommand::List => {
            let (edges, pools) = tokio::try_join!(client.list_all::<Edge>(), client.list_all::<DevicePool>())
                .context("listing edges")?;
            match context.format {
                Format::Json => print_json(&edges)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "POOL", "ENDPOINT", "ADDRESS", "STATE", "APPLIED"]);
                    for edge in &edges {
                        table.row(vec![
                            edge.spec.name.to_string(),
                            edge.id.to_string(),
                            pool_name(&pools, edge.spec.pool_id),
                            edge.spec.endpoint.to_string(),
                            edge.status.tunnel_address.to_string(),
                            state_name(edge.status.state).to_owned(),
                            optional(edge.status.applied_revision),
                        ]);
                    }
                    table.print();
                }
            }
        }
        EdgeCommand::Get { edge } => {
            let edge = resolve::<Edge>(&client, &edge).await?;
            match context.format {
                Format::Json => print_json(&edge)?,
                Format::Table => {
                    let pools = client.list_all::<DevicePool>().await.context("listing device pools")?;
                    let status = &edge.status;
                    Details::new()
                        .field("name", &edge.spec.name)
                        .field("id", edge.id)
                        .field("pool", pool_name(&pools, edge.spec.pool_id))
                        .field("endpoint", &edge.spec.endpoint)
                        .field("tunnel address", status.tunnel_address)
                        .field("state", state_name(status.state))
                        .field("public key", optional(status.public_key.as_ref()))
                        .field("applied revision", optional(status.applied_revision))
                        .field("last seen", optional(status.last_seen_at.map(|at| at.to_rfc3339())))
                        .field("revision", edge.revision)
                        .field("created", edge.created_at.to_rfc3339())
                        .print();
                }
            }
        }
        EdgeCommand::Create { name, pool, endpoint } => {
            let pool = resolve::<DevicePool>(&client, &pool).await?;
            let spec = EdgeSpec { name: name.clone(), pool_id: pool.id, endpoint };
            spec.validate().with_context(|| format!("invalid edge {name}"))?;
            let created: EdgeCreated =
                client.create::<Edge>(&spec).await.with_context(|| format!("creating edge {name}"))?;
            match context.format {
                Format::Json => print_json(&created)?,
                Format::Table => {
                    let server = client.endpoint().trim_end_matches('/');
                    println!(
                        "Created edge {name} ({}) for pool {}, tunnel address {}.",
                        created.edge.id, pool.spec.name, created.edge.status.tunnel_address
                    );
                    println!(
                        "Enrollment token (shown only this once, valid until {}):",
                        created.enrollment_expires_at.to_rfc3339()
                    );
                    println!("  {}", created.enrollment_token);
                    println!("To enroll the edge, run on it:");
                    println!(
                        "  edgible-edge enroll --server {server} --token {} --state-dir DIR",
                        created.enrollment_token
                    );
                }
            }
        }
        EdgeCommand::Delete { edge } => {
            let edge = resolve::<Edge>(&client, &edge).await?;
            client.delete::<Edge>(&edge.id).await.with_context(|| format!("deleting edge {}", edge.spec.name))?;
            println!("Deleted edge {} ({}).", edge.spec.name, edge.id);
        }
    }
    Ok(())
}

/// `edgible ca`: prints the server's internal CA certificate (PEM) to stdout, for clients to
/// trust (`curl --cacert`).
pub async fn ca(context: &Context) -> anyhow::Result<()> {
    let config = crate::config::load(context.env())?;
    let pem = Client::ca_pem(&config.endpoint)
        .await
        .with_context(|| format!("fetching the internal CA from {}", config.endpoint))?;
    print!("{pem}");
    Ok(())
}

fn pool_name(pools: &[DevicePool], id: DevicePoolId) -> String {
    pools.iter().find(|pool| pool.id == id).map(|pool| pool.spec.name.to_string()).unwrap_or_else(|| id.to_string())
}
