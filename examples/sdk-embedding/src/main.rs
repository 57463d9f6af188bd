//! Uses the `edgible` crate as a library: creates (or updates) an application that serves a
//! directory with Python's HTTP server, places it on a device, and waits until the device's
//! agent reports that it applied the change.
//!
//! ```text
//! EDGIBLE_ENDPOINT=http://127.0.0.1:7070 EDGIBLE_API_KEY=edg_... \
//!   cargo run -p edgible-sdk-embedding-example -- files files.example.test dev1
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgible::Client;
use edgible::model::{Application, ApplicationSpec, Device, Placement, PlacementSpec, ProcessWorkload, Workload};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, hostname, device] = args.as_slice() else {
        bail!("usage: sdk-embedding NAME HOSTNAME DEVICE  (with EDGIBLE_ENDPOINT and EDGIBLE_API_KEY set)");
    };
    let endpoint = std::env::var("EDGIBLE_ENDPOINT").context("set EDGIBLE_ENDPOINT")?;
    let api_key = std::env::var("EDGIBLE_API_KEY").context("set EDGIBLE_API_KEY")?;
    let client = Client::new(&endpoint, &api_key)?;

    let device: Device = client.find_by_name(device).await?.with_context(|| format!("no device named {device}"))?;
    let spec = ApplicationSpec {
        name: name.parse()?,
        hostnames: vec![hostname.parse()?],
        workload: Workload::Process(ProcessWorkload {
            command: "/usr/bin/python3".into(),
            args: vec!["-m".into(), "http.server".into(), "8080".into(), "--bind".into(), "127.0.0.1".into()],
            env: Default::default(),
            working_dir: None,
        }),
        port: 8080,
        env: Default::default(),
        health_check: None,
        access: Default::default(),
        storage: vec![],
        sleep: None,
        resources: None,
        protocol: Default::default(),
    };

    // Create the application, or bring an existing one of that name up to date.
    let application = match client.find_by_name::<Application>(name).await? {
        None => client.create::<Application>(&spec).await?,
        Some(existing) if existing.spec == spec => existing,
        Some(existing) => client.update::<Application>(&existing.id, Some(existing.revision), &spec).await?,
    };
    println!("application {} ({}) at revision {}", application.spec.name, application.id, application.revision);

    let placement_spec = PlacementSpec::ServingDevice { application_id: application.id, device_id: device.id };
    let existing =
        client.list_all::<Placement>().await?.into_iter().find(|p| p.spec.application_id() == application.id);
    let placement = match existing {
        None => client.create::<Placement>(&placement_spec).await?,
        Some(existing) if existing.spec == placement_spec => existing,
        Some(existing) => client.update::<Placement>(&existing.id, Some(existing.revision), &placement_spec).await?,
    };
    println!("placed on {} at revision {}", device.spec.name, placement.revision);

    // The device's applied revision catches up once its agent ran the change.
    let wanted = placement.revision.max(application.revision);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let device: Device = client.get(&device.id).await?;
        match device.status.applied_revision {
            Some(applied) if applied >= wanted => {
                println!("{} applied revision {applied}: https://{hostname}/ is served", device.spec.name);
                return Ok(());
            }
            applied => {
                if Instant::now() > deadline {
                    bail!(
                        "{} has applied {:?}, not {wanted}, after 60 s; is its agent running (state {:?})?",
                        device.spec.name,
                        applied,
                        device.status.state
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
