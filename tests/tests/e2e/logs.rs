//! What the agent logs for an operator, and `erel logs`: a release's output read from
//! `Ping`'s output tail, once or followed.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use erel_master::client::Connector;
use erel_proto::ReleaseState;

use crate::helper::install::{
    install_and_start, release_status, start_request, unpack_shell_release,
};
use crate::helper::release::shell_release;
use crate::helper::AgentCommands;
use crate::helper::{
    follow_lines, holds_all, output_text, pki_and_agent, wait_until, AgentProc, Pki, PATIENCE,
};

/// A release that prints two lines, then a third once `$TRIGGER` exists, then waits.
const CHATTY: &str = "#!/bin/sh\n\
    echo \"chatty line one\"\n\
    echo \"chatty line two\" >&2\n\
    while [ ! -e \"$TRIGGER\" ]; do sleep 0.1; done\n\
    echo \"chatty line three, after the trigger\"\n\
    exec sleep 100000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erel_logs_prints_a_running_release_output_and_follows_it() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let trigger = work.path().join("trigger");
    let tarball = shell_release(work.path(), "chatty", "1", CHATTY);
    let mut client = pki.connect(&agent).await;
    let env = vec![("TRIGGER".into(), trigger.display().to_string())];
    install_and_start(&mut client, &tarball, "chatty", "1", env).await;
    assert!(
        wait_until(PATIENCE, || async {
            release_status(&pki, &agent, "chatty")
                .await
                .is_some_and(|s| s.output_tail.contains("chatty line two"))
        })
        .await,
        "the running release's output shows in Ping\n{}",
        agent.log()
    );

    // Once: the output so far, from the run's header on.
    let (ok, text) = erel_logs(&pki, &agent, "chatty");
    assert!(ok, "{text}");
    assert!(text.starts_with("--- erel: starting"), "{text}");
    assert!(
        text.contains("chatty line one\nchatty line two\n"),
        "{text}"
    );

    // Followed: the output so far, then a line printed after it started, each once.
    let mut follow = pki
        .erel_at("logs", &agent)
        .args(["chatty", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run erel logs --follow");
    let shown = Arc::new(Mutex::new(String::new()));
    follow_lines(follow.stdout.take().expect("stdout"), shown.clone(), |_| {});
    follow_lines(follow.stderr.take().expect("stderr"), shown.clone(), |_| {});
    let seen = |needle: &'static str| {
        let shown = shown.clone();
        async move {
            wait_until(PATIENCE, || async {
                shown.lock().expect("lock").contains(needle)
            })
            .await
        }
    };
    let before = seen("chatty line two").await;
    std::fs::write(&trigger, b"").expect("write the trigger");
    let after = before && seen("chatty line three").await;
    let _ = follow.kill();
    let _ = follow.wait();
    let shown = shown.lock().expect("lock").clone();
    assert!(
        before && after,
        "followed output:\n{shown}\nagent:\n{}",
        agent.log()
    );
    for line in ["chatty line one", "chatty line two", "chatty line three"] {
        assert_eq!(
            shown.matches(line).count(),
            1,
            "printed once: {line}\n{shown}"
        );
    }
    assert!(!shown.contains("output skipped"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erel_logs_of_an_unknown_release_names_the_host_and_its_releases() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let script = "#!/bin/sh\nexec sleep 100000\n";
    unpack_shell_release(&pki, &agent, work.path(), "known", "1", script).await;
    let (ok, text) = erel_logs(&pki, &agent, "unknown");
    assert!(!ok, "{text}");
    assert!(
        holds_all(
            &text,
            &[
                "host web-1 (127.0.0.1:",
                "has no release unknown; its releases: known"
            ]
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_logs_one_plain_line_per_command_and_refusals_as_warnings() {
    let (pki, agent) = pki_and_agent("web-1", &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let script = "#!/bin/sh\necho flop fails\nexit 3\n";
    let mut client = unpack_shell_release(&pki, &agent, work.path(), "flop", "1", script).await;
    client.ping().await.expect("ping");
    client
        .start(start_request("flop", "1", &[]))
        .await
        .expect("start");
    client
        .unpack("archives/missing.tar.gz", "releases/x/1", None)
        .await
        .expect_err("no such archive");
    assert!(
        wait_until(PATIENCE, || async {
            release_status(&pki, &agent, "flop")
                .await
                .is_some_and(|s| s.state == ReleaseState::CrashLooping)
        })
        .await,
        "crash-looping\n{}",
        agent.log()
    );
    // A master of another cluster: its handshake is refused.
    let stranger = Pki::new();
    Connector::new(stranger.client_config(), "stranger")
        .connect(&agent.host())
        .await
        .expect_err("a certificate from another CA");
    let log = agent.log_showing("TLS handshake refused", PATIENCE).await;

    let lines = |needle: &str| {
        log.lines()
            .filter(|l| l.contains(needle))
            .collect::<Vec<_>>()
    };
    // One line per command: write_file, unpack twice, start; Ping only at debug.
    assert_eq!(lines("command=write_file").len(), 1, "{log}");
    assert_eq!(lines("command=start").len(), 1, "{log}");
    assert!(lines("command=ping").is_empty(), "{log}");
    let unpacks = lines("command=unpack");
    assert_eq!(unpacks.len(), 2, "{log}");
    assert!(
        unpacks[0].contains(" INFO ") && unpacks[0].contains("ok=true"),
        "{log}"
    );
    assert!(
        unpacks[1].contains(" WARN ") && unpacks[1].contains("ok=false"),
        "a failed command is a warning: {log}"
    );
    let refused = lines("TLS handshake refused");
    assert!(
        refused
            .iter()
            .all(|l| l.contains(" WARN ") && l.contains("peer=127.0.0.1:")),
        "{log}"
    );
    // Plain values: a pid is a number, an absent field is left out.
    let exited = lines("exited; restarting after backoff");
    assert!(!exited.is_empty(), "{log}");
    for line in exited {
        assert!(
            line.contains(" code=3 ") && !line.contains("signal="),
            "{line}"
        );
        let pid = line
            .split(" pid=")
            .nth(1)
            .and_then(|rest| rest.split(' ').next());
        assert!(pid.is_some_and(|p| p.parse::<u32>().is_ok()), "{line}");
    }
    assert!(!log.contains("Some("), "{log}");
}

/// `erel logs <release>` on `agent`, once: (success, everything it printed).
fn erel_logs(pki: &Pki, agent: &AgentProc, release: &str) -> (bool, String) {
    let out = pki
        .erel_at("logs", agent)
        .arg(release)
        .output()
        .expect("run erel logs");
    (out.status.success(), output_text(&out))
}
