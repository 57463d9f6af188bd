//! Guest networking: one tap device per VM, a /30 each out of `--vm-network` (host side `.1`,
//! guest `.2`), and one nftables table owned by the agent that isolates every guest.
//!
//! The isolation rule: a guest can reach nothing but answers to its own host side. Packets
//! from a tap are accepted into the host only when they belong to a connection the host opened
//! (conntrack `established`/`related`) and come from that VM's guest address; everything else a
//! guest sends is dropped, including forwarding to other guests, other host addresses and the
//! tunnel network. The table is rebuilt whole from the list of VMs on every change
//! ([`ruleset`] is pure), so it never drifts from what the driver runs.
//!
//! The slot allocation and the rule text are pure and unit tested; [`Tap`] and [`apply`] run
//! `ip` and `nft`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The nftables table the agent owns.
pub const TABLE: &str = "edgible_vm";
/// Tap devices are `edgvm<slot>`.
pub const TAP_PREFIX: &str = "edgvm";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("vm network {network} is too small: it needs at least a /30 per VM (prefix 30 or shorter)")]
    TooSmall { network: Ipv4Net },
    #[error("vm network {network} has no free /30 left ({slots} VMs)")]
    Exhausted { network: Ipv4Net, slots: usize },
    #[error("{command} failed: {reason}")]
    Command { command: String, reason: String },
}

/// The addresses of one VM's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub slot: u32,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
}

impl Link {
    pub fn tap(&self) -> String {
        format!("{TAP_PREFIX}{}", self.slot)
    }
}

/// Hands out /30s of a network by slot number, round robin: the first free slot after the one
/// handed out last. The proxy reaches a guest at its address, so an address freed by a stopped
/// VM is taken again by another application's VM as late as possible, never at once (a stale
/// address, a pooled connection to it, finds nothing rather than another tenant's guest).
#[derive(Debug, Clone)]
pub struct Allocator {
    network: Ipv4Net,
    used: BTreeSet<u32>,
    /// Where the search for the next free slot starts.
    next: u32,
}

impl Allocator {
    pub fn new(network: Ipv4Net) -> Result<Self, NetworkError> {
        if network.prefix_len() > 30 {
            return Err(NetworkError::TooSmall { network });
        }
        Ok(Self { network: network.trunc(), used: BTreeSet::new(), next: 0 })
    }

    fn slots(&self) -> u32 {
        1u32 << (30 - self.network.prefix_len())
    }

    /// The link of `slot`, if the network has it.
    pub fn link(&self, slot: u32) -> Option<Link> {
        if slot >= self.slots() {
            return None;
        }
        let base = u32::from(self.network.network()) + slot * 4;
        Some(Link { slot, host: Ipv4Addr::from(base + 1), guest: Ipv4Addr::from(base + 2) })
    }

    /// The next free slot's link, now taken.
    pub fn allocate(&mut self) -> Result<Link, NetworkError> {
        let slots = self.slots();
        let slot = (0..slots)
            .map(|offset| (self.next % slots + offset) % slots)
            .find(|slot| !self.used.contains(slot))
            .ok_or(NetworkError::Exhausted { network: self.network, slots: self.used.len() })?;
        self.used.insert(slot);
        self.next = (slot + 1) % slots;
        // In range: `find` only yields slots below `slots()`.
        self.link(slot).ok_or(NetworkError::Exhausted { network: self.network, slots: self.used.len() })
    }

    /// Takes a given slot (an adopted VM's); false if it is out of range or taken.
    pub fn claim(&mut self, slot: u32) -> bool {
        slot < self.slots() && self.used.insert(slot)
    }

    pub fn release(&mut self, slot: u32) {
        self.used.remove(&slot);
    }
}

/// The whole nftables script for the VMs in `links`: replaces the agent's table atomically.
pub fn ruleset(links: &[Link]) -> String {
    let mut links = links.to_vec();
    links.sort_by_key(|link| link.slot);
    let mut text = String::new();
    // Creating the table first makes the delete succeed when it does not exist yet; `nft -f`
    // applies the whole script as one transaction.
    text.push_str(&format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n"));
    text.push_str("  chain input {\n    type filter hook input priority filter - 1; policy accept;\n");
    for link in &links {
        text.push_str(&format!(
            "    iifname \"{}\" ip saddr {} ct state established,related accept\n",
            link.tap(),
            link.guest
        ));
    }
    text.push_str(&format!("    iifname \"{TAP_PREFIX}*\" drop\n  }}\n"));
    text.push_str("  chain forward {\n    type filter hook forward priority filter - 1; policy accept;\n");
    text.push_str(&format!("    iifname \"{TAP_PREFIX}*\" drop\n    oifname \"{TAP_PREFIX}*\" drop\n  }}\n}}\n"));
    text
}

/// Loads `script` with `nft -f -`.
pub async fn apply(script: &str) -> Result<(), NetworkError> {
    use tokio::io::AsyncWriteExt;
    let command = "nft -f -".to_owned();
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| NetworkError::Command { command: command.clone(), reason: error.to_string() })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|error| NetworkError::Command { command: command.clone(), reason: error.to_string() })?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|error| NetworkError::Command { command: command.clone(), reason: error.to_string() })?;
    if !output.status.success() {
        return Err(NetworkError::Command {
            command,
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Removes the agent's table, if any.
pub async fn remove_table() -> Result<(), NetworkError> {
    apply(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n")).await
}

async fn ip(args: &[&str]) -> Result<(), NetworkError> {
    let command = format!("ip {}", args.join(" "));
    let output = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|error| NetworkError::Command { command: command.clone(), reason: error.to_string() })?;
    if !output.status.success() {
        return Err(NetworkError::Command {
            command,
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Creates (or recreates) the tap device of `link`, with the host address, up.
pub async fn create_tap(link: &Link) -> Result<(), NetworkError> {
    let tap = link.tap();
    let _ = delete_tap(link).await;
    ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]).await?;
    ip(&["addr", "add", &format!("{}/30", link.host), "dev", &tap]).await?;
    ip(&["link", "set", &tap, "up"]).await
}

/// Whether the tap device of `link` exists in the caller's network namespace (`/sys` may show
/// another one's, so the kernel is asked through `ip`).
pub async fn tap_exists(link: &Link) -> bool {
    tokio::process::Command::new("ip")
        .args(["link", "show", "dev", &link.tap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

/// Deletes the tap device of `link`; fine if it is already gone.
pub async fn delete_tap(link: &Link) -> Result<(), NetworkError> {
    if !tap_exists(link).await {
        return Ok(());
    }
    ip(&["link", "del", &link.tap()]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    #[test]
    fn slots_are_thirty_twos_with_host_one_and_guest_two() {
        let mut allocator = Allocator::new(network("198.51.100.0/24")).unwrap();
        let first = allocator.allocate().unwrap();
        let second = allocator.allocate().unwrap();
        assert_eq!(
            (first.slot, first.host, first.guest),
            (0, "198.51.100.1".parse().unwrap(), "198.51.100.2".parse().unwrap())
        );
        assert_eq!((second.host, second.guest), ("198.51.100.5".parse().unwrap(), "198.51.100.6".parse().unwrap()));
        assert_eq!(second.tap(), "edgvm1");
        allocator.release(0);
        assert_eq!(allocator.allocate().unwrap().slot, 2, "a freed slot is not handed out again at once");
        assert!(!allocator.claim(1), "taken");
        assert!(allocator.claim(63));
        assert!(!allocator.claim(64), "out of range for a /24");
        assert_eq!(allocator.link(63).unwrap().guest, "198.51.100.254".parse::<Ipv4Addr>().unwrap());
        for expected in 3..63 {
            assert_eq!(allocator.allocate().unwrap().slot, expected);
        }
        assert_eq!(allocator.allocate().unwrap().slot, 0, "wrapping around to the freed slot");
        assert!(matches!(allocator.allocate(), Err(NetworkError::Exhausted { slots: 64, .. })));
    }

    #[test]
    fn a_full_network_and_a_too_small_one_are_errors() {
        let mut allocator = Allocator::new(network("203.0.113.8/29")).unwrap();
        allocator.allocate().unwrap();
        allocator.allocate().unwrap();
        assert!(matches!(allocator.allocate(), Err(NetworkError::Exhausted { slots: 2, .. })));
        assert!(matches!(Allocator::new(network("203.0.113.8/31")), Err(NetworkError::TooSmall { .. })));
        // A network given with host bits starts at its network address.
        let allocator = Allocator::new(network("198.51.100.77/24")).unwrap();
        assert_eq!(allocator.link(0).unwrap().host, "198.51.100.1".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn the_ruleset_admits_only_answers_from_each_guest_and_forwards_nothing() {
        let allocator = Allocator::new(network("198.51.100.0/24")).unwrap();
        let links = [allocator.link(1).unwrap(), allocator.link(0).unwrap()];
        assert_eq!(
            ruleset(&links),
            "table inet edgible_vm
delete table inet edgible_vm
table inet edgible_vm {
  chain input {
    type filter hook input priority filter - 1; policy accept;
    iifname \"edgvm0\" ip saddr 198.51.100.2 ct state established,related accept
    iifname \"edgvm1\" ip saddr 198.51.100.6 ct state established,related accept
    iifname \"edgvm*\" drop
  }
  chain forward {
    type filter hook forward priority filter - 1; policy accept;
    iifname \"edgvm*\" drop
    oifname \"edgvm*\" drop
  }
}
"
        );
        assert!(!ruleset(&[]).contains("saddr"), "no VM: every tap is dropped");
    }
}
