//! `edgible login` and `edgible whoami`.

use std::io::{IsTerminal, Read};

use anyhow::Context as _;
use clap::Args;
use edgible::Client;
use edgible::client::WhoAmI;

use crate::Context;
use crate::config::{self, API_KEY_ENV, Config, ENDPOINT_ENV, Env};
use crate::output::{Details, Format, list, optional, print_json};

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The server's URL, such as https://edgible.example.com. Defaults to $EDGIBLE_ENDPOINT,
    /// then to the server of the saved login.
    #[arg(long)]
    server: Option<String>,
    /// The API key's secret. Defaults to $EDGIBLE_API_KEY, then to stdin when stdin is not a
    /// terminal; asked for otherwise.
    #[arg(long)]
    key: Option<String>,
}

pub async fn login(args: LoginArgs, context: &Context) -> anyhow::Result<()> {
    let env = context.env();
    let path = config::path(env)?;
    let server = match args.server.or_else(|| env.var(ENDPOINT_ENV)) {
        Some(server) => server,
        None => match config::read(&path)? {
            Some(saved) => saved.endpoint,
            None => anyhow::bail!("which server? give it with --server URL (or set {ENDPOINT_ENV})"),
        },
    };
    let server = server.trim().trim_end_matches('/').to_owned();
    let key = match args.key.or_else(|| env.var(API_KEY_ENV)) {
        Some(key) => key,
        None => read_key()?,
    };
    let key = key.trim().to_owned();
    anyhow::ensure!(!key.is_empty(), "the API key is empty");

    let client = Client::new(&server, &key)?;
    let whoami = client.whoami().await.map_err(|error| match error.status() {
        Some(status) if status == reqwest::StatusCode::UNAUTHORIZED => {
            anyhow::anyhow!("the server at {server} refused the key: {}", error.message())
        }
        _ => anyhow::Error::new(error).context(format!("verifying the key with {server}")),
    })?;
    config::save(&path, &Config { endpoint: server.clone(), api_key: key })?;
    match context.format {
        Format::Json => print_json(&whoami)?,
        Format::Table => println!(
            "Logged in to {server} as key {} of organization {}; saved to {}.",
            whoami.api_key.spec.name,
            whoami.organization.spec.name,
            path.display()
        ),
    }
    Ok(())
}

/// Reads the key from stdin: all of it when piped, or asked for without echo on a terminal.
fn read_key() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return rpassword::prompt_password("API key: ").context("reading the API key from the terminal");
    }
    let mut key = String::new();
    stdin.lock().read_to_string(&mut key).context("reading the API key from stdin")?;
    Ok(key)
}

pub async fn whoami(context: &Context) -> anyhow::Result<()> {
    let client = context.client()?;
    let whoami: WhoAmI = client.whoami().await.context("asking the server who this key is")?;
    match context.format {
        Format::Json => print_json(&whoami)?,
        Format::Table => {
            let key = &whoami.api_key;
            Details::new()
                .field("server", client.endpoint().trim_end_matches('/'))
                .field("organization", &whoami.organization.spec.name)
                .field("organization id", whoami.organization.id)
                .field("key", &key.spec.name)
                .field("key id", key.id)
                .field("key prefix", &key.prefix)
                .field("scopes", list(key.spec.scopes.iter().map(crate::keys::scope_name)))
                .field("expires", optional(key.spec.expires_at))
                .print();
        }
    }
    Ok(())
}
