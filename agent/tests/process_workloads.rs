//! The reconciler with the real `process` driver and real processes (`/bin/sh`, `sleep`,
//! `python3 -m http.server`): start, health, env change, stop without orphans, crash and
//! backoff, agent restart with adoption, log capture.
//!
//! Every wait is a bounded wait for a condition; nothing sleeps to let time pass. Workloads
//! that a failing test leaves behind are killed by [`Harness`]'s `Drop`.

#[path = "support/harness.rs"]
mod harness;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use anyhow::{Context, Result};
use edgible::protocol::v1::{Phase, Stream};
use edgible_agent::driver::WorkloadHandle;
use edgible_agent::driver::process::{ProcessIdentity, group_members};
use edgible_agent::logs::LogLimits;
use edgible_agent::reconcile::{DesiredUpdate, Shutdown, UpdateOutcome};
use edgible_agent::state::StateDir;
use harness::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tokio::time::Instant;

#[tokio::test]
async fn a_process_runs_once_its_http_health_check_passes() -> Result<()> {
    let harness = Harness::new();
    let agent = harness.agent()?;
    let mut report = agent.report();
    let port = free_port()?;
    let site = harness.work_dir();
    std::fs::write(site.join("ok.txt"), "ok")?;
    let web = application(
        "web",
        1,
        json!({
            "port": port,
            "workload": {"process": {
                "command": python()?,
                "args": ["-m", "http.server", "--bind", "127.0.0.1", port.to_string()],
                "working_dir": site.display().to_string(),
            }},
            "health_check": {"protocol": "http", "path": "/ok.txt", "interval_seconds": 1, "timeout_seconds": 1, "unhealthy_threshold": 1},
        }),
    );

    let outcome = agent.update(DesiredUpdate::full(1, vec![web.clone()])).await?;
    assert_eq!(outcome, UpdateOutcome::Taken { revision: 1 });
    let pid = wait_phase(&mut report, web.id, 1, Phase::Running).await?;
    assert_eq!(report.borrow().applied_revision, Some(1));
    assert!(environment(pid)?.contains(&format!("PORT={port}")));

    // The file the check asks for disappears: unhealthy after one failed check (threshold 1),
    // running again once it is back. The process is never restarted for it.
    std::fs::remove_file(site.join("ok.txt"))?;
    wait_phase(&mut report, web.id, 1, Phase::Unhealthy).await?;
    let message = report.borrow().status(web.id).and_then(|status| status.message.clone()).unwrap_or_default();
    assert!(message.contains("answered 404"), "{message}");
    std::fs::write(site.join("ok.txt"), "ok")?;
    assert_eq!(wait_phase(&mut report, web.id, 1, Phase::Running).await?, pid);

    agent.shutdown(Shutdown::StopWorkloads).await;
    assert!(!alive(pid), "the server was stopped");
    Ok(())
}

#[tokio::test]
async fn a_workload_that_never_passes_its_check_stays_starting_with_the_reason() -> Result<()> {
    let harness = Harness::new();
    let agent = harness.agent()?;
    let mut report = agent.report();
    let port = free_port()?;
    let idle = application(
        "idle",
        1,
        json!({
            "port": port,
            "workload": {"process": {"command": "/bin/sh", "args": ["-c", "exec sleep 600"]}},
            "health_check": {"protocol": "tcp", "interval_seconds": 1, "timeout_seconds": 1},
        }),
    );
    agent.update(DesiredUpdate::full(1, vec![idle.clone()])).await?;
    let message = wait_report(&mut report, "a failed check while starting", |report| {
        let status = report.status(idle.id)?;
        (status.phase == Phase::Starting).then(|| status.message.clone()).flatten()
    })
    .await?;
    assert!(message.contains("cannot connect"), "{message}");
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

#[tokio::test]
async fn an_env_change_restarts_the_workload_with_the_new_env() -> Result<()> {
    let harness = Harness::new();
    let agent = harness.agent()?;
    let mut report = agent.report();
    let script = r#"echo "greeting=$GREETING from $NAME"; exec sleep 600"#;
    let mut greeter = application(
        "greeter",
        1,
        json!({
            "env": {"GREETING": "hello", "NAME": "app"},
            "workload": {"process": {"command": "/bin/sh", "args": ["-c", script], "env": {"NAME": "workload"}}},
        }),
    );
    agent.update(DesiredUpdate::full(1, vec![greeter.clone()])).await?;
    let first = wait_phase(&mut report, greeter.id, 1, Phase::Running).await?;
    // /proc/PID/environ reads empty for an instant while the shell execs `sleep`; wait it out.
    let env = wait_until("the first process's environment", || {
        environment(first).ok().filter(|env| env.contains("NAME=workload"))
    })
    .await?;
    assert!(env.contains("GREETING=hello"), "{env:?}");
    assert!(!env.iter().any(|entry| entry.starts_with("RUST_BACKTRACE=")), "the agent's environment does not leak");

    greeter.revision = 2;
    greeter.spec.env.insert("GREETING".parse()?, "bonjour".into());
    agent.update(DesiredUpdate::full(2, vec![greeter.clone()])).await?;
    let second = wait_phase(&mut report, greeter.id, 2, Phase::Running).await?;
    assert_ne!(first, second, "a new process runs");
    let env = wait_until("the second process's environment", || {
        environment(second).ok().filter(|env| env.contains("NAME=workload"))
    })
    .await?;
    assert!(env.contains("GREETING=bonjour"), "{env:?}");
    wait_until("the first process to be gone", || (!alive(first)).then_some(())).await?;
    wait_until("both greetings in the log", || {
        let lines = log_texts(&agent, greeter.id);
        let texts: Vec<&str> = lines.iter().map(|(_, line)| line.as_str()).collect();
        (texts == ["greeting=hello from workload", "greeting=bonjour from workload"]).then_some(())
    })
    .await?;
    let events = event_messages(&agent);
    assert!(events.contains(&"greeter restarted: environment changed".to_owned()), "{events:?}");

    // A change that needs no restart (a hostname) only moves the revision.
    greeter.revision = 3;
    greeter.spec.hostnames.push("www.greeter.example.test".parse()?);
    agent.update(DesiredUpdate::full(3, vec![greeter.clone()])).await?;
    assert_eq!(wait_phase(&mut report, greeter.id, 3, Phase::Running).await?, second);

    // A stale update is refused and changes nothing.
    let outcome = agent.update(DesiredUpdate::full(2, vec![])).await?;
    assert_eq!(outcome, UpdateOutcome::Stale { current: 3, offered: 2 });

    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

#[tokio::test]
async fn removing_an_application_stops_its_whole_process_tree() -> Result<()> {
    let harness = Harness::new();
    let agent = harness.agent()?;
    let mut report = agent.report();
    let work = harness.work_dir();
    // The leader starts a grandchild of the agent (`sleep`) and waits for it.
    let polite = shell("polite", 1, &format!("sleep 600 & echo $! > {}/polite.pid; wait", work.display()));
    // This one ignores SIGTERM, and so does its child (ignored signals are inherited): it
    // takes SIGKILL after the grace period.
    let stubborn =
        shell("stubborn", 1, &format!("trap '' TERM; sleep 600 & echo $! > {}/stubborn.pid; wait", work.display()));
    agent.update(DesiredUpdate::full(1, vec![polite.clone(), stubborn.clone()])).await?;
    let polite_pid = wait_phase(&mut report, polite.id, 1, Phase::Running).await?;
    let stubborn_pid = wait_phase(&mut report, stubborn.id, 1, Phase::Running).await?;
    let polite_child = wait_until("the polite grandchild", || read_pid(&work.join("polite.pid"))).await?;
    let stubborn_child = wait_until("the stubborn grandchild", || read_pid(&work.join("stubborn.pid"))).await?;
    assert!(alive(polite_child) && alive(stubborn_child));

    let started = Instant::now();
    agent.update(DesiredUpdate::full(2, vec![])).await?;
    wait_phase(&mut report, polite.id, 2, Phase::Stopped).await?;
    wait_phase(&mut report, stubborn.id, 2, Phase::Stopped).await?;
    assert!(started.elapsed() >= harness.process_config().stop_grace, "SIGKILL came only after the grace period");
    for pid in [polite_pid, polite_child, stubborn_pid, stubborn_child] {
        assert!(!alive(pid), "process {pid} is gone");
    }
    assert!(group_members(polite_pid)?.is_empty() && group_members(stubborn_pid)?.is_empty());
    assert!(report.borrow().workloads.is_empty());
    assert!(agent.logs(polite.id).is_none(), "a removed application's logs are dropped");

    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

#[tokio::test]
async fn what_an_exited_leader_leaves_behind_is_stopped_before_the_restart() -> Result<()> {
    let harness = Harness::new();
    let agent = harness.agent()?;
    let mut report = agent.report();
    let work = harness.work_dir();
    let counter = work.join("runs");
    // Each run leaves a background child behind and exits.
    let script = format!(
        "echo run >> {counter}; sleep 600 & echo $! > {work}/orphan.$(wc -l < {counter}); sleep 0.2; exit 1",
        counter = counter.display(),
        work = work.display()
    );
    let leaky = shell("leaky", 1, &script);
    agent.update(DesiredUpdate::full(1, vec![leaky.clone()])).await?;
    let first_orphan = wait_until("the first run's child", || read_pid(&work.join("orphan.1"))).await?;
    wait_until("a second run", || read_pid(&work.join("orphan.2"))).await?;
    assert!(!alive(first_orphan), "the first run's child was stopped when its leader exited");
    let message = wait_report(&mut report, "the failure in the status", |report| {
        let status = report.status(leaky.id)?;
        (status.phase == Phase::Failed).then(|| status.message.clone()).flatten()
    })
    .await?;
    assert!(message.starts_with("exited with status 1; retrying"), "{message}");
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

#[tokio::test]
async fn a_killed_workload_is_restarted_with_growing_backoff() -> Result<()> {
    let harness = Harness::new();
    let agent = harness.process_reconciler(harness.process_config())?.with_jitter(WholeCeiling).spawn();
    let mut report = agent.report();
    let sleeper = shell("sleeper", 1, "echo started; exec sleep 600");
    agent.update(DesiredUpdate::full(1, vec![sleeper.clone()])).await?;
    let mut pid = wait_phase(&mut report, sleeper.id, 1, Phase::Running).await?;

    // With the whole ceiling as jitter the delays are 300 ms, then 600 ms.
    for expected in [Duration::from_millis(300), Duration::from_millis(600)] {
        let killed = Instant::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        let next = wait_report(&mut report, "a restarted process", |report| {
            let status = report.status(sleeper.id)?;
            match report.workloads.get(&sleeper.id) {
                Some(WorkloadHandle::Process { pid: next, .. }) if *next != pid && status.phase == Phase::Running => {
                    Some(*next)
                }
                _ => None,
            }
        })
        .await?;
        let waited = killed.elapsed();
        assert!(waited >= expected, "restarted after {waited:?}, before the backoff of {expected:?}");
        pid = next;
    }
    let events = event_messages(&agent);
    assert!(
        events.iter().any(|event| event == "sleeper killed by signal 9 (SIGKILL); restarting in 0.6s"),
        "{events:?}"
    );
    // One log is shared by the three runs.
    wait_until("the third run's output", || {
        let starts = log_texts(&agent, sleeper.id).iter().filter(|(_, line)| line == "started").count();
        (starts == 3).then_some(())
    })
    .await?;
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

#[tokio::test]
async fn a_command_that_cannot_start_fails_and_a_fixed_spec_starts_at_once() -> Result<()> {
    let harness = Harness::new();
    let agent = harness.agent()?;
    let mut report = agent.report();
    let broken = application("broken", 1, json!({"workload": {"process": {"command": "/nonexistent/program"}}}));
    agent.update(DesiredUpdate::full(1, vec![broken.clone()])).await?;
    let message = wait_report(&mut report, "the start failure", |report| {
        let status = report.status(broken.id)?;
        (status.phase == Phase::Failed).then(|| status.message.clone()).flatten()
    })
    .await?;
    assert!(message.starts_with("cannot start \"/nonexistent/program\""), "{message}");

    let fixed = shell("broken", 2, "exec sleep 600");
    agent.update(DesiredUpdate::full(2, vec![fixed.clone()])).await?;
    wait_phase(&mut report, fixed.id, 2, Phase::Running).await?;
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}

#[tokio::test]
async fn an_agent_restart_adopts_the_running_workload_instead_of_restarting_it() -> Result<()> {
    let harness = Harness::new();
    let work = harness.work_dir();
    let starts = work.join("starts");
    let port = free_port()?;
    let web = application(
        "web",
        1,
        json!({
            "port": port,
            "workload": {"process": {
                "command": "/bin/sh",
                "args": ["-c", format!("echo start >> {}; exec {} -m http.server --bind 127.0.0.1 {port}", starts.display(), python()?)],
            }},
            "health_check": {"protocol": "http", "path": "/", "interval_seconds": 1, "timeout_seconds": 1},
        }),
    );

    let agent = harness.agent()?;
    let mut report = agent.report();
    agent.update(DesiredUpdate::full(1, vec![web.clone()])).await?;
    let pid = wait_phase(&mut report, web.id, 1, Phase::Running).await?;
    let handle = report.borrow().workloads.get(&web.id).cloned();
    agent.shutdown(Shutdown::LeaveRunning).await;
    assert!(alive(pid), "the workload outlives the agent");

    // A new agent on the same state directory, without any update from a server.
    let agent = harness.agent()?;
    let mut report = agent.report();
    assert_eq!(wait_phase(&mut report, web.id, 1, Phase::Running).await?, pid, "same pid: adopted");
    assert_eq!(report.borrow().workloads.get(&web.id).cloned(), handle, "same pid and start time");
    assert_eq!(std::fs::read_to_string(&starts)?.lines().count(), 1, "never restarted");
    let events = event_messages(&agent);
    assert_eq!(events, ["web adopted after an agent restart"]);

    // The adopted workload is supervised like any other: killed, it is started again.
    kill(Pid::from_raw(pid), Signal::SIGKILL)?;
    let restarted = wait_report(&mut report, "a restart of the adopted workload", |report| {
        let status = report.status(web.id)?;
        match report.workloads.get(&web.id) {
            Some(WorkloadHandle::Process { pid: next, .. }) if *next != pid && status.phase == Phase::Running => {
                Some(*next)
            }
            _ => None,
        }
    })
    .await?;
    assert!(alive(restarted));
    assert_eq!(std::fs::read_to_string(&starts)?.lines().count(), 2);
    agent.shutdown(Shutdown::StopWorkloads).await;
    assert!(!alive(restarted));
    Ok(())
}

#[tokio::test]
async fn a_recycled_pid_is_neither_adopted_nor_signalled() -> Result<()> {
    let harness = Harness::new();
    // A process that merely has the recorded pid: same number, another start time.
    let mut bystander = std::process::Command::new("sleep").arg("600").process_group(0).spawn()?;
    let bystander_pid = i32::try_from(bystander.id())?;
    harness.remember_pid(bystander_pid);
    let identity = ProcessIdentity::of(bystander_pid)?.context("the bystander runs")?;

    let sleeper = shell("sleeper", 4, "exec sleep 600");
    let state_dir = StateDir::open(harness.state_path())?;
    let mut state = state_dir.load()?;
    state.desired.apply(DesiredUpdate::full(4, vec![sleeper.clone()]));
    state.workloads.insert(
        sleeper.id,
        edgible_agent::state::WorkloadRecord {
            launch: edgible_agent::driver::LaunchSpec::from_application(&sleeper),
            revision: 4,
            handle: WorkloadHandle::Process { pid: bystander_pid, start_time: identity.start_time.wrapping_sub(1) },
        },
    );
    state_dir.save(&state)?;

    let agent = harness.agent()?;
    let mut report = agent.report();
    let pid = wait_phase(&mut report, sleeper.id, 4, Phase::Running).await?;
    assert_ne!(pid, bystander_pid, "a new process was started");
    agent.shutdown(Shutdown::StopWorkloads).await;
    assert_eq!(bystander.try_wait()?, None, "the bystander was never signalled");
    bystander.kill()?;
    bystander.wait()?;
    Ok(())
}

#[tokio::test]
async fn output_is_captured_line_by_line_into_a_bounded_buffer() -> Result<()> {
    let harness = Harness::new();
    let mut driver_config = harness.process_config();
    driver_config.log_limits = LogLimits { max_lines: 5, ..LogLimits::default() };
    let agent = harness.process_reconciler(driver_config)?.spawn();
    let mut report = agent.report();
    let work = harness.work_dir();
    let script = format!(
        "for i in $(seq 1 20); do echo line $i; done; echo oops >&2; seq 1 100000; echo done > {}/done; exec sleep 600",
        work.display()
    );
    let chatty = shell("chatty", 1, &script);
    agent.update(DesiredUpdate::full(1, vec![chatty.clone()])).await?;
    wait_phase(&mut report, chatty.id, 1, Phase::Running).await?;
    // Nobody reads the buffer: the workload still writes everything without blocking.
    wait_until("the workload to finish writing", || work.join("done").exists().then_some(())).await?;
    let logs = agent.logs(chatty.id).context("logs")?;
    wait_until("every line to be read", || {
        (logs.snapshot().iter().any(|line| line.line == "100000") && logs.dropped() == 100_021 - 5).then_some(())
    })
    .await?;
    let lines = logs.snapshot();
    assert_eq!(lines.len(), 5, "the buffer holds at most its limit");
    // The two streams are read separately, so only the order within one stream is known.
    let stdout: Vec<&str> = lines.iter().filter(|l| l.stream == Stream::Stdout).map(|l| l.line.as_str()).collect();
    assert_eq!(stdout.last(), Some(&"100000"), "the newest lines are kept: {stdout:?}");
    let stderr: Vec<&str> = lines.iter().filter(|l| l.stream == Stream::Stderr).map(|l| l.line.as_str()).collect();
    assert!(stderr.is_empty() || stderr == ["oops"], "{stderr:?}");

    // Taking lines hands them over once, with the count of those dropped before.
    let batch = logs.take(100);
    assert_eq!(batch.lines.len(), 5);
    assert_eq!(batch.dropped, 100_016);
    assert!(logs.take(100).lines.is_empty());
    agent.shutdown(Shutdown::StopWorkloads).await;
    Ok(())
}
