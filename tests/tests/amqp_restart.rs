//! The broker restarted under running masters (`rabbitmqctl stop_app` / `start_app`):
//! they keep their hosts as they are, reconnect with backoff, and apply the next
//! revision; a master started while the broker is down waits for it and catches up.
//!
//! Its own test binary, holding the broker lock exclusively, so that no other test of
//! this repository uses the broker while it is down.

#[path = "e2e/helper/mod.rs"]
mod helper;

use std::process::Command;
use std::time::Duration;

use helper::amqp::{logs, one_host_under_masters, BrokerLock};
use helper::wait_until_blocking;

/// Starts the broker's application again even when the test fails half-way.
struct RestartOnDrop {
    stopped: bool,
}

impl RestartOnDrop {
    fn stop_app(&mut self) {
        let out = rabbitmqctl("stop_app");
        assert!(out.status.success(), "rabbitmqctl stop_app: {out:?}");
        self.stopped = true;
    }

    fn start_app(&mut self) {
        let out = rabbitmqctl("start_app");
        assert!(out.status.success(), "rabbitmqctl start_app: {out:?}");
        self.stopped = false;
    }
}

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if self.stopped {
            let _ = rabbitmqctl("start_app");
        }
    }
}

fn rabbitmqctl(command: &str) -> std::process::Output {
    let path = std::env::var("PATH").unwrap_or_default();
    Command::new("rabbitmqctl")
        .arg(command)
        .env("PATH", format!("{path}:/usr/sbin:/usr/lib/rabbitmq/bin"))
        .output()
        .expect("run rabbitmqctl")
}

#[test]
fn amqp_broker_restart_masters_reconnect_and_apply_the_next_revision() {
    let _lock = BrokerLock::exclusive();
    let (fleet, broker, [m1, m2]) = one_host_under_masters("amqp-rs", "restart", ["r1", "r2"], "");
    assert!(
        wait_until_blocking(Duration::from_secs(60), || fleet.all_run("1.0.0")
            && m1.held_revision() == Some(1)
            && m2.held_revision() == Some(1)),
        "revision 1 applied: {:?}\n{}",
        fleet.beats(),
        logs(&[&m1, &m2])
    );
    let pid_before = fleet.agents[0].release_pids("beat");

    let mut app = RestartOnDrop { stopped: false };
    app.stop_app();
    assert!(
        wait_until_blocking(Duration::from_secs(30), || [&m1, &m2]
            .iter()
            .all(|m| m.log().contains("reconnecting"))),
        "both masters notice and retry\n{}",
        logs(&[&m1, &m2])
    );
    // A master that starts while the broker is down waits for it.
    let m3 = fleet.master(&broker, "r3");
    assert!(
        wait_until_blocking(Duration::from_secs(30), || m3
            .log()
            .contains("reconnecting")),
        "the late master retries\n{}",
        m3.log()
    );
    // Meanwhile the hosts are left as they are.
    assert!(fleet.all_run("1.0.0"));
    assert_eq!(fleet.agents[0].release_pids("beat"), pid_before);
    app.start_app();

    // Publish the next revision as soon as the broker takes it.
    let text = fleet.config(2, "2.0.0", "");
    let mut last = String::new();
    assert!(
        wait_until_blocking(Duration::from_secs(60), || {
            let (ok, out) = fleet.publish(&broker, &text);
            last = out;
            ok
        }),
        "publish after the restart: {last}"
    );
    assert!(
        wait_until_blocking(Duration::from_secs(60), || [&m1, &m2, &m3]
            .iter()
            .all(|m| m.held_revision() == Some(2))),
        "every master applies revision 2\n{}",
        logs(&[&m1, &m2, &m3])
    );
    assert!(
        wait_until_blocking(Duration::from_secs(60), || fleet.all_run("2.0.0")),
        "the host runs 2.0.0: {:?}\n{}",
        fleet.beats(),
        logs(&[&m1, &m2, &m3])
    );
}
