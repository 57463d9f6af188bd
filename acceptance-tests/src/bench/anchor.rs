//! The anchor stack, built from what the system Edgible models is built from: HAProxy in TCP
//! mode in the edge namespace, routing by the ClientHello's SNI (`req.ssl_sni`) into a
//! userspace WireGuard tunnel made by `boringtun-cli` (one worker thread, its best setting on
//! a small machine; configured with `wg`), and Caddy in the device namespace terminating TLS
//! with its internal CA (`tls internal`) and reverse proxying to the same origin the agent
//! serves.
//!
//! Caddy 2.6 (Debian 12) has no PROXY protocol listener, so unlike the Edgible edge, HAProxy
//! sends no PROXY header; the anchor saves those few bytes per connection.
//!
//! The configuration texts are pure functions, tested below; [`Anchor::start`] writes them and
//! starts the processes, which stop when it is dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::load::wait_listening;
use crate::netns::{Namespace, NsProcess, output_text, output_within, run};

/// The anchor's tunnel network: the edge end, then the device end.
pub const TUNNEL_EDGE: Ipv4Addr = Ipv4Addr::new(100, 64, 200, 1);
pub const TUNNEL_DEVICE: Ipv4Addr = Ipv4Addr::new(100, 64, 200, 2);
const TUNNEL_PREFIX_LEN: u8 = 24;
/// The tunnel's MTU: 1500 minus WireGuard's 80 bytes of overhead, as `wg-quick` sets it.
const TUNNEL_MTU: u16 = 1420;
/// The UDP ports of the two tunnel ends.
const EDGE_UDP_PORT: u16 = 51821;
const DEVICE_UDP_PORT: u16 = 51822;
/// Where HAProxy listens on the edge: a port of its own, since the Edgible edge has 443.
pub const HAPROXY_PORT: u16 = 8443;
/// Where `wg` and `boringtun-cli` meet: one UAPI socket per interface, on the shared file
/// system (so interface names must differ machine-wide).
const UAPI_DIR: &str = "/var/run/wireguard";

/// The HAProxy configuration: TCP mode, wait for the ClientHello, route `server_name` to
/// `backend`; `maxconn` caps the concurrent connections (each holds two sockets).
pub fn haproxy_config(listen: SocketAddr, server_name: &str, backend: SocketAddr, maxconn: u32) -> String {
    format!(
        "\
global
\tmaxconn {maxconn}

defaults
\tmode tcp
\ttimeout connect 5s
\ttimeout client 300s
\ttimeout server 300s

frontend tls
\tbind {listen}
\ttcp-request inspect-delay 5s
\ttcp-request content accept if {{ req.ssl_hello_type 1 }}
\tuse_backend device if {{ req.ssl_sni -i {server_name} }}

backend device
\tserver device {backend}
"
    )
}

/// The Caddyfile: `server_name` on `bind:443` with a certificate from Caddy's internal CA,
/// reverse proxied to the origin on `127.0.0.1:origin_port`; no admin endpoint, no HTTP
/// redirect listener, no attempt to install the CA into the system's trust store.
pub fn caddyfile(server_name: &str, bind: Ipv4Addr, origin_port: u16) -> String {
    format!(
        "\
{{
\tadmin off
\tskip_install_trust
\tauto_https disable_redirects
}}

{server_name} {{
\tbind {bind}
\ttls internal
\treverse_proxy 127.0.0.1:{origin_port}
}}
"
    )
}

/// The anchor's processes. Dropping it stops them (Caddy and HAProxy first, then the tunnel)
/// and removes the tunnel's UAPI sockets.
pub struct Anchor {
    pub haproxy: NsProcess,
    pub caddy: NsProcess,
    pub tunnel_edge: NsProcess,
    pub tunnel_device: NsProcess,
    /// Caddy's root certificate (PEM) and its file.
    pub ca_pem: String,
    pub ca_file: PathBuf,
    interfaces: [String; 2],
}

/// What [`Anchor::start`] needs.
pub struct AnchorConfig<'a> {
    pub edge: &'a Namespace,
    pub device: &'a Namespace,
    /// The edge's underlay address (HAProxy listens on it) and the device's.
    pub edge_address: Ipv4Addr,
    pub boringtun: &'a Path,
    pub server_name: &'a str,
    pub origin_port: u16,
    pub maxconn: u32,
    /// Where configurations, keys, Caddy's data and the logs go.
    pub dir: &'a Path,
}

impl Anchor {
    /// Starts the tunnel, Caddy and HAProxy, and waits until each listens.
    pub fn start(config: &AnchorConfig<'_>) -> anyhow::Result<Self> {
        let dir = config.dir;
        std::fs::create_dir_all(dir)?;
        // Names within the kernel's 15 characters, unique per run (the UAPI sockets are shared).
        let pid = std::process::id();
        let interfaces = [format!("bt{pid}e"), format!("bt{pid}d")];
        let tunnel_edge = start_boringtun(config.edge, config.boringtun, &interfaces[0], dir)?;
        let tunnel_device = start_boringtun(config.device, config.boringtun, &interfaces[1], dir)?;
        // From here on, a failure drops the tunnel processes; the sockets go with `cleanup`.
        let result = configure_tunnel(config, &interfaces).and_then(|()| start_proxies(config)).map(
            |(haproxy, caddy, ca_pem, ca_file)| Anchor {
                haproxy,
                caddy,
                tunnel_edge,
                tunnel_device,
                ca_pem,
                ca_file,
                interfaces: interfaces.clone(),
            },
        );
        if result.is_err() {
            remove_uapi_sockets(&interfaces);
        }
        result
    }

    /// The processes on the edge side: HAProxy and its tunnel end.
    pub fn edge_pids(&self) -> Vec<u32> {
        vec![self.haproxy.pid(), self.tunnel_edge.pid()]
    }

    /// The processes on the device side: Caddy and its tunnel end.
    pub fn device_pids(&self) -> Vec<u32> {
        vec![self.caddy.pid(), self.tunnel_device.pid()]
    }

    /// The two tunnel ends.
    pub fn tunnel_pids(&self) -> Vec<u32> {
        vec![self.tunnel_edge.pid(), self.tunnel_device.pid()]
    }

    /// Whether every process still runs; an error with the log of the first that does not.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for process in [&mut self.haproxy, &mut self.caddy, &mut self.tunnel_edge, &mut self.tunnel_device] {
            process.check_running()?;
        }
        Ok(())
    }
}

impl Drop for Anchor {
    fn drop(&mut self) {
        for process in [&mut self.haproxy, &mut self.caddy, &mut self.tunnel_edge, &mut self.tunnel_device] {
            process.stop(Duration::from_secs(5));
        }
        remove_uapi_sockets(&self.interfaces);
    }
}

fn remove_uapi_sockets(interfaces: &[String]) {
    for interface in interfaces {
        let _ = std::fs::remove_file(Path::new(UAPI_DIR).join(format!("{interface}.sock")));
    }
}

/// Starts `boringtun-cli` with one worker thread in the foreground, and waits for its UAPI
/// socket.
fn start_boringtun(namespace: &Namespace, boringtun: &Path, interface: &str, dir: &Path) -> anyhow::Result<NsProcess> {
    let mut command = namespace.nsenter(boringtun);
    command
        .args(["--foreground", "--threads", "1", "--disable-drop-privileges", "--log"])
        .arg(dir.join(format!("{interface}.log")))
        .arg(interface);
    let mut process =
        namespace.spawn(&format!("boringtun-cli {interface}"), command, &dir.join(format!("{interface}.out")))?;
    let socket = Path::new(UAPI_DIR).join(format!("{interface}.sock"));
    let up = crate::wait_until_sync(Duration::from_secs(10), || socket.exists() || process.check_running().is_err());
    process.check_running()?;
    anyhow::ensure!(up, "boringtun-cli made no UAPI socket {} within 10 s", socket.display());
    Ok(process)
}

/// A new WireGuard private key from `wg genkey`, and its public key, the private one written
/// to `path` (0600).
fn wireguard_key(path: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let private =
        run(Command::new("wg").arg("genkey")).context("running `wg genkey` (apt-get install wireguard-tools)")?;
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    file.write_all(private.as_bytes())?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `wg pubkey`")?;
    child.stdin.take().context("wg pubkey's stdin")?.write_all(private.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "`wg pubkey` failed: {}", output_text(&output));
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Keys, peers, addresses, and a first handshake (the device dials the edge, as an agent does).
fn configure_tunnel(config: &AnchorConfig<'_>, interfaces: &[String; 2]) -> anyhow::Result<()> {
    let [edge_interface, device_interface] = interfaces;
    let edge_key = config.dir.join("edge.key");
    let device_key = config.dir.join("device.key");
    let edge_public = wireguard_key(&edge_key)?;
    let device_public = wireguard_key(&device_key)?;
    let edge_endpoint = SocketAddr::from((config.edge_address, EDGE_UDP_PORT));
    let wg = |namespace: &Namespace, args: Vec<String>| -> anyhow::Result<()> {
        let mut command = namespace.exec("wg");
        command.args(&args);
        let output = output_within(&mut command, Duration::from_secs(10))?;
        anyhow::ensure!(output.status.success(), "`wg {}` failed: {}", args.join(" "), output_text(&output));
        Ok(())
    };
    wg(
        config.edge,
        vec![
            "set".into(),
            edge_interface.clone(),
            "private-key".into(),
            edge_key.display().to_string(),
            "listen-port".into(),
            EDGE_UDP_PORT.to_string(),
            "peer".into(),
            device_public,
            "allowed-ips".into(),
            format!("{TUNNEL_DEVICE}/32"),
        ],
    )?;
    wg(
        config.device,
        vec![
            "set".into(),
            device_interface.clone(),
            "private-key".into(),
            device_key.display().to_string(),
            "listen-port".into(),
            DEVICE_UDP_PORT.to_string(),
            "peer".into(),
            edge_public,
            "allowed-ips".into(),
            format!("{TUNNEL_EDGE}/32"),
            "endpoint".into(),
            edge_endpoint.to_string(),
            "persistent-keepalive".into(),
            "25".into(),
        ],
    )?;
    for (namespace, interface, address) in
        [(config.edge, edge_interface, TUNNEL_EDGE), (config.device, device_interface, TUNNEL_DEVICE)]
    {
        namespace.ip(&["addr", "add", &format!("{address}/{TUNNEL_PREFIX_LEN}"), "dev", interface])?;
        namespace.ip(&["link", "set", interface, "mtu", &TUNNEL_MTU.to_string(), "up"])?;
    }
    let answered = crate::wait_until_sync(Duration::from_secs(20), || {
        let mut ping = config.device.exec("ping");
        ping.args(["-c1", "-W1", "-q", &TUNNEL_EDGE.to_string()]);
        output_within(&mut ping, Duration::from_secs(5)).is_ok_and(|output| output.status.success())
    });
    anyhow::ensure!(
        answered,
        "the boringtun tunnel does not carry a ping from the device to {TUNNEL_EDGE} within 20 s"
    );
    Ok(())
}

/// Caddy, then HAProxy; answers them, Caddy's root certificate and its file.
fn start_proxies(config: &AnchorConfig<'_>) -> anyhow::Result<(NsProcess, NsProcess, String, PathBuf)> {
    let dir = config.dir;
    let caddy_dir = dir.join("caddy");
    std::fs::create_dir_all(&caddy_dir)?;
    let caddyfile_path = dir.join("Caddyfile");
    std::fs::write(&caddyfile_path, caddyfile(config.server_name, TUNNEL_DEVICE, config.origin_port))?;
    let mut command = config.device.nsenter(&crate::bench::program("caddy")?);
    command
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&caddyfile_path)
        .env("HOME", &caddy_dir)
        .env("XDG_DATA_HOME", caddy_dir.join("data"))
        .env("XDG_CONFIG_HOME", caddy_dir.join("config"));
    let mut caddy = config.device.spawn("caddy", command, &dir.join("caddy.log"))?;
    let caddy_address = SocketAddr::from((TUNNEL_DEVICE, 443));
    wait_listening(config.device, caddy_address, Duration::from_secs(30))
        .map_err(|error| error.context(caddy.check_running().err().map(|e| e.to_string()).unwrap_or_default()))?;
    let ca_file = caddy_dir.join("data/caddy/pki/authorities/local/root.crt");
    let ready = crate::wait_until_sync(Duration::from_secs(30), || ca_file.is_file());
    anyhow::ensure!(ready, "Caddy made no internal CA at {} within 30 s:\n{}", ca_file.display(), caddy.log_tail());
    let ca_pem = std::fs::read_to_string(&ca_file)?;

    let haproxy_path = dir.join("haproxy.cfg");
    let listen = SocketAddr::from((config.edge_address, HAPROXY_PORT));
    std::fs::write(&haproxy_path, haproxy_config(listen, config.server_name, caddy_address, config.maxconn))?;
    let mut command = config.edge.nsenter(&crate::bench::program("haproxy")?);
    command.arg("-db").arg("-f").arg(&haproxy_path);
    let mut haproxy = config.edge.spawn("haproxy", command, &dir.join("haproxy.log"))?;
    wait_listening(config.edge, listen, Duration::from_secs(30))
        .map_err(|error| error.context(haproxy.check_running().err().map(|e| e.to_string()).unwrap_or_default()))?;
    Ok((haproxy, caddy, ca_pem, ca_file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_routes_by_sni_in_tcp_mode_to_the_tunnel() {
        let text = haproxy_config(
            SocketAddr::from((Ipv4Addr::new(203, 0, 113, 1), HAPROXY_PORT)),
            "bench.example.test",
            SocketAddr::from((TUNNEL_DEVICE, 443)),
            9_900,
        );
        for line in [
            "\tmaxconn 9900",
            "\tmode tcp",
            "\tbind 203.0.113.1:8443",
            "\ttcp-request content accept if { req.ssl_hello_type 1 }",
            "\tuse_backend device if { req.ssl_sni -i bench.example.test }",
            "\tserver device 100.64.200.2:443",
        ] {
            assert!(text.lines().any(|candidate| candidate == line), "{line:?} missing from:\n{text}");
        }
        assert!(!text.contains("send-proxy"), "Caddy 2.6 cannot read a PROXY header");
    }

    #[test]
    fn caddy_terminates_tls_with_its_internal_ca_and_proxies_to_the_origin() {
        let text = caddyfile("bench.example.test", TUNNEL_DEVICE, 18_090);
        assert!(text.contains("\nbench.example.test {\n\tbind 100.64.200.2\n\ttls internal\n"), "{text}");
        assert!(text.contains("\treverse_proxy 127.0.0.1:18090\n"), "{text}");
        assert!(text.contains("\tadmin off\n\tskip_install_trust\n"), "{text}");
        // Balanced braces: the global block and the site block.
        assert_eq!(text.matches('{').count(), 2);
        assert_eq!(text.matches('}').count(), 2);
    }
}
