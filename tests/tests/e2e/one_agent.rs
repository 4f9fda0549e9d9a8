//! One agent per root: a second `erel-boot` on a root another live agent serves refuses
//! to start, naming the first one's pid; once the first is gone, however it went, a new
//! one starts and adopts the releases without a second copy.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use erel_proto::ReleaseState;

use crate::helper::install::install_and_start;
use crate::helper::release::shell_release;
use crate::helper::AgentCommands;
use crate::helper::{
    exit_within, fast_supervision, outlast_any_restart, pki_and_agent, wait_until, AgentProc, Pki,
    AGENT_BIN,
};

/// How long a refused agent may take to exit (it only parses, loads and tries the lock).
const REFUSAL_LIMIT: Duration = Duration::from_secs(30);

/// Runs a second `erel-boot` for `agent`'s host on `agent`'s root and waits (bounded) for
/// it to exit.
fn second_agent(pki: &Pki, agent: &AgentProc) -> Output {
    let mut child = Command::new(AGENT_BIN)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--root")
        .arg(&agent.root)
        .arg("--certs")
        .arg(pki.bundle(&agent.id))
        .args(fast_supervision())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a second erel-boot");
    if exit_within(&mut child, REFUSAL_LIMIT).is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        panic!(
            "a second agent on the same root kept running:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().expect("output")
}

async fn start_sleeper(pki: &Pki, agent: &AgentProc, work: &std::path::Path) {
    let tarball = shell_release(work, "app", "1", "#!/bin/sh\necho up\nexec sleep 1000\n");
    let mut client = pki.connect(agent).await;
    install_and_start(&mut client, &tarball, "app", "1", Vec::new()).await;
}

async fn app_state(pki: &Pki, agent: &AgentProc) -> Option<(ReleaseState, Option<u32>)> {
    let mut client = pki.connect(agent).await;
    let pong = client.ping().await.ok()?;
    pong.releases
        .into_iter()
        .find(|r| r.name == "app")
        .map(|r| (r.state, r.pid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_root_refuses_naming_the_first() {
    let (pki, mut agent) = pki_and_agent("lock-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    start_sleeper(&pki, &agent, work.path()).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            agent.release_pids("app").len() == 1
        })
        .await,
        "the release runs\n{}",
        agent.log()
    );
    let first_pid = agent.pid().expect("first agent pid");

    let refused = second_agent(&pki, &agent);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "the second agent must fail\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {first_pid}")),
        "the refusal names the first agent's pid {first_pid}:\n{stderr}"
    );
    assert!(
        stderr.contains(&agent.root.display().to_string()) && stderr.contains("one agent per root"),
        "the refusal names the root and why:\n{stderr}"
    );
    assert!(
        !stderr.contains("serving"),
        "the refused agent never served:\n{stderr}"
    );

    // Nothing changed: one copy of the release, still served by the first agent. A
    // second copy would be a start by a supervisor, which comes within one restart
    // delay.
    outlast_any_restart().await;
    let pids = agent.release_pids("app");
    assert_eq!(pids.len(), 1, "one copy of the release: {pids:?}");
    let (state, pid) = app_state(&pki, &agent).await.expect("first agent answers");
    assert_eq!(state, ReleaseState::Running);
    assert_eq!(pid.map(|p| p as i32), pids.first().copied());

    // kill -9 of the first agent releases the lock, although its release (its child) still
    // runs: the release never inherited the lock.
    agent.restart();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            matches!(app_state(&pki, &agent).await, Some((ReleaseState::Running, Some(p))) if pids.contains(&(p as i32)))
        })
        .await,
        "the new agent adopted the running release\n{}",
        agent.log()
    );
    assert_eq!(agent.release_pids("app"), pids, "still one copy, the same");

    // And the new agent holds the lock in turn.
    let new_pid = agent.pid().expect("new agent pid");
    let refused = second_agent(&pki, &agent);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("pid {new_pid}")), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_exit_a_new_agent_starts_on_the_root() {
    let (pki, mut agent) = pki_and_agent("lock-2", &[]);
    let lock_file = agent.root.join(".erel").join("agent.lock");
    let first_pid = agent.pid().expect("pid");
    assert_eq!(
        std::fs::read_to_string(&lock_file)
            .expect("lock file")
            .trim(),
        first_pid.to_string(),
        "the lock file names the agent holding it"
    );
    assert!(
        agent.terminate(),
        "SIGTERM ends the agent cleanly\n{}",
        agent.log()
    );
    // `restart` kills nothing here (the agent is gone) and starts a new one, which must
    // come up: the lock went with the first agent.
    agent.restart();
    let second_pid = agent.pid().expect("pid");
    assert_ne!(first_pid, second_pid);
    assert_eq!(
        std::fs::read_to_string(&lock_file)
            .expect("lock file")
            .trim(),
        second_pid.to_string()
    );
    let mut client = pki.connect(&agent).await;
    client.ping().await.expect("the new agent serves");
}
