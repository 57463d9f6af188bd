//! The cloud scheduler: which cloud host an application placed in the cloud runs on. Pure: the
//! database hands it the candidates (hosts with their declared capacity, online state and the
//! load already placed on them) and what the application requires, and it answers a host or
//! why none fits, so every decision is unit tested without a database.
//!
//! Rules: only online hosts that declared a capacity are considered; a host fits if its free
//! capacity (declared minus what is placed there) covers the requirement in vCPUs, memory and
//! disk; among those that fit, the one with the most free memory wins, then the most free
//! vCPUs, then the most free disk (so applications spread across hosts), and the lowest device
//! id breaks the remaining ties, so the same inputs always give the same host. Ports are not a
//! host resource: the agent reaches each guest at the guest's own address, so any number of
//! applications on one host may listen on the same port.

use std::cmp::Reverse;
use std::fmt;

use edgible::model::{DeviceId, HostCapacity};

/// A cloud host the application could run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub device_id: DeviceId,
    pub online: bool,
    /// What the host's agent declared.
    pub capacity: HostCapacity,
    /// The sum of what the applications already placed on it require.
    pub used: HostCapacity,
}

impl Candidate {
    /// What is left of the host; a host that is over-committed (its capacity shrank) has
    /// nothing left rather than a negative amount.
    pub fn free(&self) -> HostCapacity {
        HostCapacity {
            vcpus: self.capacity.vcpus.saturating_sub(self.used.vcpus),
            memory_mib: self.capacity.memory_mib.saturating_sub(self.used.memory_mib),
            disk_mib: self.capacity.disk_mib.saturating_sub(self.used.disk_mib),
        }
    }
}

/// Why no host was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoFit {
    #[error("there is no cloud host to run it on")]
    NoHosts,
    #[error("none of the {offline} cloud host(s) is online")]
    AllOffline { offline: usize },
    #[error(
        "no online cloud host has {} free; the one with the most free capacity ({}) has {} free",
        describe(*needed),
        best.0,
        describe(best.1)
    )]
    TooSmall { needed: HostCapacity, best: (DeviceId, HostCapacity) },
}

/// A capacity as a person reads it: `2 vCPU, 512 MiB memory, 0 MiB disk`.
pub fn describe(capacity: HostCapacity) -> Described {
    Described(capacity)
}

/// See [`describe`].
pub struct Described(HostCapacity);

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let HostCapacity { vcpus, memory_mib, disk_mib } = self.0;
        write!(f, "{vcpus} vCPU, {memory_mib} MiB memory, {disk_mib} MiB disk")
    }
}

/// Whether `free` capacity covers what is `needed`, in every dimension.
pub fn covers(free: HostCapacity, needed: HostCapacity) -> bool {
    free.vcpus >= needed.vcpus && free.memory_mib >= needed.memory_mib && free.disk_mib >= needed.disk_mib
}

/// The order of preference: most free memory, vCPUs, disk, then the lowest device id.
fn preference(candidate: &Candidate) -> (Reverse<u64>, Reverse<u32>, Reverse<u64>, DeviceId) {
    let free = candidate.free();
    (Reverse(free.memory_mib), Reverse(free.vcpus), Reverse(free.disk_mib), candidate.device_id)
}

/// Picks the host for an application that requires `needed`.
pub fn schedule(candidates: &[Candidate], needed: HostCapacity) -> Result<DeviceId, NoFit> {
    if candidates.is_empty() {
        return Err(NoFit::NoHosts);
    }
    let mut online: Vec<&Candidate> = candidates.iter().filter(|candidate| candidate.online).collect();
    if online.is_empty() {
        return Err(NoFit::AllOffline { offline: candidates.len() });
    }
    online.sort_by_key(|candidate| preference(candidate));
    if let Some(chosen) = online.iter().find(|candidate| covers(candidate.free(), needed)) {
        return Ok(chosen.device_id);
    }
    // `online` is not empty: checked above.
    let best = online[0];
    Err(NoFit::TooSmall { needed, best: (best.device_id, best.free()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(vcpus: u32, memory_mib: u64, disk_mib: u64) -> HostCapacity {
        HostCapacity { vcpus, memory_mib, disk_mib }
    }

    fn host(id: u128, capacity: HostCapacity, used: HostCapacity) -> Candidate {
        Candidate { device_id: DeviceId(uuid::Uuid::from_u128(id)), online: true, capacity, used }
    }

    fn id(id: u128) -> DeviceId {
        DeviceId(uuid::Uuid::from_u128(id))
    }

    #[test]
    fn a_host_that_fits_is_chosen() {
        let hosts = [host(1, capacity(2, 1024, 1000), capacity(0, 0, 0))];
        assert_eq!(schedule(&hosts, capacity(1, 256, 0)), Ok(id(1)));
        assert_eq!(schedule(&hosts, capacity(2, 1024, 1000)), Ok(id(1)), "an exact fit fits");
    }

    #[test]
    fn applications_spread_to_the_host_with_most_free_capacity() {
        let hosts = [
            host(1, capacity(4, 4096, 1000), capacity(1, 3000, 0)),
            host(2, capacity(4, 4096, 1000), capacity(1, 256, 0)),
        ];
        assert_eq!(schedule(&hosts, capacity(1, 256, 0)), Ok(id(2)));
        // Placing one more on the emptier host makes the other the emptier one.
        let hosts =
            [host(1, capacity(2, 1024, 0), capacity(1, 256, 0)), host(2, capacity(2, 1024, 0), capacity(0, 0, 0))];
        assert_eq!(schedule(&hosts, capacity(1, 256, 0)), Ok(id(2)));
        let hosts = [
            host(1, capacity(2, 1024, 0), capacity(1, 256, 0)),
            host(2, capacity(2, 1024, 0), capacity(1, 256, 0)),
            host(3, capacity(2, 1024, 0), capacity(0, 0, 0)),
        ];
        assert_eq!(schedule(&hosts, capacity(1, 256, 0)), Ok(id(3)));
    }

    #[test]
    fn the_emptiest_host_that_fits_wins_over_an_emptier_one_that_does_not() {
        // Host 1 has more free memory but no free disk; the application needs disk.
        let hosts =
            [host(1, capacity(4, 8192, 100), capacity(0, 0, 100)), host(2, capacity(4, 2048, 1000), capacity(0, 0, 0))];
        assert_eq!(schedule(&hosts, capacity(1, 256, 500)), Ok(id(2)));
    }

    #[test]
    fn no_capacity_names_the_need_and_the_best_host() {
        let hosts =
            [host(1, capacity(2, 1024, 0), capacity(2, 512, 0)), host(2, capacity(2, 1024, 0), capacity(1, 768, 0))];
        let error = schedule(&hosts, capacity(1, 600, 0)).expect_err("nothing has 600 MiB free");
        assert_eq!(error, NoFit::TooSmall { needed: capacity(1, 600, 0), best: (id(1), capacity(0, 512, 0)) });
        let message = error.to_string();
        assert!(message.contains("1 vCPU, 600 MiB memory, 0 MiB disk free"), "{message}");
        assert!(message.contains(&format!("({}) has 0 vCPU, 512 MiB memory, 0 MiB disk free", id(1))), "{message}");
        assert_eq!(schedule(&[], capacity(1, 256, 0)), Err(NoFit::NoHosts));
    }

    #[test]
    fn offline_hosts_are_skipped() {
        let mut offline = host(1, capacity(8, 8192, 1000), capacity(0, 0, 0));
        offline.online = false;
        let online = host(2, capacity(1, 512, 0), capacity(0, 0, 0));
        assert_eq!(schedule(&[offline.clone(), online], capacity(1, 256, 0)), Ok(id(2)));
        assert_eq!(schedule(&[offline], capacity(1, 256, 0)), Err(NoFit::AllOffline { offline: 1 }));
    }

    #[test]
    fn ties_go_to_the_lowest_device_id_whatever_the_order() {
        let a = host(7, capacity(2, 1024, 0), capacity(0, 0, 0));
        let b = host(3, capacity(2, 1024, 0), capacity(0, 0, 0));
        let c = host(5, capacity(2, 1024, 0), capacity(0, 0, 0));
        assert_eq!(schedule(&[a.clone(), b.clone(), c.clone()], capacity(1, 256, 0)), Ok(id(3)));
        assert_eq!(schedule(&[c, a, b], capacity(1, 256, 0)), Ok(id(3)));
    }

    #[test]
    fn an_overcommitted_host_has_nothing_free() {
        let shrunk = host(1, capacity(1, 256, 0), capacity(2, 1024, 0));
        assert_eq!(shrunk.free(), capacity(0, 0, 0));
    }
}
