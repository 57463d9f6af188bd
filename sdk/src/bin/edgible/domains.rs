//! `edgible domain ...`: domains the organization proves it owns with a DNS TXT record, so that
//! its applications may use hostnames under them.

use anyhow::Context as _;
use clap::Subcommand;
use edgible::Client;
use edgible::model::{Domain, DomainId, DomainSpec, DomainState, Hostname, Validate};

use crate::Context;
use crate::output::{Details, Format, Table, optional, print_json};

#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// List the organization's domains.
    List,
    /// Show a domain and the TXT record that verifies it.
    Get {
        /// Domain name or id.
        domain: String,
    },
    /// Claim a domain and print the TXT record to publish before `edgible domain verify`.
    Create {
        /// The domain, e.g. example.com.
        name: Hostname,
    },
    /// Ask the server to look up the domain's TXT record now and mark it verified.
    Verify {
        /// Domain name or id.
        domain: String,
    },
    /// Delete a domain (refused while applications use names under a verified one).
    Delete {
        /// Domain name or id.
        domain: String,
    },
}

pub async fn run(command: DomainCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        DomainCommand::List => {
            let domains = client.list_all::<Domain>().await.context("listing domains")?;
            match context.format {
                Format::Json => print_json(&domains)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "STATE", "TXT RECORD", "VALUE"]);
                    for domain in &domains {
                        table.row(vec![
                            domain.spec.name.to_string(),
                            domain.id.to_string(),
                            state_name(domain.status.state).to_owned(),
                            domain.status.txt_record_name.clone(),
                            domain.status.txt_record_value.clone(),
                        ]);
                    }
                    table.print();
                }
            }
        }
        DomainCommand::Get { domain } => {
            let domain = resolve_domain(&client, &domain).await?;
            show(&domain, context.format)?;
        }
        DomainCommand::Create { name } => {
            let spec = DomainSpec { name: name.clone() };
            spec.validate().with_context(|| format!("invalid domain {name}"))?;
            let domain: Domain =
                client.create::<Domain>(&spec).await.with_context(|| format!("creating domain {name}"))?;
            match context.format {
                Format::Json => print_json(&domain)?,
                Format::Table => {
                    println!("Created domain {name} ({}), pending verification.", domain.id);
                    println!("Publish this DNS record, then run `edgible domain verify {name}`:");
                    println!("  {} TXT \"{}\"", domain.status.txt_record_name, domain.status.txt_record_value);
                }
            }
        }
        DomainCommand::Verify { domain } => {
            let domain = resolve_domain(&client, &domain).await?;
            let verified = client
                .verify_domain(&domain.id)
                .await
                .with_context(|| format!("verifying domain {}", domain.spec.name))?;
            match context.format {
                Format::Json => print_json(&verified)?,
                Format::Table => println!("Domain {} is verified.", verified.spec.name),
            }
        }
        DomainCommand::Delete { domain } => {
            let domain = resolve_domain(&client, &domain).await?;
            client
                .delete::<Domain>(&domain.id)
                .await
                .with_context(|| format!("deleting domain {}", domain.spec.name))?;
            println!("Deleted domain {} ({}).", domain.spec.name, domain.id);
        }
    }
    Ok(())
}

fn show(domain: &Domain, format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => print_json(domain)?,
        Format::Table => Details::new()
            .field("name", &domain.spec.name)
            .field("id", domain.id)
            .field("state", state_name(domain.status.state))
            .field("txt record", &domain.status.txt_record_name)
            .field("txt value", &domain.status.txt_record_value)
            .field("verified", optional(domain.status.verified_at.map(|at| at.to_rfc3339())))
            .field("revision", domain.revision)
            .field("created", domain.created_at.to_rfc3339())
            .print(),
    }
    Ok(())
}

pub fn state_name(state: DomainState) -> &'static str {
    match state {
        DomainState::Pending => "pending",
        DomainState::Verified => "verified",
    }
}

/// The domain `reference` names (a domain name) or whose id it is. Domain names have dots,
/// so they are not object names and the generic `resolve` does not apply.
async fn resolve_domain(client: &Client, reference: &str) -> anyhow::Result<Domain> {
    if let Ok(id) = reference.parse::<DomainId>() {
        match client.get::<Domain>(&id).await {
            Ok(domain) => return Ok(domain),
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(error).with_context(|| format!("looking up domain {reference:?}")),
        }
    }
    client
        .find_by_name::<Domain>(reference)
        .await
        .with_context(|| format!("looking up domain {reference:?}"))?
        .with_context(|| format!("no domain is named or has the id {reference:?}"))
}
