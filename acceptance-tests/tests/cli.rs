//! The real `edgible` command line against a real `edgible-server`: login, the object
//! commands with tables and `-o json`, and stack deploys.
//!
//! Needs the workspace binaries: `cargo build --workspace --bins && cargo test -p
//! edgible-acceptance-tests --test cli`.

use std::path::Path;

use edgible::Client;
use edgible::model::{Application, Device, DevicePool, Edge, Placement};
use edgible_acceptance_tests::{Cli, ServerProcess};
use serde_json::Value;

/// A server and a CLI logged in to it with the server's bootstrap key.
struct Setup {
    /// Held so that the server runs as long as the test; dropping it stops the server.
    server: ServerProcess,
    cli: Cli,
    client: Client,
    // Declared last so that it is removed only after the server has stopped.
    dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let server = ServerProcess::start(&dir.path().join("server"))?;
        let cli = Cli::new(&dir.path().join("config"))?;
        cli.ok(&["login", "--server", &server.url, "--key", &server.admin_key])?;
        let client = server.client()?;
        Ok(Self { server, cli, client, dir })
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<String> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    }

    /// A pool `home` with devices `dev1` and `dev2`.
    fn devices(&self) -> anyhow::Result<()> {
        self.cli.ok(&["pool", "create", "home", "--cidr", "100.96.0.0/24"])?;
        self.cli.ok(&["device", "create", "dev1", "--pool", "home"])?;
        self.cli.ok(&["device", "create", "dev2", "--pool", "home"])?;
        Ok(())
    }

    async fn nothing_deployed(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.client.list_all::<Application>().await?.is_empty(), "applications were created");
        anyhow::ensure!(self.client.list_all::<Placement>().await?.is_empty(), "placements were created");
        Ok(())
    }
}

#[tokio::test]
async fn login_saves_a_private_config_after_verifying_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(&dir.path().join("server"))?;
    let cli = Cli::new(&dir.path().join("config"))?;

    let not_logged_in = cli.fails(&["app", "list"])?;
    assert!(not_logged_in.stderr.contains("edgible login"), "{}", not_logged_in.stderr);

    let refused = cli.fails(&["login", "--server", &server.url, "--key", "edg_not-a-real-key"])?;
    assert!(refused.stderr.contains("refused the key"), "{}", refused.stderr);
    assert!(!cli.config_file().exists(), "a refused key must not be saved");

    // Piped stdin is how scripts hand over the key without putting it on the command line.
    cli.run_with_stdin(&["login", "--server", &server.url], Some(&format!("{}\n", server.admin_key)))?.success()?;
    let saved: Value = serde_json::from_slice(&std::fs::read(cli.config_file())?)?;
    assert_eq!(saved["endpoint"], server.url.as_str());
    assert_eq!(saved["api_key"], server.admin_key.as_str());
    assert_private(&cli.config_file());

    let whoami = cli.json(&["whoami"])?;
    assert_eq!(whoami["organization"]["spec"]["name"], "acme");
    assert_eq!(whoami["api_key"]["spec"]["scopes"], serde_json::json!(["platform"]));
    let table = cli.ok(&["whoami"])?;
    assert!(table.stdout.contains("acme"), "{}", table.stdout);

    // A second login with a wrong key keeps the working one.
    cli.fails(&["login", "--key", "edg_wrong"])?;
    assert_eq!(serde_json::from_slice::<Value>(&std::fs::read(cli.config_file())?)?, saved);
    Ok(())
}

#[cfg(unix)]
fn assert_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map(|metadata| metadata.permissions().mode() & 0o777).unwrap_or(0);
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
}

#[cfg(not(unix))]
fn assert_private(_: &Path) {}

#[tokio::test]
async fn objects_are_created_listed_fetched_by_name_or_id_and_deleted() -> anyhow::Result<()> {
    let setup = Setup::start()?;
    let (cli, client) = (&setup.cli, &setup.client);

    cli.ok(&["pool", "create", "home", "--cidr", "100.96.0.0/24"])?;
    let device = cli.ok(&["device", "create", "dev1", "--pool", "home", "--label", "site=lab"])?;
    assert!(device.stdout.contains("edgible-agent enroll"), "{}", device.stdout);
    assert!(device.stdout.contains("100.96.0.1"), "{}", device.stdout);
    let created = cli.json(&["device", "create", "dev2", "--pool", "home"])?;
    assert!(created["enrollment_token"].as_str().is_some_and(|token| !token.is_empty()), "{created}");
    assert_eq!(created["device"]["status"]["tunnel_address"], "100.96.0.2");

    cli.ok(&[
        "app",
        "create",
        "web",
        "--hostname",
        "web.example.test",
        "--port",
        "8080",
        "--command",
        "python3",
        "--arg",
        "-m",
        "--arg",
        "http.server",
        "--env",
        "MODE=test",
    ])?;
    cli.ok(&["placement", "create", "--app", "web", "--device", "dev1"])?;

    // `-o json` prints exactly what the API answers.
    assert_eq!(cli.json(&["app", "list"])?, serde_json::to_value(&client.list_all::<Application>().await?)?);
    assert_eq!(cli.json(&["device", "list"])?, serde_json::to_value(&client.list_all::<Device>().await?)?);
    assert_eq!(cli.json(&["pool", "list"])?, serde_json::to_value(&client.list_all::<DevicePool>().await?)?);
    assert_eq!(cli.json(&["placement", "list"])?, serde_json::to_value(&client.list_all::<Placement>().await?)?);
    let dev1 = client.find_by_name::<Device>("dev1").await?.expect("dev1 exists");
    assert_eq!(dev1.spec.labels.len(), 1);
    let by_name = cli.json(&["device", "get", "dev1"])?;
    assert_eq!(by_name, serde_json::to_value(&dev1)?);
    assert_eq!(cli.json(&["device", "get", &dev1.id.to_string()])?, by_name);
    let web = client.find_by_name::<Application>("web").await?.expect("web exists");
    assert_eq!(cli.json(&["app", "get", &web.id.to_string()])?, serde_json::to_value(&web)?);
    let placement = cli.json(&["placement", "get", "web"])?;
    assert_eq!(placement["spec"]["device_id"], dev1.id.to_string());
    assert_eq!(placement["spec"]["application_id"], web.id.to_string());

    // Tables show names and key facts in aligned columns.
    let apps = cli.ok(&["app", "list"])?.stdout;
    let mut lines = apps.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    assert!(header.starts_with("NAME"), "{apps}");
    assert!(row.starts_with("web"), "{apps}");
    assert_eq!(header.find("ID"), row.find(&web.id.to_string()), "columns are aligned:\n{apps}");
    for fact in ["web.example.test", "8080", "process python3 -m http.server", "device dev1"] {
        assert!(row.contains(fact), "{fact} missing from\n{apps}");
    }
    let details = cli.ok(&["device", "get", "dev1"])?.stdout;
    assert!(details.contains("100.96.0.1") && details.contains("site=lab"), "{details}");

    // Server-side validation errors name the field.
    let taken =
        cli.fails(&["app", "create", "copy", "--hostname", "web.example.test", "--port", "80", "--image", "x"])?;
    assert!(taken.stderr.contains("hostnames[0]"), "{}", taken.stderr);
    // Client-side ones are refused before any request.
    let invalid = cli.run(&["pool", "create", "bad", "--cidr", "100.96.0.1/24"])?;
    assert!(!invalid.status.success() && invalid.stderr.contains("100.96.0.0/24"), "{}", invalid.stderr);

    let key = cli.json(&["key", "create", "ci", "--scope", "read"])?;
    assert!(key["secret"].as_str().is_some_and(|secret| !secret.is_empty()), "{key}");
    assert!(cli.ok(&["key", "list"])?.stdout.contains("ci"));
    cli.ok(&["key", "delete", "ci"])?;

    let organization = cli.json(&["org", "create", "globex"])?;
    assert_eq!(organization["organization"]["spec"]["name"], "globex");
    assert!(organization["admin_key"]["secret"].as_str().is_some_and(|secret| !secret.is_empty()));
    let organizations = cli.json(&["org", "list"])?;
    assert_eq!(organizations.as_array().map(Vec::len), Some(1), "a key sees its own organization: {organizations}");

    // A device with a placement cannot go; the placement goes by its application's name.
    let busy = cli.fails(&["device", "delete", "dev1"])?;
    assert!(busy.stderr.contains("409"), "{}", busy.stderr);
    cli.ok(&["placement", "delete", "web"])?;
    cli.ok(&["device", "delete", "dev1"])?;
    let dev2_id = created["device"]["id"].as_str().unwrap_or_default();
    cli.ok(&["device", "delete", dev2_id])?;
    cli.ok(&["app", "delete", "web"])?;
    cli.ok(&["pool", "delete", "home"])?;
    let gone = cli.fails(&["app", "get", "web"])?;
    assert!(gone.stderr.contains("no application"), "{}", gone.stderr);
    assert!(client.list_all::<Device>().await?.is_empty());
    assert!(client.list_all::<DevicePool>().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn edges_are_created_with_a_token_listed_and_deleted_and_the_ca_is_printed() -> anyhow::Result<()> {
    let setup = Setup::start()?;
    let (cli, client) = (&setup.cli, &setup.client);

    cli.ok(&["pool", "create", "home", "--cidr", "100.96.0.0/24"])?;
    cli.ok(&["device", "create", "dev1", "--pool", "home"])?;
    let created = cli.json(&["edge", "create", "edge1", "--pool", "home", "--endpoint", "203.0.113.1:51820"])?;
    assert!(created["enrollment_token"].as_str().is_some_and(|token| !token.is_empty()), "{created}");
    // Devices and edges of a pool share its addresses.
    assert_eq!(created["edge"]["status"]["tunnel_address"], "100.96.0.2", "{created}");
    let printed = cli.ok(&["edge", "create", "edge2", "--pool", "home", "--endpoint", "edge.example.test:51820"])?;
    assert!(printed.stdout.contains("edgible-edge enroll"), "{}", printed.stdout);

    assert_eq!(cli.json(&["edge", "list"])?, serde_json::to_value(client.list_all::<Edge>().await?)?);
    let table = cli.ok(&["edge", "list"])?.stdout;
    assert!(table.contains("edge1") && table.contains("203.0.113.1:51820") && table.contains("home"), "{table}");
    let edge1 = client.find_by_name::<Edge>("edge1").await?.expect("edge1 exists");
    assert_eq!(cli.json(&["edge", "get", "edge1"])?, serde_json::to_value(&edge1)?);

    // Bad endpoints are refused before any request, naming what is wrong.
    let invalid = cli.run(&["edge", "create", "bad", "--pool", "home", "--endpoint", "203.0.113.1"])?;
    assert!(!invalid.status.success() && invalid.stderr.contains("host:port"), "{}", invalid.stderr);

    // The CA the platform's certificates chain to, as PEM, for clients to trust.
    let ca = cli.ok(&["ca"])?.stdout;
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----") && ca.trim_end().ends_with("-----END CERTIFICATE-----"));
    assert_eq!(ca, Client::ca_pem(&setup.server.url).await?);

    let busy = cli.fails(&["pool", "delete", "home"])?;
    assert!(busy.stderr.contains("409"), "a pool with edges stays: {}", busy.stderr);
    cli.ok(&["edge", "delete", "edge1"])?;
    cli.ok(&["edge", "delete", "edge2"])?;
    assert!(client.list_all::<Edge>().await?.is_empty());
    let gone = cli.fails(&["edge", "get", "edge1"])?;
    assert!(gone.stderr.contains("no edge"), "{}", gone.stderr);
    Ok(())
}

/// Two applications on two devices. `api` asks for a short code without giving one: the server
/// generates it, and a second deploy must neither count that as a change nor make the server
/// generate another.
const STACK: &str = "\
applications:
  - name: web
    hostnames: [web.example.test]
    port: 8080
    workload:
      process:
        command: /usr/bin/python3
        args: [-m, http.server, '8080']
    placement:
      strategy: serving-device
      device: dev1
  - name: api
    hostnames: [api.example.test]
    port: 9000
    workload:
      container:
        image: localhost/api:1
    access:
      short_code: {}
    placement:
      strategy: serving-device
      device: dev2
";

/// Every application and placement with its revision, to see whether a deploy wrote anything.
async fn revisions(client: &Client) -> anyhow::Result<Vec<(String, u64)>> {
    let mut revisions: Vec<(String, u64)> = Vec::new();
    for application in client.list_all::<Application>().await? {
        revisions.push((application.id.to_string(), application.revision));
    }
    for placement in client.list_all::<Placement>().await? {
        revisions.push((placement.id.to_string(), placement.revision));
    }
    Ok(revisions)
}

#[tokio::test]
async fn stack_deploy_applies_the_plan_once_and_then_changes_nothing() -> anyhow::Result<()> {
    let setup = Setup::start()?;
    let (cli, client) = (&setup.cli, &setup.client);
    setup.devices()?;
    let file = setup.write("stack.yaml", STACK)?;

    let diff = cli.ok(&["stack", "diff", &file])?.stdout;
    for line in ["+ application web: create", "+ placement of web: create on device dev1", "+ application api: create"]
    {
        assert!(diff.contains(line), "{line} missing from\n{diff}");
    }
    assert!(diff.contains("4 to create"), "{diff}");
    setup.nothing_deployed().await?;

    let deploy = cli.ok(&["stack", "deploy", &file])?;
    assert!(deploy.stdout.contains("4 created"), "{}", deploy.stdout);
    // stderr is a pipe here, so progress comes as plain lines.
    assert!(deploy.stderr.contains("[1/4] created application web"), "{}", deploy.stderr);
    assert!(deploy.stderr.contains("[4/4] created placement of api"), "{}", deploy.stderr);
    let web = client.find_by_name::<Application>("web").await?.expect("web was deployed");
    assert_eq!(web.spec.port, 8080);
    let dev1 = client.find_by_name::<Device>("dev1").await?.expect("dev1 exists");
    let placements = client.list_all::<Placement>().await?;
    assert_eq!(placements.len(), 2);
    assert!(placements.iter().any(|p| p.spec.application_id() == web.id && p.spec.device_id() == Some(dev1.id)));

    let before = revisions(client).await?;
    let again = cli.ok(&["stack", "deploy", &file])?;
    assert!(again.stdout.contains("No changes"), "{}", again.stdout);
    assert!(!again.stderr.contains("created") && !again.stderr.contains("updated"), "{}", again.stderr);
    assert_eq!(revisions(client).await?, before, "a second deploy must not write");
    assert!(cli.ok(&["stack", "diff", &file])?.stdout.contains("No changes"));

    // A changed port updates the application; moving api to dev1 updates its placement in place.
    let changed = setup
        .write("changed.yaml", &STACK.replace("port: 8080", "port: 8081").replace("device: dev2", "device: dev1"))?;
    let plan = cli.json(&["stack", "diff", &changed])?;
    let plan = plan.as_array().cloned().unwrap_or_default();
    assert_eq!(plan.len(), 4);
    assert_eq!(plan[0]["action"], "update");
    assert_eq!(plan[0]["fields"], serde_json::json!(["port"]));
    assert_eq!(plan[1]["action"], "unchanged");
    assert_eq!(plan[3]["action"], "update");
    assert_eq!(plan[3]["from"], "device dev2");
    assert_eq!(plan[3]["target"], "device dev1");
    let text = cli.ok(&["stack", "diff", &changed])?.stdout;
    assert!(text.contains("~ application web: update port"), "{text}");
    assert!(text.contains("~ placement of api: update device dev2 -> device dev1"), "{text}");

    let api_placement = placements.iter().find(|p| p.spec.device_id() != Some(dev1.id)).expect("api is on dev2");
    let deploy = cli.ok(&["stack", "deploy", &changed])?;
    assert!(deploy.stdout.contains("2 updated"), "{}", deploy.stdout);
    let web_after = client.get::<Application>(&web.id).await?;
    assert_eq!(web_after.spec.port, 8081);
    assert!(web_after.revision > web.revision);
    let moved = client.get::<Placement>(&api_placement.id).await?;
    assert_eq!(moved.spec.device_id(), Some(dev1.id));
    assert!(moved.revision > api_placement.revision);
    assert!(cli.ok(&["stack", "deploy", &changed])?.stdout.contains("No changes"));
    Ok(())
}

#[tokio::test]
async fn a_stack_file_with_an_error_creates_nothing_and_names_the_line() -> anyhow::Result<()> {
    let setup = Setup::start()?;
    setup.devices()?;

    // The first application is fine; the second's bad hostname (line 13) must stop both.
    let file = setup.write("bad.yaml", &STACK.replace("[api.example.test]", "[API.example.test]"))?;
    for command in ["deploy", "diff"] {
        let failed = setup.cli.fails(&["stack", command, &file])?;
        assert!(failed.stderr.contains("line 13"), "{}", failed.stderr);
        assert!(failed.stderr.contains("applications[1].hostnames[0]"), "{}", failed.stderr);
    }

    let file = setup.write("syntax.yaml", &STACK.replace("    port: 9000\n", "    port: [9000\n"))?;
    let failed = setup.cli.fails(&["stack", "deploy", &file])?;
    assert!(failed.stderr.contains("line "), "{}", failed.stderr);

    let file = setup.write("unknown.yaml", &STACK.replace("    port: 9000\n", "    port: 9000\n    prot: 1\n"))?;
    let failed = setup.cli.fails(&["stack", "deploy", &file])?;
    assert!(failed.stderr.contains("line 15") && failed.stderr.contains("prot"), "{}", failed.stderr);

    setup.nothing_deployed().await
}

#[tokio::test]
async fn a_stack_naming_a_missing_device_creates_nothing() -> anyhow::Result<()> {
    let setup = Setup::start()?;
    setup.devices()?;
    let file = setup.write("ghost.yaml", &STACK.replace("device: dev2", "device: ghost"))?;
    let failed = setup.cli.fails(&["stack", "deploy", &file])?;
    assert!(failed.stderr.contains("no device named ghost"), "{}", failed.stderr);
    assert!(failed.stderr.contains("line 22"), "{}", failed.stderr);
    setup.nothing_deployed().await
}

/// Applications with each access policy, unplaced: the credentials around them need no device.
const ACCESS_STACK: &str = "\
applications:
  - name: wiki
    hostnames: [wiki.example.test]
    port: 3000
    workload:
      process:
        command: /usr/bin/wiki
    access:
      organization: {}
      api_key: {}
  - name: preview
    hostnames: [preview.example.test]
    port: 8080
    workload:
      process:
        command: /usr/bin/preview
    access:
      short_code: {}
  - name: fixed
    hostnames: [fixed.example.test]
    port: 8080
    workload:
      process:
        command: /usr/bin/fixed
    access:
      short_code:
        code: letmein2030
";

/// The secret on the line after "store it safely:" of a table output.
fn printed_secret(stdout: &str) -> anyhow::Result<String> {
    let mut lines = stdout.lines().skip_while(|line| !line.contains("store it safely"));
    lines.next();
    lines
        .next()
        .map(|line| line.trim().to_owned())
        .filter(|secret| !secret.is_empty())
        .ok_or_else(|| anyhow::anyhow!("no secret printed:\n{stdout}"))
}

/// Logs in on the server's login page as a browser's form would, and answers the status and
/// `Location` (no redirect is followed).
async fn post_login(server: &str, email: &str, password: &str, host: &str) -> anyhow::Result<(u16, String)> {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let response = http
        .post(format!("{server}/login"))
        .form(&[("email", email), ("password", password), ("host", host), ("state", "cli-test-state")])
        .send()
        .await?;
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((response.status().as_u16(), location))
}

/// A member's password (never from the command line), application keys, short codes, keys with
/// the `access` scope and the policies in `app status`, against the server's real endpoints.
#[tokio::test]
async fn access_credentials_are_managed_from_the_command_line() -> anyhow::Result<()> {
    let setup = Setup::start()?;
    let (cli, client) = (&setup.cli, &setup.client);
    let file = setup.write("access.yaml", ACCESS_STACK)?;
    cli.ok(&["stack", "deploy", &file])?;
    let wiki = client.find_by_name::<Application>("wiki").await?.expect("wiki was deployed");
    let preview = client.find_by_name::<Application>("preview").await?.expect("preview was deployed");

    // Passwords: asked on a terminal or piped with --password-stdin, checked before sending.
    let member = cli.json(&["member", "create", "ana@example.test", "--role", "admin"])?;
    assert_eq!(member["spec"]["role"], "admin");
    let set_password = ["member", "set-password", "ana@example.test", "--password-stdin"];
    let weak = cli.run_with_stdin(&set_password, Some("short\n"))?.failure()?;
    assert!(weak.stderr.contains("10 to 256"), "{}", weak.stderr);
    let no_terminal = cli.fails(&["member", "set-password", "ana@example.test"])?;
    assert!(no_terminal.stderr.contains("--password-stdin"), "{}", no_terminal.stderr);
    let stranger = ["member", "set-password", "bob@example.test", "--password-stdin"];
    let unknown = cli.run_with_stdin(&stranger, Some("correct horse battery\n"))?.failure()?;
    assert!(unknown.stderr.contains("no member"), "{}", unknown.stderr);
    let by_other_case = ["member", "set-password", "Ana@Example.test", "--password-stdin"];
    let set = cli.run_with_stdin(&by_other_case, Some("correct horse battery\n"))?.success()?;
    assert!(!set.stdout.contains("correct horse"), "the password is not echoed: {}", set.stdout);
    // The password (without the newline) opens the login page; another one does not.
    let (status, location) =
        post_login(&setup.server.url, "ana@example.test", "correct horse battery", "wiki.example.test").await?;
    assert_eq!(status, 302, "{location}");
    assert!(location.starts_with("https://wiki.example.test/.edgible/callback?"), "{location}");
    let (status, _) =
        post_login(&setup.server.url, "ana@example.test", "correct horse battery\n", "wiki.example.test").await?;
    assert_eq!(status, 401);
    let listed = cli.ok(&["member", "list"])?.stdout;
    assert!(listed.contains("ana@example.test") && listed.contains("admin"), "{listed}");

    // Application keys: the secret once, then only its prefix.
    let created = cli.ok(&["app", "key", "create", "wiki", "ci", "--expires-at", "2031-01-01T00:00:00Z"])?.stdout;
    let secret = printed_secret(&created)?;
    let keys = client.list_all_application_keys(&wiki.id).await?;
    assert_eq!(keys.len(), 1);
    assert!(secret.starts_with(&keys[0].prefix), "{secret} / {}", keys[0].prefix);
    let table = cli.ok(&["app", "key", "list", "wiki"])?.stdout;
    assert!(table.contains("ci") && table.contains(&keys[0].prefix), "{table}");
    assert!(!table.contains(&secret), "a listing never shows the secret: {table}");
    assert_eq!(cli.json(&["app", "key", "list", "wiki"])?, serde_json::to_value(&keys)?);
    let deploy = cli.json(&["app", "key", "create", "wiki", "deploy"])?;
    assert!(deploy["secret"].as_str().is_some_and(|secret| !secret.is_empty()), "{deploy}");
    let deploy_id = deploy["application_key"]["id"].as_str().unwrap_or_default().to_owned();
    let note = cli.ok(&["app", "key", "create", "preview", "useless"])?.stdout;
    assert!(note.contains("no api_key access policy"), "{note}");
    cli.ok(&["app", "key", "delete", "wiki", "ci"])?;
    cli.ok(&["app", "key", "delete", "wiki", &deploy_id])?;
    assert!(client.list_all_application_keys(&wiki.id).await?.is_empty());
    let gone = cli.fails(&["app", "key", "delete", "wiki", "ci"])?;
    assert!(gone.stderr.contains("no key"), "{}", gone.stderr);

    // Short codes: the generated one, rotated; a code from the spec cannot be rotated.
    let first = cli.json(&["app", "short-code", "preview"])?;
    let code = first["code"].as_str().unwrap_or_default().to_owned();
    assert!(code.len() >= 6, "{first}");
    assert!(cli.ok(&["app", "short-code", "preview"])?.stdout.contains(&code));
    let rotated = cli.json(&["app", "short-code", "preview", "--rotate"])?;
    assert_ne!(rotated["code"], first["code"]);
    assert!(rotated["version"].as_u64() > first["version"].as_u64(), "{rotated} after {first}");
    assert_eq!(serde_json::to_value(client.short_code(&preview.id).await?)?, rotated);
    let fixed = cli.json(&["app", "short-code", "fixed"])?;
    assert_eq!(fixed["code"], "letmein2030");
    let refused = cli.fails(&["app", "short-code", "fixed", "--rotate"])?;
    assert!(refused.stderr.contains("set in its spec"), "{}", refused.stderr);
    let none = cli.fails(&["app", "short-code", "wiki"])?;
    assert!(none.stderr.contains("short_code"), "{}", none.stderr);
    // A second deploy neither changes anything nor makes a new code.
    assert!(cli.ok(&["stack", "deploy", &file])?.stdout.contains("No changes"));
    assert_eq!(client.short_code(&preview.id).await?.code, rotated["code"].as_str().unwrap_or_default());

    // `app status` names the policies; `app get` does too, without the code.
    let status = cli.ok(&["app", "status", "wiki"])?.stdout;
    assert!(status.contains("organization members or API key"), "{status}");
    let fixed_get = cli.ok(&["app", "get", "fixed"])?.stdout;
    assert!(fixed_get.contains("short code") && !fixed_get.contains("letmein2030"), "{fixed_get}");

    // A key with the `access` scope passes api_key policies and grants nothing on the API.
    let robot = cli.json(&["key", "create", "robot", "--scope", "access"])?;
    assert_eq!(robot["api_key"]["spec"]["scopes"], serde_json::json!(["access"]));
    let robot_secret = robot["secret"].as_str().unwrap_or_default();
    let robot_client = Client::new(&setup.server.url, robot_secret)?;
    let refused = robot_client.list_all::<Application>().await.expect_err("an access key reads nothing");
    assert!(matches!(refused.status().map(|status| status.as_u16()), Some(401 | 403)), "{refused}");
    assert!(cli.ok(&["key", "list"])?.stdout.contains("access"));
    Ok(())
}
