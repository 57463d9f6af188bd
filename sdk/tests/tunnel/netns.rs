//! Network namespaces for the tunnel tests and the throughput example: created with
//! `ip netns`, entered by threads with `setns(2)`, and always deleted on drop, also when a
//! test fails. Only documentation ranges are used on the links between namespaces.

#![allow(dead_code)]

use std::fs::File;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgible::tunnel::{PrivateKey, Tunnel, TunnelConfig};
use nix::sched::{CloneFlags, setns};

/// The tests need root, `ip` (iproute2) and `ping` (iputils-ping); CI sets `EDGIBLE_ACC=1`.
pub fn is_heavy() -> bool {
    if std::env::var("EDGIBLE_ACC").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "skipped: set EDGIBLE_ACC=1 to run the tunnel tests in network namespaces \
         (they need root, iproute2 and iputils-ping)"
    );
    false
}

/// Runs a command, failing with its output when it does not succeed.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let output = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// A network namespace that exists as long as this value.
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates `edg-<pid>-<n>-<role>`: unique per process (the pid) and per test in it (`n`).
    pub fn create(test: u32, role: &str) -> Result<Self> {
        let name = format!("edg-{}-{test}-{role}", std::process::id());
        // A namespace left over by a killed run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        run("ip", &["netns", "add", &name])?;
        let namespace = Self { name };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that runs `program` inside the namespace, to spawn.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Makes the calling thread enter the namespace (sockets and interfaces it creates from
    /// then on belong to it).
    pub fn enter(&self) -> Result<()> {
        let file = File::open(format!("/run/netns/{}", self.name)).context("cannot open the namespace")?;
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(())
    }

    /// Runs `work` on a new thread inside the namespace and waits for it.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|scope| match self.spawn(scope, work).join() {
            Ok(result) => result,
            Err(_) => bail!("a thread in namespace {} panicked", self.name),
        })
    }

    /// Runs `work` on a new scoped thread inside the namespace.
    pub fn spawn<'scope, 'env, T: Send + 'scope>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        work: impl FnOnce() -> Result<T> + Send + 'scope,
    ) -> ScopedJoinHandle<'scope, Result<T>> {
        scope.spawn(move || {
            self.enter()?;
            work()
        })
    }

    /// Starts a tunnel inside the namespace.
    pub fn start_tunnel(&self, config: TunnelConfig) -> Result<Tunnel> {
        self.run(|| Ok(Tunnel::start(config)?))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("cannot delete namespace {}: {error:#}", self.name);
        }
    }
}

/// A number unique to each call in this process, to tell tests apart in namespace names.
pub fn test_number() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Joins `a` and `b` with a veth pair named after the other side, addressed `a_address` and
/// `b_address` (with prefix, e.g. `192.0.2.2/24`).
pub fn link(a: &Namespace, a_address: &str, b: &Namespace, b_address: &str) -> Result<()> {
    let a_link = format!("to-{}", role(b));
    let b_link = format!("to-{}", role(a));
    a.ip(&["link", "add", &a_link, "type", "veth", "peer", "name", &b_link, "netns", b.name()])?;
    a.ip(&["addr", "add", a_address, "dev", &a_link])?;
    b.ip(&["addr", "add", b_address, "dev", &b_link])?;
    a.ip(&["link", "set", &a_link, "up"])?;
    b.ip(&["link", "set", &b_link, "up"])?;
    Ok(())
}

/// The role part of a namespace's name (`a`, `edge`, ...).
pub fn role(namespace: &Namespace) -> &str {
    namespace.name().rsplit('-').next().unwrap_or("x")
}

/// A fresh key pair.
pub fn key() -> PrivateKey {
    PrivateKey::generate().expect("the OS random source works")
}

/// Checks `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pings `address` from `namespace` until one echo comes back or `timeout` passes; returns how
/// long it took.
pub fn ping_until(namespace: &Namespace, address: &str, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    if wait_until(timeout, || namespace.exec("ping", &["-c", "1", "-W", "1", "-q", address]).is_ok()) {
        Ok(started.elapsed())
    } else {
        bail!("no answer to ping from {} to {address} within {timeout:?}", namespace.name())
    }
}
