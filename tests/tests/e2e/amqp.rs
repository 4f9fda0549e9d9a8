//! Configs over RabbitMQ, against the real broker with real agents and real
//! `erel master --amqp` processes: masters receive, store and converge; a late master
//! catches up, even with every other master gone; old revisions are refused by
//! `publish` and ignored by masters; invalid configs are rejected without harm; one
//! master acts per group and another takes over when it is killed; a group marked
//! stopped is stopped, each stop logged; `erel watch` prints what they do. Each test has its own name prefix and deletes it at the end.
//! (The broker-restart test is its own test binary, `amqp_restart`.)

use std::time::Duration;

use crate::helper::amqp::{erel, logs, BrokerLock, MasterProc, TestBroker, Watcher};
use crate::helper::fleet::Fleet;
use crate::helper::{output_text, wait_until_blocking};

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Appends a text to the config log directly, bypassing `publish`'s checks.
fn inject(broker: &TestBroker, text: &str, revision: Option<u64>) {
    block_on(erel_master::amqp::log::append(
        &broker.broker,
        text,
        revision,
        "test-injector",
    ))
    .expect("append to the config log");
}

const CONVERGE: Duration = Duration::from_secs(60);
/// How long a master may take to see a publish and store it: generous for a machine whose
/// two cores are shared with a broker and other builds; every use polls a condition.
const RECEIVE: Duration = Duration::from_secs(60);

#[test]
fn amqp_masters_store_converge_catch_up_and_refuse_old_revisions() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("amqp-cu", &["alpha", "beta"]);
    let broker = TestBroker::new("catch-up", &["alpha", "beta"]);
    let mut m1 = fleet.master(&broker, "m1");
    let mut m2 = fleet.master(&broker, "m2");

    // Two masters receive revision 1, write it to disk, and the groups converge.
    let v1 = fleet.config(1, "1.0.0", "");
    let (ok, out) = fleet.publish(&broker, &v1);
    assert!(ok, "publish revision 1: {out}");
    assert!(out.contains("confirmed"), "{out}");
    assert!(
        wait_until_blocking(RECEIVE, || m1.held_revision() == Some(1)
            && m2.held_revision() == Some(1)),
        "both masters hold revision 1\n{}",
        logs(&[&m1, &m2])
    );
    assert_eq!(m1.held_text().as_deref(), Some(v1.as_str()));
    fleet.wait_all_run("1.0.0", CONVERGE, "every host runs 1.0.0", || {
        format!("{}{}", logs(&[&m1, &m2]), fleet.agent_logs())
    });
    // Each group is held by exactly one of them, and `config holders` says which.
    assert!(
        wait_until_blocking(RECEIVE, || {
            let out = erel(&fleet.pki, &["config", "holders", "--json"], &broker, &[]);
            let rows: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            rows.as_array().is_some_and(|rows| {
                rows.len() == 2
                    && rows
                        .iter()
                        .all(|r| matches!(r["master"].as_str(), Some("m1") | Some("m2")))
            })
        }),
        "holders listed for both groups"
    );
    for group in ["alpha", "beta"] {
        let holding = [&m1, &m2].iter().filter(|m| holds(m, group)).count();
        assert_eq!(
            holding,
            1,
            "exactly one master holds {group}\n{}",
            logs(&[&m1, &m2])
        );
    }

    // A third master started afterwards catches up.
    let mut m3 = fleet.master(&broker, "m3");
    assert!(
        wait_until_blocking(RECEIVE, || m3.held_revision() == Some(1)),
        "the late master catches up\n{}",
        m3.log()
    );

    // An equal or older revision is refused by publish, with both numbers.
    let (ok, out) = fleet.publish(&broker, &fleet.config(1, "2.0.0", ""));
    assert!(!ok, "revision 1 again must be refused: {out}");
    assert!(
        out.contains("revision 1 is not newer than revision 1"),
        "{out}"
    );
    let (ok, out) = fleet.publish(&broker, &fleet.config(0, "2.0.0", ""));
    assert!(
        !ok && out.contains("revision 0 is not newer than revision 1"),
        "{out}"
    );

    // Injected directly into the log, they are ignored by every master.
    inject(&broker, &fleet.config(1, "2.0.0", ""), Some(1));
    inject(&broker, &fleet.config(0, "2.0.0", ""), Some(0));
    for m in [&m1, &m2, &m3] {
        assert!(
            wait_until_blocking(RECEIVE, || m.log().contains("not newer than the one held")),
            "{} logs the ignored revisions\n{}",
            m.name,
            m.log()
        );
        assert_eq!(
            m.held_text().as_deref(),
            Some(v1.as_str()),
            "{} kept revision 1",
            m.name
        );
    }
    assert!(
        fleet.all_run("1.0.0"),
        "nothing was applied: {:?}",
        fleet.beats()
    );

    // `show` prints the newest revision (1, not the older ones injected last), and
    // `history` lists all five messages.
    let out = erel(&fleet.pki, &["config", "show", "--json"], &broker, &[]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("show --json");
    assert_eq!(shown["revision"], 1, "{}", output_text(&out));
    assert_eq!(shown["text"].as_str(), Some(v1.as_str()));
    let out = erel(&fleet.pki, &["config", "history"], &broker, &[]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.lines().count(),
        1 + 3,
        "header and three messages:\n{text}"
    );
    assert!(text.contains("test-injector"), "{text}");

    // Every master stopped (SIGTERM ends them cleanly); a publish, then a new master's
    // start: it reaches the new revision and converges the hosts alone.
    for m in [&mut m1, &mut m2, &mut m3] {
        let log_before = m.log();
        assert!(m.terminate(), "{} exits 0 on SIGTERM\n{log_before}", m.name);
    }
    let (ok, out) = fleet.publish(&broker, &fleet.config(2, "2.0.0", ""));
    assert!(ok, "publish revision 2: {out}");
    assert!(out.contains("previous newest: 1"), "{out}");
    assert!(fleet.all_run("1.0.0"), "nobody applied it yet");
    let m4 = fleet.master(&broker, "m4");
    assert!(
        wait_until_blocking(RECEIVE, || m4.held_revision() == Some(2)),
        "the new master reaches revision 2\n{}",
        m4.log()
    );
    fleet.wait_all_run("2.0.0", CONVERGE, "every host runs 2.0.0", || m4.log());
    drop(m4);
}

/// Whether `master`'s log says it took `group`.
fn holds(master: &MasterProc, group: &str) -> bool {
    let plain = format!("group={group}");
    let quoted = format!("group=\"{group}\"");
    master.log().lines().any(|line| {
        line.contains("holding the group")
            && line
                .split_whitespace()
                .any(|word| word == plain || word == quoted)
    })
}

#[test]
fn amqp_invalid_configs_are_rejected_and_the_daemon_keeps_running() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("amqp-inv", &["web"]);
    let broker = TestBroker::new("invalid", &["web"]);
    let mut master = fleet.master(&broker, "solo");

    // `erel watch` prints what the master does.
    let watcher = Watcher::start(&fleet.pki, &broker, RECEIVE);

    let v1 = fleet.config(1, "1.0.0", "");
    fleet.published(&broker, &v1);
    fleet.wait_all_run("1.0.0", CONVERGE, "the host runs 1.0.0", || master.log());

    // Not TOML; an unknown group; a header that disagrees with the text: all newer than
    // 1, all rejected. An archive missing from the artifact directory is not a fault of
    // the config: that revision waits, tried again until a newer one supersedes it.
    inject(&broker, "this is [not toml", Some(2));
    let unknown_group = fleet
        .config(3, "1.0.0", "")
        .replace("group = \"web\"", "group = \"nope\"");
    inject(&broker, &unknown_group, Some(3));
    let missing_archive = fleet
        .config(4, "1.0.0", "")
        .replace("beat-1.0.0.tar.gz", "beat-9.tar.gz");
    inject(&broker, &missing_archive, Some(4));
    inject(&broker, &fleet.config(5, "2.0.0", ""), Some(6));
    assert!(
        wait_until_blocking(RECEIVE, || {
            let log = master.log();
            log.matches("config rejected").count() >= 3
                && log
                    .lines()
                    .any(|l| l.contains("waiting for revision 4") && l.contains("beat-9.tar.gz"))
        }),
        "three rejections and one revision waiting for its archive logged\n{}",
        master.log()
    );
    let log = master.log();
    assert_eq!(log.matches("config rejected").count(), 3, "{log}");
    assert!(log.contains("no group") || log.contains("nope"), "{log}");
    assert!(log.contains("header says revision 6"), "{log}");
    assert!(master.running(), "the daemon keeps running");
    assert_eq!(
        master.held_text().as_deref(),
        Some(v1.as_str()),
        "nothing applied"
    );
    assert!(
        fleet.all_run("1.0.0"),
        "the host is untouched: {:?}",
        fleet.beats()
    );

    // A valid newer revision is still applied.
    fleet.published(&broker, &fleet.config(7, "2.0.0", ""));
    fleet.wait_all_run("2.0.0", CONVERGE, "the host runs 2.0.0", || master.log());
    assert!(
        wait_until_blocking(RECEIVE, || {
            let text = watcher.events();
            text.contains("revision 7 accepted")
                && text.contains("revision 3 rejected")
                && !text.contains("revision 4 rejected")
                && text.contains("rollout of beat 2.0.0 started")
                && text.contains("done, runs 2.0.0")
                && text.contains("web: revision 7 applied")
        }),
        "erel watch printed the events:\n{}",
        watcher.events()
    );
    assert!(
        master.terminate(),
        "clean exit on SIGTERM\n{}",
        master.log()
    );
}

#[test]
fn amqp_a_revision_far_ahead_is_refused_and_the_log_stays_usable() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("amqp-far", &["web"]);
    let broker = TestBroker::new("far-ahead", &["web"]);
    let mut master = fleet.master(&broker, "solo");
    let v1 = fleet.config(1, "1.0.0", "");
    fleet.published(&broker, &v1);
    fleet.wait_all_run("1.0.0", CONVERGE, "the host runs 1.0.0", || master.log());

    // Appended by other means than `publish`: the largest revision, and one past the
    // bound. Both refused for good by the master, naming the bound.
    let largest = (1u64 << 53) - 1;
    let step = 1u64 << 32;
    inject(&broker, &fleet.config(largest, "2.0.0", ""), Some(largest));
    inject(
        &broker,
        &fleet.config(3 + step, "2.0.0", ""),
        Some(3 + step),
    );
    let refusals = |master: &MasterProc| {
        master
            .log()
            .lines()
            .filter(|l| l.contains("config rejected") && l.contains("(2^32) above"))
            .count()
    };
    assert!(
        wait_until_blocking(RECEIVE, || refusals(&master) >= 2),
        "both refused, naming the bound\n{}",
        master.log()
    );
    // `publish` refuses such a jump, naming the bound and the newest revision (1).
    let (ok, text) = fleet.publish(&broker, &fleet.config(2 + step, "2.0.0", ""));
    assert!(
        !ok && text.contains("more than 4294967296 (2^32) above the newest revision in the log, 1"),
        "{text}"
    );
    // The log is not wedged: the next revisions publish and apply.
    fleet.published(&broker, &fleet.config(2, "2.0.0", ""));
    let v3 = fleet.config(3, "2.0.0", "max_in_flight = 1");
    fleet.published(&broker, &v3);
    fleet.wait_all_run("2.0.0", CONVERGE, "the host runs 2.0.0", || master.log());
    assert!(
        wait_until_blocking(RECEIVE, || master.held_revision() == Some(3)),
        "{}",
        master.log()
    );

    // Restarted, the master reads the log again from its start and measures each
    // message against the revisions before it, as `publish` does: the message of
    // revision 3 + 2^32 is within 2^32 of the revision held now, but not of those
    // before it in the log, and stays refused.
    assert!(master.terminate(), "clean exit\n{}", master.log());
    let master = fleet.master(&broker, "solo");
    assert!(
        wait_until_blocking(RECEIVE, || refusals(&master) >= 2
            && master.log().contains("config log read to its end")),
        "{}",
        master.log()
    );
    assert_eq!(master.held_text().as_deref(), Some(v3.as_str()));
}

#[test]
fn amqp_one_master_acts_per_group_and_another_takes_over_when_it_is_killed() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("amqp-ha", &["web", "web", "web"]);
    let broker = TestBroker::new("takeover", &["web"]);
    let mut a = fleet.master(&broker, "ma");
    let mut b = fleet.master(&broker, "mb");
    // Slow enough that the holder can be killed mid-rollout.
    let slow = "max_in_flight = 1\ncanaries = 1";
    fleet.published(&broker, &fleet.config(1, "1.0.0", slow));
    fleet.wait_all_run("1.0.0", CONVERGE, "every host runs 1.0.0", || {
        logs(&[&a, &b])
    });
    let holders: Vec<&MasterProc> = [&a, &b].into_iter().filter(|m| holds(m, "web")).collect();
    assert_eq!(holders.len(), 1, "exactly one holder\n{}", logs(&[&a, &b]));
    let a_holds = holds(&a, "web");
    let (holder, other) = if a_holds {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        !other.log().contains("rollout started") && !other.log().contains("host done"),
        "the other master did not act\n{}",
        other.log()
    );

    // Roll to 2.0.0; kill the holder (SIGKILL) once its first host is done.
    fleet.published(&broker, &fleet.config(2, "2.0.0", slow));
    assert!(
        wait_until_blocking(CONVERGE, || holder.log().matches("host done").count() >= 4),
        "the holder switches a first host to 2.0.0\n{}",
        holder.log()
    );
    holder.kill9();
    let switched_before = fleet.beats().iter().filter(|b| b.contains("2.0.0")).count();
    assert!(
        switched_before < 3,
        "killed mid-rollout: {:?}",
        fleet.beats()
    );
    assert!(
        wait_until_blocking(Duration::from_secs(15), || holds(other, "web")),
        "the other master takes the group over within seconds\n{}",
        other.log()
    );
    fleet.wait_all_run(
        "2.0.0",
        CONVERGE,
        "the new holder finishes the rollout",
        || format!("{}{}", other.log(), fleet.agent_logs()),
    );
    assert_eq!(other.held_revision(), Some(2));

    // `erel status --amqp` shows the new holder beside the hosts.
    let cluster = fleet.dir.path().join("cluster-2.toml");
    let mut shown = String::new();
    assert!(
        wait_until_blocking(RECEIVE, || {
            let out = erel(
                &fleet.pki,
                &["--cluster", cluster.to_str().expect("utf-8"), "status"],
                &broker,
                &[],
            );
            shown = output_text(&out);
            shown.lines().any(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                words.first() == Some(&"web") && words.get(1) == Some(&other.name.as_str())
            })
        }),
        "erel status names the holder {}:\n{shown}",
        other.name
    );
}

#[test]
fn amqp_a_group_marked_stopped_is_stopped_and_the_master_logs_each_stop() {
    let _lock = BrokerLock::shared();
    let fleet = Fleet::with_beat_releases("amqp-st", &["web", "web"]);
    let broker = TestBroker::new("stopped", &["web"]);
    let mut master = fleet.master(&broker, "solo");

    fleet.published(&broker, &fleet.config(1, "1.0.0", ""));
    fleet.wait_all_run("1.0.0", CONVERGE, "every host runs 1.0.0", || master.log());

    fleet.published(&broker, &fleet.config(2, "1.0.0", "state = \"stopped\""));
    assert!(
        wait_until_blocking(CONVERGE, || fleet.beats().iter().all(String::is_empty)),
        "every host stopped: {:?}\n{}",
        fleet.beats(),
        master.log()
    );
    // The port closes before the agent answers the stop: wait for the lines.
    for agent in &fleet.agents {
        assert!(
            wait_until_blocking(RECEIVE, || master.log().lines().any(|line| {
                line.contains("INFO")
                    && line.contains("release stopped (the group is stopped)")
                    && line.contains(&format!("host=\"{}\"", agent.id))
            })),
            "the stop of {} is logged at info\n{}",
            agent.id,
            master.log()
        );
    }
    assert!(
        master.terminate(),
        "clean exit on SIGTERM\n{}",
        master.log()
    );
}
