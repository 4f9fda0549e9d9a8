//! A real OTP release, built with rebar3, through the agent: pushed, unpacked,
//! started with `bin/<name> foreground`, answering `bin/<name> ping`, stopped cleanly.

use std::time::Duration;

use erel_master::client::WriteSource;
use erel_proto::{ReleaseState, Start};

use crate::helper::otp::build_release;
use crate::helper::release::sha256;
use crate::helper::AgentCommands;
use crate::helper::{output_text, pki_and_agent, wait_until, AgentProc};

fn release_ping(agent: &AgentProc, name: &str) -> (bool, String) {
    let dir = agent.root.join(format!("releases/{name}/0.1.0"));
    let out = std::process::Command::new(dir.join(format!("bin/{name}")))
        .arg("ping")
        .current_dir(&dir)
        .output()
        .expect("run bin/<name> ping");
    let text = output_text(&out);
    (out.status.success() && text.contains("pong"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebar3_release_runs_under_the_agent() {
    let work = tempfile::tempdir().expect("tempdir");
    let name = "erelotp";
    let tarball = tokio::task::spawn_blocking({
        let dir = work.path().to_path_buf();
        move || build_release(&dir, name, None)
    })
    .await
    .expect("build");

    let (pki, agent) = pki_and_agent("otp-1", &[]);
    let mut client = pki.connect(&agent).await;
    let digest = sha256(&tarball);
    let archive = format!("archives/{name}-0.1.0.tar.gz");
    client
        .write_file(
            &WriteSource {
                path: tarball.clone(),
                sha256: Some(digest),
                sha256_of: None,
            },
            &archive,
            0o644,
            &mut |_| {},
        )
        .await
        .expect("push");
    let unpacked = client
        .unpack(&archive, &format!("releases/{name}/0.1.0"), Some(digest))
        .await
        .expect("unpack a real relx tarball");
    assert!(unpacked.entries > 100, "{unpacked:?}");
    client
        .start(Start {
            name: name.into(),
            version: "0.1.0".into(),
            argv: vec![format!("bin/{name}"), "foreground".into()],
            env: vec![],
            user: None,
        })
        .await
        .expect("start");

    let mut last = String::new();
    let pong = wait_until(Duration::from_secs(60), || {
        let (ok, text) = release_ping(&agent, name);
        last = text;
        async move { ok }
    })
    .await;
    assert!(
        pong,
        "bin/{name} ping never answered pong: {last}\n{}",
        agent.log()
    );
    let pong = client.ping().await.expect("ping");
    let status = pong
        .releases
        .iter()
        .find(|r| r.name == name)
        .expect("release known");
    assert_eq!(status.state, ReleaseState::Running);

    let stopped = client
        .stop(name, Duration::from_secs(30))
        .await
        .expect("stop");
    assert!(stopped.was_running);
    assert!(
        !stopped.killed,
        "an OTP node stops on SIGTERM within the grace period"
    );
    // epmd runs beside the release, started by the test helpers before the node (as a
    // host's service would be): nothing at all of the release is left.
    let left = agent.release_pids(name);
    assert!(left.is_empty(), "nothing of the node is left: {left:?}");
    let (ok, _) = release_ping(&agent, name);
    assert!(!ok, "the node no longer answers");
}
