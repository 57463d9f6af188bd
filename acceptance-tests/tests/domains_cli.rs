//! `edgible domain ...` against a real `edgible-server`: claim a domain, see the TXT record to
//! publish, find it by name or id, and delete it. Verification itself (a real DNS query) is
//! covered by the server's API suite, which runs its own DNS server; this server uses the
//! system's resolvers, so no test here asks it to verify.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins && cargo test -p
//! edgible-acceptance-tests --test domains_cli`.

use edgible_acceptance_tests::{Cli, ServerProcess};

#[test]
fn domains_are_claimed_shown_and_deleted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"))?;
    let cli = Cli::new(&dir.path().join("config"))?;
    cli.ok(&["login", "--server", &server.url, "--key", &server.admin_key])?;

    let created = cli.ok(&["domain", "create", "cli.example.test"])?;
    anyhow::ensure!(created.stdout.contains("_edgible-challenge.cli.example.test TXT"), "{}", created.stdout);
    let domain = cli.json(&["domain", "get", "cli.example.test"])?;
    anyhow::ensure!(domain["status"]["state"] == "pending", "{domain}");
    let id = domain["id"].as_str().unwrap_or_default().to_owned();
    let token = domain["status"]["txt_record_value"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(created.stdout.contains(&token), "the token is shown: {}", created.stdout);

    let listed = cli.ok(&["domain", "list"])?;
    anyhow::ensure!(
        listed.stdout.contains("cli.example.test") && listed.stdout.contains("pending"),
        "{}",
        listed.stdout
    );
    let by_id = cli.json(&["domain", "get", &id])?;
    anyhow::ensure!(by_id["spec"]["name"] == "cli.example.test", "{by_id}");

    let duplicate = cli.fails(&["domain", "create", "cli.example.test"])?;
    anyhow::ensure!(duplicate.stderr.contains("name"), "the error names the field: {}", duplicate.stderr);
    let wildcard = cli.fails(&["domain", "create", "*.example.test"])?;
    anyhow::ensure!(wildcard.stderr.contains("wildcard"), "{}", wildcard.stderr);

    cli.ok(&["domain", "delete", "cli.example.test"])?;
    let gone = cli.fails(&["domain", "get", "cli.example.test"])?;
    anyhow::ensure!(gone.stderr.contains("no domain"), "{}", gone.stderr);
    Ok(())
}
