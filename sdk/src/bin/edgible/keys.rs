//! `edgible key ...`

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Subcommand, ValueEnum};
use edgible::model::{ApiKey, ApiKeyCreated, ApiKeySpec, Name, Scope, Validate};

use crate::Context;
use crate::output::{Details, Format, Table, list, optional, print_json};
use crate::resolve::resolve;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the organization's API keys.
    List,
    /// Show an API key (never its secret).
    Get {
        /// Name or id.
        key: String,
    },
    /// Create an API key and print its secret, which is shown only this once.
    Create {
        name: Name,
        /// What the key may do; repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", value_enum, required = true)]
        scopes: Vec<ScopeArg>,
        /// When the key stops working (RFC 3339, such as 2030-01-01T00:00:00Z); never if absent.
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
    },
    /// Delete (revoke) an API key.
    Delete {
        /// Name or id.
        key: String,
    },
}

/// A [`Scope`] as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    Read,
    Write,
    Admin,
    Platform,
    /// Reach the organization's applications that accept API keys (and nothing else).
    Access,
}

impl From<ScopeArg> for Scope {
    fn from(scope: ScopeArg) -> Scope {
        match scope {
            ScopeArg::Read => Scope::Read,
            ScopeArg::Write => Scope::Write,
            ScopeArg::Admin => Scope::Admin,
            ScopeArg::Platform => Scope::Platform,
            ScopeArg::Access => Scope::Access,
        }
    }
}

pub fn scope_name(scope: &Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Write => "write",
        Scope::Admin => "admin",
        Scope::Platform => "platform",
        Scope::Access => "access",
    }
}

pub async fn run(command: KeyCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        KeyCommand::List => {
            let keys = client.list_all::<ApiKey>().await.context("listing API keys")?;
            match context.format {
                Format::Json => print_json(&keys)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "PREFIX", "SCOPES", "EXPIRES"]);
                    for key in &keys {
                        table.row(vec![
                            key.spec.name.to_string(),
                            key.id.to_string(),
                            key.prefix.clone(),
                            list(key.spec.scopes.iter().map(scope_name)),
                            optional(key.spec.expires_at.map(|at| at.to_rfc3339())),
                        ]);
                    }
                    table.print();
                }
            }
        }
        KeyCommand::Get { key } => {
            let key = resolve::<ApiKey>(&client, &key).await?;
            match context.format {
                Format::Json => print_json(&key)?,
                Format::Table => details(&key).print(),
            }
        }
        KeyCommand::Create { name, scopes, expires_at } => {
            let spec =
                ApiKeySpec { name: name.clone(), scopes: scopes.into_iter().map(Scope::from).collect(), expires_at };
            spec.validate().with_context(|| format!("invalid API key {name}"))?;
            let created: ApiKeyCreated =
                client.create::<ApiKey>(&spec).await.with_context(|| format!("creating API key {name}"))?;
            match context.format {
                Format::Json => print_json(&created)?,
                Format::Table => {
                    println!("Created API key {name} ({}).", created.api_key.id);
                    println!("Its secret is shown only this once; store it safely:");
                    println!("  {}", created.secret);
                }
            }
        }
        KeyCommand::Delete { key } => {
            let key = resolve::<ApiKey>(&client, &key).await?;
            client.delete::<ApiKey>(&key.id).await.with_context(|| format!("deleting API key {}", key.spec.name))?;
            println!("Deleted API key {} ({}).", key.spec.name, key.id);
        }
    }
    Ok(())
}

fn details(key: &ApiKey) -> Details {
    let mut details = Details::new();
    details
        .field("name", &key.spec.name)
        .field("id", key.id)
        .field("prefix", &key.prefix)
        .field("scopes", list(key.spec.scopes.iter().map(scope_name)))
        .field("expires", optional(key.spec.expires_at.map(|at| at.to_rfc3339())))
        .field("revision", key.revision)
        .field("created", key.created_at.to_rfc3339());
    details
}
