//! The migration blob store on a real S3-compatible server: moto (`moto_server`, PyPI's
//! `moto[server]`, which `.ci/test` installs into a venv under `~/.cache/edgible`) on loopback,
//! over TLS with a certificate made here, so the S3 client's rustls runs on the ring provider
//! the binaries install. Checked: the start-up probe and its failures, chunks stored, listed,
//! read and deleted under the URL's prefix, and one whole stateful migration through the API.
//!
//! Heavy tier: runs only with `EDGIBLE_ACC=1`. `moto_server` is found through
//! `EDGIBLE_MOTO_SERVER`, else `~/.cache/edgible/moto-5.2.5/bin/moto_server`, else `PATH`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use edgible::model::MigrationId;
use edgible_server::blobs::{BlobStore, S3Location, sha256_hex};
use object_store::ClientOptions;
use object_store::aws::AmazonS3Builder;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A running moto server, killed (and reaped) on drop, also when the test fails.
struct Moto {
    child: Child,
    port: u16,
    ca_pem: String,
    dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_server() -> PathBuf {
    if let Some(path) = std::env::var_os("EDGIBLE_MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    match cache.map(|cache| cache.join("edgible/moto-5.2.5/bin/moto_server")) {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("moto_server"),
    }
}

impl Moto {
    /// Starts moto on a free loopback port with a certificate for 127.0.0.1 signed by a CA made
    /// here, and waits (bounded) until it answers.
    async fn start() -> anyhow::Result<Moto> {
        let dir = tempfile::Builder::new().prefix("edgible-moto-").tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &issuer)?;
        let (cert_file, key_file) = (dir.path().join("moto.pem"), dir.path().join("moto.key"));
        std::fs::write(&cert_file, leaf.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;

        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(dir.path().join("moto.log"))?;
        let program = moto_server();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .arg("-c")
            .arg(&cert_file)
            .arg("-k")
            .arg(&key_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (PyPI moto[server])", program.display()))?;
        let mut moto = Moto { child, port, ca_pem: ca.pem(), dir };
        let client = moto.http()?;
        let started = Instant::now();
        for attempt in 0.. {
            if let Some(status) = moto.child.try_wait()? {
                bail!("moto exited with {status}: {}", moto.log());
            }
            if client.get(moto.endpoint()).send().await.is_ok() {
                return Ok(moto);
            }
            if started.elapsed() > Duration::from_secs(60) || attempt > 600 {
                bail!("moto did not answer within 60 s: {}", moto.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unreachable!("the loop returns or fails")
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// A plain HTTPS client that trusts moto's CA (to make buckets and list keys).
    fn http(&self) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let answer = self.http()?.put(format!("{}/{bucket}", self.endpoint())).send().await?;
        ensure!(answer.status().is_success(), "creating bucket {bucket}: {}", answer.status());
        Ok(())
    }

    /// The keys in `bucket` under `prefix`, through the S3 listing itself.
    async fn keys(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let url = format!("{}/{bucket}?list-type=2&prefix={prefix}", self.endpoint());
        let answer = self.http()?.get(url).send().await?;
        ensure!(answer.status().is_success(), "listing {bucket}: {}", answer.status());
        let body = answer.text().await?;
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>"))
            .map(|(key, _)| key.to_owned())
            .collect())
    }

    /// The blob store on `url` of this server, as the flags would make it with static
    /// credentials, trusting moto's CA.
    fn store(&self, url: &str) -> anyhow::Result<BlobStore> {
        self.store_at(url, &self.endpoint())
    }

    fn store_at(&self, url: &str, endpoint: &str) -> anyhow::Result<BlobStore> {
        let certificate = object_store::Certificate::from_pem(self.ca_pem.as_bytes())?;
        let builder = AmazonS3Builder::new()
            .with_access_key_id("edgible-test")
            .with_secret_access_key("edgible-test-secret")
            .with_region("us-east-1")
            .with_client_options(ClientOptions::new().with_root_certificate(certificate));
        let location = S3Location { url: url.to_owned(), endpoint: Some(endpoint.to_owned()), allow_http: false };
        Ok(BlobStore::s3_with(builder, &location)?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_bucket_holds_the_chunks_of_a_real_migration() -> anyhow::Result<()> {
    if std::env::var("EDGIBLE_ACC").as_deref() != Ok("1") {
        eprintln!("skipping the S3 blob store test: set EDGIBLE_ACC=1 to run it against moto_server");
        return Ok(());
    }
    // As every binary's main does: the S3 client must take this provider, not panic for lack
    // of one (aws-lc-rs is linked too).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let moto = Moto::start().await?;
    moto.create_bucket("snapshots").await?;

    // The probe: passes on the bucket, fails clearly on a missing bucket and a dead endpoint.
    let store = moto.store("s3://snapshots/edgible")?;
    store.probe(Duration::from_secs(30)).await.context("probing the bucket")?;
    let missing = moto.store("s3://no-such-bucket")?.probe(Duration::from_secs(30)).await;
    let error = missing.expect_err("a missing bucket fails the probe").to_string();
    ensure!(error.contains("unreachable") && error.contains("no-such-bucket"), "{error}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dead = moto.store_at("s3://snapshots", &format!("https://127.0.0.1:{closed}"))?;
    let started = Instant::now();
    let error = dead.probe(Duration::from_secs(3)).await.expect_err("nobody listens").to_string();
    ensure!(error.contains("unreachable") && started.elapsed() < Duration::from_secs(10), "{error}");
    ensure!(moto.keys("snapshots", "edgible/probes/").await?.is_empty(), "the probe object is deleted");

    // The store's own operations, with a chunk of the real size.
    let migration = MigrationId::new();
    let other = MigrationId::new();
    ensure!(store.chunks(migration).await?.is_empty());
    let big = Bytes::from(vec![0x5a; edgible::protocol::v1::CHUNK_BYTES as usize]);
    let second = store.put_chunk(migration, 1, Bytes::from_static(b"the tail")).await?;
    let first = store.put_chunk(migration, 0, big.clone()).await?;
    store.put_chunk(other, 0, Bytes::from_static(b"another migration")).await?;
    ensure!(first.sha256 == sha256_hex(&big) && first.bytes == big.len() as u64);
    ensure!(store.chunks(migration).await? == [first, second]);
    ensure!(store.chunk(migration, 0).await?.as_deref() == Some(&big[..]));
    ensure!(store.chunk(migration, 1).await?.as_deref() == Some(&b"the tail"[..]));
    ensure!(store.chunk(migration, 2).await?.is_none());
    let keys = moto.keys("snapshots", &format!("edgible/migrations/{migration}/")).await?;
    ensure!(keys.len() == 4, "under the URL's prefix: {keys:?}");
    ensure!(store.delete(migration).await? == 4);
    ensure!(store.chunks(migration).await?.is_empty() && store.chunk(migration, 0).await?.is_none());
    ensure!(store.chunks(other).await?.len() == 1, "another migration's chunks stay");
    ensure!(store.delete(other).await? == 2);

    // A whole stateful migration through the API, its chunks passing through the bucket.
    let db = crate::support::SqliteDb::new()?;
    crate::migrations::a_stateful_migration_through(&db.url(), store.clone()).await?;
    let left = moto.keys("snapshots", "edgible/").await?;
    ensure!(left.is_empty(), "the migration's blobs are deleted: {left:?}");
    Ok(())
}
