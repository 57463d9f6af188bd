//! `edgible org ...`

use anyhow::Context as _;
use clap::Subcommand;
use edgible::model::{Name, Organization, OrganizationCreated, OrganizationId, OrganizationSpec};

use crate::Context;
use crate::output::{Details, Format, Table, print_json};
use crate::resolve::resolve;

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// List organizations (a key sees its own).
    List,
    /// Show an organization.
    Get {
        /// Name or id.
        organization: String,
    },
    /// Create an organization and print its first admin key (needs a platform key).
    Create {
        name: Name,
        /// Make it an operator organization, whose cloud hosts run `cloud` placements.
        #[arg(long)]
        operator: bool,
    },
    /// Delete an organization (needs a platform key).
    Delete {
        /// Name or id.
        organization: String,
    },
}

pub async fn run(command: OrgCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        OrgCommand::List => {
            let organizations = client.list_all::<Organization>().await.context("listing organizations")?;
            match context.format {
                Format::Json => print_json(&organizations)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "REVISION", "CREATED"]);
                    for organization in &organizations {
                        table.row(vec![
                            organization.spec.name.to_string(),
                            organization.id.to_string(),
                            organization.revision.to_string(),
                            organization.created_at.to_rfc3339(),
                        ]);
                    }
                    table.print();
                }
            }
        }
        OrgCommand::Get { organization } => {
            let organization = resolve::<Organization>(&client, &organization).await?;
            match context.format {
                Format::Json => print_json(&organization)?,
                Format::Table => {
                    Details::new()
                        .field("name", &organization.spec.name)
                        .field("id", organization.id)
                        .field("operator", if organization.spec.operator { "yes" } else { "no" })
                        .field("revision", organization.revision)
                        .field("created", organization.created_at.to_rfc3339())
                        .field("updated", organization.updated_at.to_rfc3339())
                        .print();
                }
            }
        }
        OrgCommand::Create { name, operator } => {
            let spec = OrganizationSpec { name: name.clone(), operator };
            let created: OrganizationCreated =
                client.create::<Organization>(&spec).await.with_context(|| format!("creating organization {name}"))?;
            match context.format {
                Format::Json => print_json(&created)?,
                Format::Table => {
                    let server = client.endpoint().trim_end_matches('/');
                    println!("Created organization {name} ({}).", created.organization.id);
                    println!(
                        "Its admin key {} is shown only this once; store it safely:",
                        created.admin_key.api_key.spec.name
                    );
                    println!("  {}", created.admin_key.secret);
                    println!("To act as the new organization, run:");
                    println!("  edgible login --server {server} --key {}", created.admin_key.secret);
                }
            }
        }
        OrgCommand::Delete { organization } => {
            // A platform key may delete organizations it cannot read, so an id is used as is.
            let (id, label) = match organization.parse::<OrganizationId>() {
                Ok(id) => (id, id.to_string()),
                Err(_) => {
                    let found = resolve::<Organization>(&client, &organization).await?;
                    (found.id, format!("{} ({})", found.spec.name, found.id))
                }
            };
            client.delete::<Organization>(&id).await.with_context(|| format!("deleting organization {label}"))?;
            println!("Deleted organization {label}.");
        }
    }
    Ok(())
}
