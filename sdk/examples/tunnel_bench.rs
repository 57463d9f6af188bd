//! Throughput of the tunnel: two network namespaces joined by a veth pair, a `Tunnel` in each,
//! and `iperf3` across the tunnel, single TCP stream; then the same across the bare veth for
//! reference. Not a test: a measurement to compare builds and machines.
//!
//! ```text
//! cargo run --release -p edgible --features tunnel --example tunnel_bench -- [SECONDS]
//! ```
//!
//! Needs root, iproute2 and iperf3.

#[path = "../tests/tunnel/netns.rs"]
mod netns;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgible::tunnel::{PeerConfig, TunnelConfig};

use netns::{Namespace, key, link, ping_until, test_number, wait_until};

fn main() -> Result<()> {
    let seconds: u32 = match std::env::args().nth(1) {
        Some(text) => text.parse().context("the argument is the duration in seconds")?,
        None => 10,
    };
    let test = test_number();
    let server = Namespace::create(test, "srv")?;
    let client = Namespace::create(test, "cli")?;
    link(&client, "192.0.2.2/24", &server, "192.0.2.1/24")?;

    let (server_key, client_key) = (key(), key());
    let server_tunnel = server.start_tunnel(TunnelConfig {
        interface_name: "wg-srv".into(),
        private_key: server_key,
        address: "100.64.0.1/24".parse()?,
        listen_port: None,
        peers: vec![PeerConfig {
            public_key: client_key.public_key(),
            endpoint: None,
            allowed_ips: vec!["100.64.0.2/32".parse()?],
            persistent_keepalive: None,
        }],
    })?;
    let client_tunnel = client.start_tunnel(TunnelConfig {
        interface_name: "wg-cli".into(),
        private_key: client_key,
        address: "100.64.0.2/24".parse()?,
        listen_port: None,
        peers: vec![PeerConfig {
            public_key: server_tunnel.public_key(),
            endpoint: Some(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), server_tunnel.listen_port()))),
            allowed_ips: vec!["100.64.0.0/24".parse()?],
            persistent_keepalive: Some(25),
        }],
    })?;
    ping_until(&client, "100.64.0.1", Duration::from_secs(10))?;

    let tunnel = iperf(&server, &client, "100.64.0.1", seconds)?;
    let veth = iperf(&server, &client, "192.0.2.1", seconds)?;
    println!("tunnel (boringtun Tunn, this I/O loop), 1 TCP stream, {seconds} s: {tunnel:.2} Gb/s");
    println!("bare veth, 1 TCP stream, {seconds} s:                           {veth:.2} Gb/s");
    let stats = server_tunnel.stats();
    if let Some(peer) = stats.first() {
        println!("server side: rx {} MB, tx {} MB from/to the client", peer.rx_bytes >> 20, peer.tx_bytes >> 20);
    }
    drop(client_tunnel);
    drop(server_tunnel);
    Ok(())
}

/// Runs one `iperf3` test from `client` to a one-shot server on `address` in `server`, and
/// returns the received rate in Gb/s.
fn iperf(server: &Namespace, client: &Namespace, address: &str, seconds: u32) -> Result<f64> {
    let mut daemon = server
        .command("iperf3")
        .args(["--server", "--one-off", "--bind", address])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start iperf3 (apt-get install iperf3)")?;
    // Connecting to see whether the server listens would count as its one client, so look at
    // the listening sockets instead.
    let listening = wait_until(Duration::from_secs(10), || {
        server
            .exec("ss", &["--listening", "--tcp", "--numeric"])
            .map(|output| String::from_utf8_lossy(&output.stdout).contains(&format!("{address}:5201")))
            .unwrap_or(false)
    });
    if !listening {
        let _ = daemon.kill();
        let _ = daemon.wait();
        bail!("iperf3 did not start listening on {address}");
    }
    let output = client.exec("iperf3", &["--client", address, "--time", &seconds.to_string(), "--json"]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let report: serde_json::Value = serde_json::from_slice(&output?.stdout)?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("the iperf3 report has no end.sum_received.bits_per_second")?;
    Ok(bits / 1e9)
}
