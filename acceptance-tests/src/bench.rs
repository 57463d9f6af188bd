//! The side-by-side benchmark of issue 8 (`src/bin/bench.rs`): the Edgible path (edge →
//! WireGuard → agent proxy) against the stack the system Edgible models is built from
//! (HAProxy → boringtun-cli → Caddy), both in one namespace topology (client, edge, dev1,
//! plus the server), in front of the same origin, measured in alternating runs.
//!
//! - `parse`: what the tools print (iperf3, wrk, h2load, curl, `/proc`), pure.
//! - `report`: figures, samples, medians, the Markdown table and issue 8's targets, pure.
//! - `load`: running the tools in the namespaces, `/proc` readings, idle connections.
//! - `anchor`: HAProxy, boringtun-cli and Caddy, configured and started.
//! - `edgible`: server, edge and agent, with the application deployed.
//!
//! It is a measurement, not a test: nothing here is part of the suite's pass/fail, but the
//! pure parts are unit tested.

pub mod anchor;
pub mod edgible;
pub mod load;
pub mod parse;
pub mod report;

use std::path::{Path, PathBuf};

/// Where `cargo install boringtun-cli --locked --root target/bench-tools` puts it.
pub fn default_boringtun() -> PathBuf {
    crate::target_dir().join("bench-tools/bin/boringtun-cli")
}

/// The full path of `name` on `PATH` (and the sbin directories, which a non-login root shell
/// may lack), or an error naming the Debian package that has it.
pub fn program(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| anyhow::anyhow!("{name} is not installed: apt-get install {}", debian_package(name)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// The Debian package of each program the benchmark runs.
pub fn debian_package(program: &str) -> &str {
    match program {
        "wg" => "wireguard-tools",
        "h2load" => "nghttp2-client",
        "ss" | "ip" => "iproute2",
        "nsenter" => "util-linux",
        other => other,
    }
}

/// The programs the benchmark runs, besides boringtun-cli and the workspace's binaries.
pub const PROGRAMS: [&str; 9] = ["haproxy", "caddy", "wg", "iperf3", "wrk", "h2load", "curl", "ss", "nsenter"];

/// A hosts file for one namespace: `ip netns exec NAME` bind-mounts `/etc/netns/NAME/hosts`
/// over `/etc/hosts`, so `wrk` and `h2load` (which cannot be told an address for a name)
/// resolve the benchmark's hostname to the edge. Removed on drop.
pub struct NamespaceHosts {
    dir: PathBuf,
}

/// Where `ip netns exec` looks for per-namespace files.
const NETNS_ETC: &str = "/etc/netns";

impl NamespaceHosts {
    pub fn write(namespace: &str, entries: &[(std::net::Ipv4Addr, &str)]) -> anyhow::Result<Self> {
        let dir = Path::new(NETNS_ETC).join(namespace);
        std::fs::create_dir_all(&dir)?;
        let mut text = String::from("127.0.0.1 localhost\n");
        for (address, name) in entries {
            text.push_str(&format!("{address} {name}\n"));
        }
        std::fs::write(dir.join("hosts"), text)?;
        Ok(Self { dir })
    }

    /// Removes what runs of `tag` whose process is gone left in `/etc/netns`
    /// (`eg-<tag>-<pid>-<role>`, as `netns` names namespaces).
    pub fn remove_stale(tag: &str) {
        let Ok(entries) = std::fs::read_dir(NETNS_ETC) else { return };
        let prefix = format!("eg-{tag}-");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(&prefix).and_then(|rest| rest.split('-').next()) else { continue };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Drop for NamespaceHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The machine, in one line: CPU model and count, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    describe_machine(&cpuinfo, &meminfo, kernel.trim())
}

/// [`machine`] from the texts of `/proc/cpuinfo` and `/proc/meminfo` and the kernel release.
pub fn describe_machine(cpuinfo: &str, meminfo: &str, kernel: &str) -> String {
    let model = cpuinfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, model)| model.trim())
        })
        .unwrap_or("unknown CPU");
    let cpus = cpuinfo.lines().filter(|line| line.starts_with("processor")).count();
    let memory_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib as f64 / (1024.0 * 1024.0));
    let memory = memory_gib.map_or_else(|| "unknown memory".to_owned(), |gib| format!("{gib:.0} GiB RAM"));
    format!("{cpus} × {model}, {memory}, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_described_from_proc() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        let meminfo = "MemTotal:       24598064 kB\nMemFree:        1 kB\n";
        assert_eq!(
            describe_machine(cpuinfo, meminfo, "6.1.0-28-amd64"),
            "2 × AMD EPYC 7B13, 23 GiB RAM, Linux 6.1.0-28-amd64"
        );
        assert_eq!(describe_machine("", "", "6.1"), "0 × unknown CPU, unknown memory, Linux 6.1");
    }

    #[test]
    fn missing_programs_name_their_debian_package() {
        let error = program("edgible-no-such-program-h2load").expect_err("not installed");
        assert!(error.to_string().contains("apt-get install edgible-no-such-program-h2load"), "{error}");
        assert_eq!(debian_package("h2load"), "nghttp2-client");
        assert_eq!(debian_package("wg"), "wireguard-tools");
        assert_eq!(debian_package("haproxy"), "haproxy");
        assert!(program("sh").is_ok());
    }
}
