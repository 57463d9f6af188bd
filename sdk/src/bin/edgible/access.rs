//! `edgible app key ...` and `edgible app short-code`: the credentials an application's access
//! policies accept, and how a policy reads for people.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use edgible::Client;
use edgible::model::{
    AccessPolicy, Application, ApplicationKey, ApplicationKeyCreated, ApplicationKeyId, ApplicationKeySpec, Name,
    ShortCode, Validate,
};

use crate::Context;
use crate::members::role_name;
use crate::output::{Details, Format, Table, list, optional, print_json};
use crate::resolve::resolve;

#[derive(Debug, Subcommand)]
pub enum AppKeyCommand {
    /// List the keys that pass the application's api_key policy (never their secrets).
    List {
        /// Application name or id.
        application: String,
    },
    /// Create a key for the application and print its secret, which is shown only this once.
    Create {
        /// Application name or id.
        application: String,
        name: Name,
        /// When the key stops working (RFC 3339, such as 2030-01-01T00:00:00Z); never if absent.
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
    },
    /// Delete (revoke) an application key.
    Delete {
        /// Application name or id.
        application: String,
        /// Key name or id.
        key: String,
    },
}

pub async fn run_key(command: AppKeyCommand, context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    match command {
        AppKeyCommand::List { application } => {
            let application = resolve::<Application>(&client, &application).await?;
            let keys = client
                .list_all_application_keys(&application.id)
                .await
                .with_context(|| format!("listing the keys of application {}", application.spec.name))?;
            match context.format {
                Format::Json => print_json(&keys)?,
                Format::Table => {
                    let mut table = Table::new(&["NAME", "ID", "PREFIX", "EXPIRES", "CREATED"]);
                    for key in &keys {
                        table.row(vec![
                            key.spec.name.to_string(),
                            key.id.to_string(),
                            key.prefix.clone(),
                            optional(key.spec.expires_at.map(|at| at.to_rfc3339())),
                            key.created_at.to_rfc3339(),
                        ]);
                    }
                    table.print();
                }
            }
        }
        AppKeyCommand::Create { application, name, expires_at } => {
            let application = resolve::<Application>(&client, &application).await?;
            let spec = ApplicationKeySpec { name: name.clone(), expires_at };
            spec.validate().with_context(|| format!("invalid application key {name}"))?;
            let created: ApplicationKeyCreated = client
                .create_application_key(&application.id, &spec)
                .await
                .with_context(|| format!("creating key {name} of application {}", application.spec.name))?;
            match context.format {
                Format::Json => print_json(&created)?,
                Format::Table => {
                    println!(
                        "Created key {name} ({}) of application {}.",
                        created.application_key.id, application.spec.name
                    );
                    if application.spec.access.api_key.is_none() {
                        println!("Note: the application has no api_key access policy, so the key lets no one in yet.");
                    }
                    println!("Its secret is shown only this once; store it safely:");
                    println!("  {}", created.secret);
                    println!("Send it as `Authorization: Bearer <secret>` or `X-Edgible-Key: <secret>`.");
                }
            }
        }
        AppKeyCommand::Delete { application, key } => {
            let application = resolve::<Application>(&client, &application).await?;
            let key = find_key(&client, &application, &key).await?;
            client
                .delete_application_key(&application.id, &key.id)
                .await
                .with_context(|| format!("deleting key {} of application {}", key.spec.name, application.spec.name))?;
            println!("Deleted key {} ({}) of application {}.", key.spec.name, key.id, application.spec.name);
        }
    }
    Ok(())
}

/// The application's key with this id or name.
async fn find_key(client: &Client, application: &Application, reference: &str) -> anyhow::Result<ApplicationKey> {
    let name = &application.spec.name;
    if let Ok(id) = reference.parse::<ApplicationKeyId>() {
        match client.application_key(&application.id, &id).await {
            Ok(key) => return Ok(key),
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(anyhow::Error::new(error).context(format!("looking up key {reference}"))),
        }
    }
    let keys = client
        .list_all_application_keys(&application.id)
        .await
        .with_context(|| format!("listing the keys of application {name}"))?;
    keys.into_iter()
        .find(|key| key.spec.name.as_str() == reference)
        .with_context(|| format!("application {name} has no key named or with the id {reference:?}"))
}

/// `edgible app short-code APP [--rotate]`.
pub async fn short_code(client: &Client, reference: &str, rotate: bool, context: &Context) -> anyhow::Result<()> {
    let application = resolve::<Application>(client, reference).await?;
    let name = &application.spec.name;
    let short_code = if rotate {
        client.rotate_short_code(&application.id).await.map_err(|error| {
            if error.is_conflict() {
                anyhow::anyhow!(
                    "the short code of {name} is set in its spec (access.short_code.code); change it there: {}",
                    error.message()
                )
            } else {
                anyhow::Error::new(error).context(format!("rotating the short code of {name}"))
            }
        })?
    } else {
        client.short_code(&application.id).await.with_context(|| format!("reading the short code of {name}"))?
    };
    match context.format {
        Format::Json => print_json(&short_code)?,
        Format::Table => short_code_details(&short_code).print(),
    }
    Ok(())
}

fn short_code_details(short_code: &ShortCode) -> Details {
    let mut details = Details::new();
    details
        .field("code", &short_code.code)
        .field("version", short_code.version)
        .field("expires", optional(short_code.expires_at.map(|at| at.to_rfc3339())))
        .field("set by", if short_code.set_by_spec { "the application's spec" } else { "the server (rotatable)" });
    details
}

/// The policies of an application for people: `public`, or the ones that let visitors in,
/// joined by "or". A code set in the spec is not shown (`app short-code` shows the code).
pub fn access_summary(access: &AccessPolicy) -> String {
    if access.is_public() {
        return "public".to_owned();
    }
    let mut policies = Vec::new();
    if let Some(organization) = &access.organization {
        policies.push(if organization.roles.is_empty() {
            "organization members".to_owned()
        } else {
            format!("organization members ({})", list(organization.roles.iter().map(|role| role_name(*role))))
        });
    }
    if access.api_key.is_some() {
        policies.push("API key".to_owned());
    }
    if let Some(short_code) = &access.short_code {
        policies.push(match short_code.expires_at {
            Some(at) => format!("short code (until {})", at.to_rfc3339()),
            None => "short code".to_owned(),
        });
    }
    policies.join(" or ")
}

#[cfg(test)]
mod tests {
    use edgible::model::{ApiKeyAccess, OrganizationAccess, Role, ShortCodeAccess};

    use super::*;

    #[test]
    fn policies_read_as_alternatives() {
        assert_eq!(access_summary(&AccessPolicy::default()), "public");
        let access = AccessPolicy {
            organization: Some(OrganizationAccess { roles: [Role::Admin, Role::Owner].into() }),
            api_key: Some(ApiKeyAccess {}),
            short_code: Some(ShortCodeAccess {
                code: Some("secret123".into()),
                expires_at: Some("2030-01-01T00:00:00Z".parse().unwrap()),
            }),
        };
        let summary = access_summary(&access);
        assert_eq!(
            summary,
            "organization members (owner, admin) or API key or short code (until 2030-01-01T00:00:00+00:00)"
        );
        assert!(!summary.contains("secret123"), "the code is not printed");
        let members_only =
            AccessPolicy { organization: Some(OrganizationAccess::default()), ..AccessPolicy::default() };
        assert_eq!(access_summary(&members_only), "organization members");
    }

    #[test]
    fn a_short_code_shows_where_it_comes_from() {
        let short_code = ShortCode {
            application_id: edgible::model::ApplicationId::new(),
            code: "k3x9q2".into(),
            version: 4,
            expires_at: None,
            set_by_spec: false,
        };
        let text = short_code_details(&short_code).render();
        assert!(text.contains("code:     k3x9q2"), "{text}");
        assert!(text.contains("rotatable"), "{text}");
    }
}
