//! `edgible pool ...`

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use edgible::model::{DevicePool, DevicePoolSpec, Name, PoolKind, Region, TunnelCidr, Validate};

use crate::Context;
use crate::output::{Details, Format, Table, optional, print_json};
use crate::resolve::resolve;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// List device pools.
    List,
    /// Show a device pool.
    Get {
        /// Name or id.
        pool: String,
    },
    /// Create a device pool.
    Create {
        name: Name,
        /// The IPv4 network tunnel addresses are taken from, such as 100.96.0.0/16.
        #[arg(long)]
        cidr: TunnelCidr,
        /// `devices` for hardware users own, `cloud` for operator cloud hosts.
        #[arg(long, value_enum, default_value_t = KindArg::Devices)]
        kind: KindArg,
        /// The region of the pool's hosts (required for cloud pools).
        #[arg(long)]
        region: Option<Region>,
    },
    /// Delete a device pool (it must have no devices).
    Delete {
        /// Name or id.
        pool: String,
    },
}

/// A [`PoolKind`] as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Devices,
    Cloud,
}

impl From<KindArg> for PoolKind {
    fn from(kind: KindArg) -> PoolKind {
        match kind {
            KindArg::Devices => PoolKind::Devices,
            KindArg::Cloud => PoolKind::Cloud,
        }
    }
}

pub fn kind_name(kind: PoolKind) -> &'static str {
    match kind {
        PoolKind::Devices => "devices",
        PoolKind::Cloud => "cloud",
    }
}

pub async fn run(command: PoolCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        PoolCommand::List => {
            let pools = client.list_all::<DevicePool>().await.context("listing device pools")?;
            match context.format {
                Format::Json => print_json(&pools)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "CIDR", "KIND", "REGION"]);
                    for pool in &pools {
                        table.row(vec![
                            pool.spec.name.to_string(),
                            pool.id.to_string(),
                            pool.spec.tunnel_cidr.to_string(),
                            kind_name(pool.spec.kind).to_owned(),
                            optional(pool.spec.region.as_ref()),
                        ]);
                    }
                    table.print();
                }
            }
        }
        PoolCommand::Get { pool } => {
            let pool = resolve::<DevicePool>(&client, &pool).await?;
            match context.format {
                Format::Json => print_json(&pool)?,
                Format::Table => Details::new()
                    .field("name", &pool.spec.name)
                    .field("id", pool.id)
                    .field("tunnel cidr", pool.spec.tunnel_cidr)
                    .field("kind", kind_name(pool.spec.kind))
                    .field("region", optional(pool.spec.region.as_ref()))
                    .field("revision", pool.revision)
                    .field("created", pool.created_at.to_rfc3339())
                    .print(),
            }
        }
        PoolCommand::Create { name, cidr, kind, region } => {
            let spec = DevicePoolSpec { name: name.clone(), tunnel_cidr: cidr, kind: kind.into(), region };
            spec.validate().with_context(|| format!("invalid device pool {name}"))?;
            let pool: DevicePool =
                client.create::<DevicePool>(&spec).await.with_context(|| format!("creating device pool {name}"))?;
            match context.format {
                Format::Json => print_json(&pool)?,
                Format::Table => println!("Created device pool {name} ({}) for {}.", pool.id, pool.spec.tunnel_cidr),
            }
        }
        PoolCommand::Delete { pool } => {
            let pool = resolve::<DevicePool>(&client, &pool).await?;
            client
                .delete::<DevicePool>(&pool.id)
                .await
                .with_context(|| format!("deleting device pool {}", pool.spec.name))?;
            println!("Deleted device pool {} ({}).", pool.spec.name, pool.id);
        }
    }
    Ok(())
}
