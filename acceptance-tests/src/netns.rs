//! Network namespaces for the data path tests and the local platform: one namespace per role
//! (server, edge, devices, client), all joined to a Linux bridge that lives in a namespace of
//! its own (`<prefix>-wan`), on the documentation range 203.0.113.0/24. The test's own (root)
//! namespace joins the bridge too, as 203.0.113.254, so the test process, the CLI and
//! `terraform` reach the server without entering a namespace.
//!
//! Names: namespaces are `eg-<tag>-<pid>-<role>`, so a run removes what an earlier, killed run
//! of the same tag left behind (its pid is gone) without touching a live one. Interfaces
//! inside a namespace have fixed short names (`wan0`, `br0`, `v-<role>`); the only interface in
//! the root namespace is `eg<pid>x<n>`, within the kernel's 15 characters.
//!
//! Only one topology exists at a time on a machine: each one routes 203.0.113.0/24 from the
//! root namespace into its bridge, and two such routes would conflict. [`Topology::build`]
//! takes a lock file for the topology's lifetime, so concurrent tests wait for each other.
//!
//! Dropping a [`Topology`] kills every process still running in its namespaces and deletes
//! them (the root link goes with its peer), also when a test panics. Everything here needs
//! root: namespaces, veths, nftables and TUN interfaces.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The underlay network every namespace is on.
pub const WAN_PREFIX_LEN: u8 = 24;
/// The edge's underlay address.
pub const EDGE_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The server's underlay address.
pub const SERVER_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The first device's underlay address.
pub const DEV1_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
/// The second device's underlay address.
pub const DEV2_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 22);
/// The client's underlay address (what `X-Forwarded-For` must show).
pub const CLIENT_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The ACME CA's (Pebble's) underlay address.
pub const ACME_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
/// The root namespace's address on the bridge.
pub const ROOT_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);

/// The name of every role namespace's interface into the bridge.
pub const WAN_INTERFACE: &str = "wan0";

/// Where the lock serializing topologies lives.
const LOCK_FILE: &str = "/run/edgible-acceptance-topology.lock";
/// How long [`Topology::build`] waits for another topology to go away.
const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);

/// What went wrong building or using namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "this needs root: it creates network namespaces, veth pairs, nftables rules and TUN interfaces \
         (run it with sudo, or as root in a container with CAP_NET_ADMIN)"
    )]
    NotRoot,
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {output}")]
    Failed { command: String, status: std::process::ExitStatus, output: String },
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    TimedOut { command: String, timeout: Duration },
    #[error("no namespace for role {0:?} in this topology")]
    UnknownRole(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another topology held {LOCK_FILE} for {0:?}; is a test or `local_platform` still running?")]
    LockTimeout(Duration),
}

type Result<T, E = NetnsError> = std::result::Result<T, E>;

/// Fails with [`NetnsError::NotRoot`] unless this process runs as root.
pub fn require_root() -> Result<()> {
    if nix::unistd::Uid::effective().is_root() { Ok(()) } else { Err(NetnsError::NotRoot) }
}

/// Runs a command to completion, failing with its output unless it succeeds; answers stdout.
pub fn run(command: &mut Command) -> Result<String> {
    let text = describe(command);
    let output =
        command.stdin(Stdio::null()).output().map_err(|source| NetnsError::Spawn { command: text.clone(), source })?;
    if !output.status.success() {
        return Err(NetnsError::Failed { command: text, status: output.status, output: output_text(&output) });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command to completion like [`Command::output`], but kills it and fails when it takes
/// longer than `timeout`.
pub fn output_within(command: &mut Command, timeout: Duration) -> Result<Output> {
    let text = describe(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetnsError::Spawn { command: text.clone(), source })?;
    // Read both pipes on threads, so a chatty command cannot block on a full pipe.
    let stdout = child.stdout.take().map(read_on_thread);
    let stderr = child.stderr.take().map(read_on_thread);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NetnsError::TimedOut { command: text, timeout });
            }
            Err(source) => return Err(NetnsError::Spawn { command: text, source }),
        }
    };
    let collect = |reader: Option<std::thread::JoinHandle<Vec<u8>>>| {
        reader.and_then(|reader| reader.join().ok()).unwrap_or_default()
    };
    Ok(Output { status, stdout: collect(stdout), stderr: collect(stderr) })
}

fn read_on_thread(mut pipe: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// stdout and stderr of a finished command, for messages.
pub fn output_text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)).trim().to_owned()
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// One network namespace, by name. It does not delete itself: the [`Topology`] owns it.
#[derive(Debug, Clone)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for `nsenter --net=` and `setns(2)`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command running `program` inside the namespace with `ip netns exec`, for short
    /// commands (`curl`, `nft`). `ip netns exec` remounts `/sys` in a mount namespace of its
    /// own, which hides the cgroup hierarchy: long-running platform processes use
    /// [`Namespace::nsenter`] instead.
    pub fn exec(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// A command running `program` inside the namespace with `nsenter --net=`, which changes
    /// only the network namespace (cgroups, `/sys` and `/proc` stay the host's).
    pub fn nsenter(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        command
    }

    /// Starts `command` (made by [`Namespace::nsenter`] or [`Namespace::exec`]) with its
    /// output appended to `log`, as process `name` (for messages).
    pub fn spawn(&self, name: &str, mut command: Command, log: &Path) -> Result<NsProcess> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| NetnsError::Io { what: format!("opening {}", log.display()), source })?;
        let stderr =
            file.try_clone().map_err(|source| NetnsError::Io { what: format!("opening {}", log.display()), source })?;
        let text = describe(&command);
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|source| NetnsError::Spawn { command: text, source })?;
        Ok(NsProcess { child, name: name.to_owned(), log: log.to_owned() })
    }

    /// Whether process `pid` runs in this namespace (same namespace file, by device and inode).
    pub fn holds_pid(&self, pid: u32) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let (Ok(process), Ok(namespace)) =
            (std::fs::metadata(format!("/proc/{pid}/ns/net")), std::fs::metadata(self.path()))
        else {
            return false;
        };
        (process.dev(), process.ino()) == (namespace.dev(), namespace.ino())
    }

    /// The pids of every process whose network namespace this is.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(output) = Command::new("ip").args(["netns", "pids", &self.name]).stderr(Stdio::null()).output() else {
            return Vec::new();
        };
        String::from_utf8_lossy(&output.stdout).split_whitespace().filter_map(|pid| pid.parse().ok()).collect()
    }

    /// Kills (SIGKILL) every process in the namespace.
    pub fn kill_all(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Loads an nftables script (`nft -f -`) in the namespace, e.g. a table a test adds to cut
    /// a path and deletes (`delete table ...`) to restore it.
    pub fn nft_script(&self, script: &str) -> Result<()> {
        let mut command = self.exec("nft");
        command.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let text = describe(&command);
        let mut child = command.spawn().map_err(|source| NetnsError::Spawn { command: text.clone(), source })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|source| NetnsError::Io { what: "writing the nftables script".into(), source })?;
        }
        let output = child.wait_with_output().map_err(|source| NetnsError::Spawn { command: text.clone(), source })?;
        if !output.status.success() {
            return Err(NetnsError::Failed { command: text, status: output.status, output: output_text(&output) });
        }
        Ok(())
    }

    /// Loads the device firewall: every new connection from the underlay is dropped; only
    /// traffic of connections the device made itself (established, related), loopback and the
    /// tunnel interface pass.
    pub fn install_device_firewall(&self) -> Result<()> {
        let mut command = self.exec("nft");
        command.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let text = describe(&command);
        let mut child = command.spawn().map_err(|source| NetnsError::Spawn { command: text.clone(), source })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(DEVICE_RULESET.as_bytes())
                .map_err(|source| NetnsError::Io { what: "writing the nftables rule set".into(), source })?;
        }
        let output = child.wait_with_output().map_err(|source| NetnsError::Spawn { command: text.clone(), source })?;
        if !output.status.success() {
            return Err(NetnsError::Failed { command: text, status: output.status, output: output_text(&output) });
        }
        Ok(())
    }
}

/// The rule set of a device namespace. The tunnel interfaces (`edgible*`) are accepted
/// because they are the overlay: a packet on them was decrypted by WireGuard, authenticated as
/// coming from a peer (an edge of the pool) and ingress-filtered to that peer's address; the
/// device proxy then admits only the edges' addresses. The underlay itself sees only the
/// replies to what the device sent (its WireGuard handshakes and keepalives, its session to
/// the server), which is the product's promise: a device accepts no inbound connection.
pub const DEVICE_RULESET: &str = "\
table inet edgible_test {
  chain input {
    type filter hook input priority 0; policy accept;
    ct state established,related accept
    iifname \"lo\" accept
    iifname \"edgible*\" accept
    ct state new drop
  }
}
";

/// A process running in a namespace, its output in a log file. Dropping it stops it (SIGTERM,
/// then SIGKILL after 10 s).
#[derive(Debug)]
pub struct NsProcess {
    child: Child,
    name: String,
    log: PathBuf,
}

impl NsProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// The log so far (its last 8 KiB), for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 8 << 10)
    }

    /// Whether it still runs; `Err` with its exit status and log when it does not.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                anyhow::bail!("{} exited with {status}; its log ends with:\n{}", self.name, self.log_tail())
            }
        }
    }

    /// Kills it at once (SIGKILL) and waits, like a crash or a power cut.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it with SIGTERM, waiting up to `grace`, then SIGKILL. Answers whether it exited
    /// within the grace period.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return true;
        }
        let Ok(pid) = i32::try_from(self.child.id()) else {
            self.kill();
            return false;
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The last `max` bytes of a file, lossily decoded.
pub fn log_tail(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// A role namespace and its underlay address.
#[derive(Debug)]
struct Member {
    role: String,
    namespace: Namespace,
    address: Ipv4Addr,
}

/// Namespaces for roles on one bridge, plus the root namespace's link to it. See the module
/// documentation.
#[derive(Debug)]
pub struct Topology {
    tag: String,
    wan: Namespace,
    members: Vec<Member>,
    root_link: String,
    // Released last, after everything is deleted (fields drop after `drop` runs).
    _lock: File,
}

impl Topology {
    /// Builds namespaces `eg-<tag>-<pid>-<role>` for `roles` (role, underlay address), the
    /// bridge, and the root link, after removing what an earlier run with the same `tag` left.
    /// `tag` is a few lowercase letters naming the test.
    pub fn build(tag: &str, roles: &[(&str, Ipv4Addr)]) -> Result<Self> {
        require_root()?;
        let lock = lock_topology()?;
        remove_stale(tag);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let root_link = format!("eg{pid}x{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let base = format!("eg-{tag}-{pid}");
        // From here on, `Drop` cleans up whatever was made, also when a later step fails.
        let mut topology = Topology {
            tag: tag.to_owned(),
            wan: Namespace { name: format!("{base}-wan") },
            members: Vec::new(),
            root_link,
            _lock: lock,
        };
        create_namespace(&topology.wan)?;
        topology.wan.ip(&["link", "add", "br0", "type", "bridge"])?;
        topology.wan.ip(&["link", "set", "br0", "up"])?;
        for (role, address) in roles {
            let namespace = Namespace { name: format!("{base}-{role}") };
            create_namespace(&namespace)?;
            topology.members.push(Member { role: (*role).to_owned(), namespace, address: *address });
            let member = topology.members.last().ok_or_else(|| NetnsError::UnknownRole((*role).to_owned()))?;
            let bridge_end = format!("v-{role}");
            topology.wan.ip(&[
                "link",
                "add",
                &bridge_end,
                "type",
                "veth",
                "peer",
                "name",
                WAN_INTERFACE,
                "netns",
                member.namespace.name(),
            ])?;
            topology.wan.ip(&["link", "set", &bridge_end, "master", "br0"])?;
            topology.wan.ip(&["link", "set", &bridge_end, "up"])?;
            let cidr = format!("{address}/{WAN_PREFIX_LEN}");
            member.namespace.ip(&["addr", "add", &cidr, "dev", WAN_INTERFACE])?;
            member.namespace.ip(&["link", "set", WAN_INTERFACE, "up"])?;
        }
        // The root link: created in the root namespace, its peer moved into the bridge's.
        ip(&[
            "link",
            "add",
            &topology.root_link,
            "type",
            "veth",
            "peer",
            "name",
            "v-root",
            "netns",
            topology.wan.name(),
        ])?;
        topology.wan.ip(&["link", "set", "v-root", "master", "br0"])?;
        topology.wan.ip(&["link", "set", "v-root", "up"])?;
        ip(&["addr", "add", &format!("{ROOT_ADDRESS}/{WAN_PREFIX_LEN}"), "dev", &topology.root_link])?;
        ip(&["link", "set", &topology.root_link, "up"])?;
        Ok(topology)
    }

    /// The tag the topology was built with.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The namespace of `role`.
    pub fn namespace(&self, role: &str) -> Result<&Namespace> {
        self.member(role).map(|member| &member.namespace)
    }

    /// The current underlay address of `role`.
    pub fn address(&self, role: &str) -> Result<Ipv4Addr> {
        self.member(role).map(|member| member.address)
    }

    fn member(&self, role: &str) -> Result<&Member> {
        self.members.iter().find(|member| member.role == role).ok_or_else(|| NetnsError::UnknownRole(role.to_owned()))
    }

    /// Moves `role` to a new underlay address, like a laptop changing networks: the old
    /// address goes (connections using it die), the new one comes. All peers are on the
    /// bridge's subnet, so no route other than the subnet's (which comes with the address) is
    /// needed.
    pub fn readdress(&mut self, role: &str, address: Ipv4Addr) -> Result<()> {
        let member = self
            .members
            .iter_mut()
            .find(|member| member.role == role)
            .ok_or_else(|| NetnsError::UnknownRole(role.to_owned()))?;
        let old = format!("{}/{WAN_PREFIX_LEN}", member.address);
        let new = format!("{address}/{WAN_PREFIX_LEN}");
        member.namespace.ip(&["addr", "del", &old, "dev", WAN_INTERFACE])?;
        member.namespace.ip(&["addr", "add", &new, "dev", WAN_INTERFACE])?;
        member.address = address;
        Ok(())
    }

    /// Every namespace of the topology, the bridge's last.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.members.iter().map(|member| &member.namespace).chain(std::iter::once(&self.wan))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for namespace in self.namespaces() {
            namespace.kill_all();
        }
        // Killed processes release their sockets and TUN devices asynchronously; a namespace
        // with a process left in it would stay alive after `delete`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.namespaces().any(|namespace| !namespace.pids().is_empty()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for namespace in self.namespaces() {
            if let Err(error) = ip(&["netns", "delete", namespace.name()]) {
                eprintln!("cannot delete namespace {}: {error}", namespace.name());
            }
        }
        // Deleting the bridge's namespace deletes the root link's peer, and so the link; this is
        // for a topology whose bridge namespace was never made.
        let _ = Command::new("ip").args(["link", "delete", &self.root_link]).stderr(Stdio::null()).status();
    }
}

fn create_namespace(namespace: &Namespace) -> Result<()> {
    ip(&["netns", "add", namespace.name()])?;
    namespace.ip(&["link", "set", "lo", "up"])?;
    Ok(())
}

/// Takes the machine-wide topology lock, waiting for another topology to go away.
fn lock_topology() -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(|source| NetnsError::Io { what: format!("opening {LOCK_FILE}"), source })?;
    let deadline = Instant::now() + LOCK_WAIT;
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(NetnsError::Io { what: format!("locking {LOCK_FILE}"), source });
            }
        }
        if !told {
            eprintln!("waiting for another namespace topology (lock {LOCK_FILE}) to be torn down");
            told = true;
        }
        if Instant::now() >= deadline {
            return Err(NetnsError::LockTimeout(LOCK_WAIT));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Deletes namespaces `eg-<tag>-<pid>-*` whose process is gone, killing what runs in them.
fn remove_stale(tag: &str) {
    let Ok(list) = ip(&["netns", "list"]) else { return };
    let prefix = format!("eg-{tag}-");
    for line in list.lines() {
        // Lines look like `NAME` or `NAME (id: 3)`.
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let stale = Namespace { name: name.to_owned() };
        eprintln!("removing stale namespace {name}");
        stale.kill_all();
        let _ = ip(&["netns", "delete", name]);
    }
}

/// The IPv4 addresses of a namespace's bridge link (`wan0`), as `ip -4 addr` shows them.
pub fn addresses(namespace: &Namespace) -> Result<Vec<Ipv4Addr>> {
    let text = namespace.ip(&["-4", "-o", "addr", "show", "dev", WAN_INTERFACE])?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_ruleset_drops_new_connections_and_trusts_only_loopback_and_the_tunnel() {
        let accepts: Vec<&str> =
            DEVICE_RULESET.lines().map(str::trim).filter(|line| line.ends_with("accept")).collect();
        assert_eq!(
            accepts,
            ["ct state established,related accept", "iifname \"lo\" accept", "iifname \"edgible*\" accept"]
        );
        let last_rule = DEVICE_RULESET.lines().map(str::trim).rfind(|line| !line.is_empty() && *line != "}");
        assert_eq!(last_rule, Some("ct state new drop"));
    }

    #[test]
    fn a_failed_command_says_what_it_ran_and_what_it_printed() {
        let error = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).expect_err("exit 3 is a failure");
        let message = error.to_string();
        assert!(message.contains("sh -c"), "{message}");
        assert!(message.contains("oops"), "{message}");
    }

    #[test]
    fn a_command_that_hangs_is_killed_at_its_deadline() -> anyhow::Result<()> {
        let started = Instant::now();
        let error = output_within(Command::new("sleep").arg("30"), Duration::from_millis(300)).expect_err("it hangs");
        assert!(matches!(error, NetnsError::TimedOut { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let output = output_within(Command::new("sh").args(["-c", "echo out; echo err >&2"]), Duration::from_secs(10))?;
        assert!(output.status.success());
        assert_eq!((output.stdout.as_slice(), output.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
        Ok(())
    }

    #[test]
    fn log_tail_keeps_the_end() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log");
        std::fs::write(&path, "first line\nlast line\n")?;
        assert_eq!(log_tail(&path, 10), "last line\n");
        assert_eq!(log_tail(&dir.path().join("missing"), 10), "");
        Ok(())
    }

    /// The whole topology for real: every role reaches every other and the root namespace
    /// reaches them; a readdressed role answers at its new address only; the device firewall
    /// drops new inbound connections but lets the device dial out; and everything is gone
    /// after drop, processes too.
    #[test]
    fn topology_connects_roles_and_cleans_up() -> anyhow::Result<()> {
        if !crate::heavy_tier("topology_connects_roles_and_cleans_up") {
            return Ok(());
        }
        let mut topology = Topology::build(
            "nt",
            &[("edge", EDGE_ADDRESS), ("server", SERVER_ADDRESS), ("dev1", DEV1_ADDRESS), ("client", CLIENT_ADDRESS)],
        )?;
        let names: Vec<String> = topology.namespaces().map(|namespace| namespace.name().to_owned()).collect();
        for role in ["edge", "server", "dev1"] {
            let ping = topology
                .namespace("client")?
                .exec("ping")
                .args(["-c1", "-W2", "-q"])
                .arg(topology.address(role)?.to_string())
                .output()?;
            anyhow::ensure!(ping.status.success(), "client cannot ping {role}: {}", output_text(&ping));
        }
        let ping = Command::new("ping").args(["-c1", "-W2", "-q"]).arg(SERVER_ADDRESS.to_string()).output()?;
        anyhow::ensure!(ping.status.success(), "the root namespace cannot ping the server: {}", output_text(&ping));

        // A listener in dev1, behind the firewall, is not reachable; dev1 can dial out.
        let dev1 = topology.namespace("dev1")?.clone();
        dev1.install_device_firewall()?;
        let server = topology.namespace("server")?.clone();
        let listener = server.spawn(
            "listener",
            {
                let mut command = server.nsenter(Path::new("/usr/bin/python3"));
                command.args(["-m", "http.server", "8080", "--bind", &SERVER_ADDRESS.to_string()]);
                command
            },
            &std::env::temp_dir().join(format!("eg-nt-{}.log", std::process::id())),
        )?;
        let dial = crate::wait_until_sync(Duration::from_secs(20), || {
            dev1.exec("curl")
                .args(["-sS", "-m", "2", &format!("http://{SERVER_ADDRESS}:8080/")])
                .output()
                .is_ok_and(|output| output.status.success())
        });
        anyhow::ensure!(dial, "dev1 cannot dial out to the server through its firewall");
        let inbound = topology
            .namespace("client")?
            .exec("ping")
            .args(["-c1", "-W1", "-q"])
            .arg(DEV1_ADDRESS.to_string())
            .output()?;
        anyhow::ensure!(!inbound.status.success(), "a new inbound packet reached dev1 through its firewall");
        drop(listener);

        topology.readdress("dev1", Ipv4Addr::new(203, 0, 113, 31))?;
        assert_eq!(addresses(&dev1)?, [Ipv4Addr::new(203, 0, 113, 31)]);
        let out = dev1.exec("ping").args(["-c1", "-W2", "-q", &EDGE_ADDRESS.to_string()]).output()?;
        anyhow::ensure!(out.status.success(), "dev1 cannot reach the edge from its new address: {}", output_text(&out));

        // A process left running is killed by the drop.
        let mut sleeper = Command::new("nsenter")
            .arg(format!("--net={}", dev1.path().display()))
            .args(["--", "sleep", "600"])
            .spawn()?;
        anyhow::ensure!(
            crate::wait_until_sync(Duration::from_secs(5), || dev1.holds_pid(sleeper.id())),
            "the process started with nsenter is not in dev1's namespace"
        );
        anyhow::ensure!(!dev1.holds_pid(std::process::id()), "the test process is not in dev1's namespace");
        drop(topology);
        let list = ip(&["netns", "list"])?;
        for name in &names {
            anyhow::ensure!(
                !list.lines().any(|line| line.split_whitespace().next() == Some(name)),
                "{name} survived: {list}"
            );
        }
        let killed = crate::wait_until_sync(Duration::from_secs(5), || matches!(sleeper.try_wait(), Ok(Some(_))));
        if !killed {
            let _ = sleeper.kill();
            let _ = sleeper.wait();
            anyhow::bail!("a process in a namespace survived the topology");
        }
        Ok(())
    }
}
