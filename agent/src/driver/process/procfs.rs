//! What `/proc` says about processes: identity (pid and start time), process group members.
//!
//! A pid alone does not name a process: once it exits, the kernel may give the pid to another.
//! The start time (field 22 of `/proc/PID/stat`, in clock ticks after boot) does not change
//! during a process's life, so pid and start time together name exactly one process.

use std::io;

/// The fields of `/proc/PID/stat` the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// `R`, `S`, `D`, `Z` (zombie), ...
    pub state: char,
    pub pgrp: i32,
    pub start_time: u64,
}

impl ProcStat {
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so the fields after it are found from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 of the file, so field N is `fields[N - 3]`.
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(5 - 3)?.parse().ok()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat { pid, state, pgrp, start_time })
}

/// Reads `/proc/PID/stat`; `None` if there is no such process.
pub fn read_stat(pid: i32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => Ok(parse_stat(&text)),
        // ESRCH shows up when the process exits while the file is read.
        Err(error) if error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(nix::libc::ESRCH) => {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// The live (not zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> io::Result<Vec<i32>> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        if let Some(stat) = read_stat(pid)?
            && stat.pgrp == pgid
            && !stat.is_zombie()
        {
            members.push(pid);
        }
    }
    Ok(members)
}

/// A process the agent started as the leader of its own process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: i32,
    pub start_time: u64,
}

/// What became of a recorded process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The leader still runs: same pid, same start time.
    Running,
    /// The leader is gone but processes of its group remain.
    Leftovers,
    /// Nothing of the group remains.
    Gone,
}

impl ProcessIdentity {
    /// Reads the identity of a process that exists now.
    pub fn of(pid: i32) -> io::Result<Option<Self>> {
        Ok(read_stat(pid)?.map(|stat| Self { pid, start_time: stat.start_time }))
    }

    pub fn liveness(&self) -> io::Result<Liveness> {
        match read_stat(self.pid)? {
            Some(stat) if stat.start_time == self.start_time && !stat.is_zombie() => Ok(Liveness::Running),
            // The pid belongs to another process now. The kernel does not reuse a pid while a
            // process group of that number exists, so our group is gone entirely, and the
            // processes in group `pid` now (if any) are not ours.
            Some(stat) if stat.start_time != self.start_time => Ok(Liveness::Gone),
            // The leader exited (or is an unreaped zombie): since the pid was not reused, any
            // process in group `pid` is one the leader left behind.
            _ => {
                if group_members(self.pid)?.is_empty() {
                    Ok(Liveness::Gone)
                } else {
                    Ok(Liveness::Leftovers)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_hostile_command_names() {
        let line = "4242 (we ird) (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_stat(line), Some(ProcStat { pid: 4242, state: 'S', pgrp: 4242, start_time: 987654 }));
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (sh) S 1 2"), None);
        assert_eq!(parse_stat("x (sh) S 1 4242 4242 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 9 1 1"), None);
    }

    #[test]
    fn this_process_is_running_and_a_wrong_start_time_is_not() {
        let pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        let identity = ProcessIdentity::of(pid).expect("readable /proc").expect("this process exists");
        assert_eq!(identity.liveness().expect("readable /proc"), Liveness::Running);
        let recycled = ProcessIdentity { pid, start_time: identity.start_time + 1 };
        assert_eq!(recycled.liveness().expect("readable /proc"), Liveness::Gone);
    }
}
