//! The config log on a RabbitMQ cluster of three nodes: masters and `erel config
//! publish` given every node, one node lost for good (its VM killed) in the middle of
//! publishes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::helper::amqp::{logs, BrokerLock, MasterProc, TestBroker, MASTER_INTERVAL};
use crate::helper::cluster::RabbitCluster;
use crate::helper::fleet::Fleet;
use crate::helper::{free_port, output_text, poll_until_blocking, wait_until_blocking};

/// How long anything that goes through the broker may take here: three brokers, two
/// masters, two agents and a publisher share a busy two-core machine.
const BROKER_LIMIT: Duration = Duration::from_secs(120);
/// Revisions confirmed before the node is lost, and after.
const CONFIRMED_EACH_SIDE: usize = 3;

/// The newest revision, and every revision, the config log holds (read through any node
/// that answers).
fn log_revisions(broker: &TestBroker) -> Vec<u64> {
    broker
        .config_log()
        .iter()
        .filter_map(|e| e.revision())
        .collect()
}

/// The node (index in the cluster) `master` last said it connected to.
fn node_of(master: &MasterProc) -> Option<usize> {
    let log = master.log();
    let (_, after) = log.rsplit_once("connected to broker node ")?;
    let number: usize = after.split_whitespace().next()?.parse().ok()?;
    number.checked_sub(1)
}

/// `name`'s row of `rabbitmqctl list_queues name type leader members` on `node`.
fn queue_row(cluster: &RabbitCluster, node: &str, name: &str) -> String {
    let out = cluster.ctl(
        node,
        &[
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "--quiet",
            "--no-table-headers",
        ],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn cluster_a_lost_broker_node_loses_no_confirmed_revision_and_stops_no_master() {
    let mut cluster = match RabbitCluster::start("loss") {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipped: no three-node RabbitMQ cluster could be started: {why}");
            return;
        }
    };
    let fleet = Fleet::with_beat_releases("cl", &["web", "web"]);
    let broker = TestBroker::on(cluster.urls().join(","), "cluster", &["web"]);
    let mut m1 = fleet.master(&broker, "c1");
    let mut m2 = fleet.master(&broker, "c2");
    fleet.published(&broker, &fleet.config(1, "1.0.0", ""));
    fleet.wait_all_run("1.0.0", BROKER_LIMIT, "revision 1 converged", || {
        logs(&[&m1, &m2])
    });
    assert!(
        wait_until_blocking(BROKER_LIMIT, || m1.held_revision() == Some(1)
            && m2.held_revision() == Some(1)),
        "both masters hold revision 1\n{}",
        logs(&[&m1, &m2])
    );

    // The log and the group's lease are replicated to all three nodes. The node lost
    // is the one most of what matters is on: the log's leader, the lease's leader, the
    // masters' connections (once a master holds the group, so that all are settled).
    poll_until_blocking(BROKER_LIMIT, || {
        [&m1, &m2]
            .into_iter()
            .find(|m| m.log().contains("holding the group"))
    })
    .expect("a master holds the group");
    let log_queue = broker.broker.names().configs();
    let lease_queue = broker.broker.names().lease("web").expect("group name");
    let rows: Vec<String> = [&log_queue, &lease_queue]
        .into_iter()
        .map(|queue| queue_row(&cluster, &cluster.nodes[0].name, queue))
        .collect();
    for row in &rows {
        assert!(
            cluster.nodes.iter().all(|node| row.contains(&node.name)),
            "a replica on every node: {row:?}"
        );
    }
    let weight = |index: usize| {
        let name = cluster.nodes[index].name.as_str();
        let leaders = rows
            .iter()
            .filter(|row| row.split('\t').nth(2) == Some(name))
            .count();
        let masters = [&m1, &m2]
            .into_iter()
            .filter(|m| node_of(m) == Some(index))
            .count();
        leaders + masters
    };
    let lost_index = (0..cluster.nodes.len())
        .max_by_key(|index| (weight(*index), std::cmp::Reverse(*index)))
        .expect("three nodes");
    let lost = cluster.nodes[lost_index].name.clone();
    let on_lost: Vec<String> = [&m1, &m2]
        .into_iter()
        .filter(|m| node_of(m) == Some(lost_index))
        .map(|m| m.name.clone())
        .collect();

    // A publisher publishes revision after revision, all the time: 2.0.0 while the node
    // runs, 3.0.0 once it is gone.
    let confirmed = Mutex::new(Vec::<(u64, bool)>::new());
    let failed = Mutex::new(Vec::<(u64, String)>::new());
    let node_lost = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut revision = 2;
            while !done.load(Ordering::SeqCst) {
                let after = node_lost.load(Ordering::SeqCst);
                let version = if after { "3.0.0" } else { "2.0.0" };
                let (ok, out) = fleet.publish(&broker, &fleet.config(revision, version, ""));
                if ok {
                    confirmed.lock().expect("lock").push((revision, after));
                } else {
                    failed.lock().expect("lock").push((revision, out));
                }
                revision += 1;
            }
        });
        let count = |after: bool| {
            confirmed
                .lock()
                .expect("lock")
                .iter()
                .filter(|(_, a)| *a == after)
                .count()
        };
        let before = wait_until_blocking(BROKER_LIMIT, || count(false) >= CONFIRMED_EACH_SIDE);
        if before {
            cluster.kill_node(lost_index);
            node_lost.store(true, Ordering::SeqCst);
        }
        let after =
            before && wait_until_blocking(BROKER_LIMIT, || count(true) >= CONFIRMED_EACH_SIDE);
        done.store(true, Ordering::SeqCst);
        assert!(
            before && after,
            "revisions confirmed before and after the node was lost: {:?}; failed: {:?}\n{}",
            confirmed.lock().expect("lock"),
            failed.lock().expect("lock"),
            logs(&[&m1, &m2])
        );
    });
    let confirmed: Vec<u64> = confirmed
        .into_inner()
        .expect("lock")
        .iter()
        .map(|(r, _)| *r)
        .collect();
    let failed = failed.into_inner().expect("lock");
    // Nothing confirmed is lost: the log, read through the nodes left, holds every
    // confirmed revision, and both masters end on its newest.
    let in_log = log_revisions(&broker);
    for revision in &confirmed {
        assert!(
            in_log.contains(revision),
            "confirmed revision {revision} is in the log: {in_log:?}"
        );
    }
    eprintln!(
        "node {lost} lost, masters {on_lost:?} on it, queues {rows:?}; confirmed \
         {confirmed:?}; the log holds {in_log:?}; publishes that failed: {failed:?}"
    );
    let newest = *in_log.iter().max().expect("a revision");
    assert!(newest >= *confirmed.iter().max().expect("confirmed"));
    assert!(
        wait_until_blocking(BROKER_LIMIT, || m1.held_revision() == Some(newest)
            && m2.held_revision() == Some(newest)),
        "both masters hold revision {newest}: {:?} {:?}\n{}",
        m1.held_revision(),
        m2.held_revision(),
        logs(&[&m1, &m2])
    );
    // No master stopped; those on the lost node moved to another.
    for master in [&mut m1, &mut m2] {
        assert!(
            master.running(),
            "{} still runs\n{}",
            master.name,
            master.log()
        );
    }
    for master in [&m1, &m2] {
        if on_lost.contains(&master.name) {
            let now = node_of(master);
            assert!(
                now.is_some_and(|node| node != lost_index),
                "{} moved from node {lost} to another\n{}",
                master.name,
                master.log()
            );
        }
    }
    // And they still converge the hosts: the newest revision (3.0.0) runs everywhere.
    fleet.wait_all_run(
        "3.0.0",
        BROKER_LIMIT + MASTER_INTERVAL,
        "the masters converge the hosts after the node loss",
        || logs(&[&m1, &m2]),
    );
}

#[test]
fn cluster_a_node_that_does_not_answer_is_passed_over() {
    let _lock = BrokerLock::shared();
    // A port nothing listens on (reserved, never bound), then the test broker.
    let port = free_port();
    let dead = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let broker = TestBroker::on(
        format!("{dead},{}", crate::helper::amqp::amqp_url()),
        "pass-over",
        &["web"],
    );
    let fleet = Fleet::with_beat_releases("po", &["web"]);
    let (ok, out) = fleet.publish(&broker, &fleet.config(1, "1.0.0", ""));
    assert!(ok, "published through the second node: {out}");
    assert!(
        out.contains("trying the next broker node")
            && out.contains(&format!("amqp://guest:***@127.0.0.1:{port}/%2f")),
        "the dead node is named: {out}"
    );
    assert_eq!(log_revisions(&broker), vec![1]);

    // The same list as `--amqp` repeated, and in EREL_AMQP.
    let real = crate::helper::amqp::amqp_url();
    let prefix = broker.prefix.as_str();
    let repeated = fleet
        .pki
        .erel()
        .args(["config", "show", "--amqp", &dead, "--amqp", &real])
        .args(["--amqp-prefix", prefix])
        .output()
        .expect("run erel");
    assert!(repeated.status.success(), "{}", output_text(&repeated));
    assert!(
        String::from_utf8_lossy(&repeated.stdout).contains("revision = 1"),
        "{}",
        output_text(&repeated)
    );
    let from_env = fleet
        .pki
        .erel()
        .args(["config", "show", "--amqp-prefix", prefix])
        .env("EREL_AMQP", format!("{dead},{real}"))
        .output()
        .expect("run erel");
    assert!(from_env.status.success(), "{}", output_text(&from_env));

    // A list with a bad entry is refused before anything is tried, naming the entry.
    let bad = fleet
        .pki
        .erel()
        .args(["config", "show", "--amqp-prefix", prefix])
        .args(["--amqp", &format!("{real},ftp://guest:secret@127.0.0.1")])
        .output()
        .expect("run erel");
    let said = output_text(&bad);
    assert!(!bad.status.success(), "{said}");
    assert!(
        said.contains("broker address 2 of 2") && said.contains("ftp://guest:***@127.0.0.1"),
        "{said}"
    );
    assert!(!said.contains("secret"), "{said}");

    // Every node down: one message naming each.
    let other = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let none = fleet
        .pki
        .erel()
        .args(["config", "show", "--amqp-prefix", prefix])
        .args(["--amqp", &format!("{dead},{other}")])
        .output()
        .expect("run erel");
    let said = output_text(&none);
    assert!(!none.status.success(), "{said}");
    assert!(said.contains("no broker node answered"), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
}

/// Configs published the moment a fresh cluster is up. Each round uses a prefix of its
/// own, so it declares a new config log: first three appends at once (`log::append`),
/// one through each node, as masters and a publisher starting together declare the log
/// on every node, then `erel config publish` through another node each round. Their
/// first reads and appends meet a stream whose replicas are still starting (the broker
/// answers `RESOURCE_ERROR - Stream not found`, or that the queue "does not have a
/// running local replica", until they are up), which they wait out.
#[test]
fn cluster_a_publish_right_after_the_cluster_started_is_confirmed() {
    let fleet = Fleet::with_beat_releases("fr", &["web"]);
    let cluster = match RabbitCluster::start("fresh") {
        Ok(cluster) => cluster,
        Err(why) => {
            eprintln!("skipped: no three-node RabbitMQ cluster could be started: {why}");
            return;
        }
    };
    let urls = cluster.urls();
    // The node list starting at node `first`: a party given it connects there.
    let from = |first: usize| -> String {
        let list: Vec<String> = urls[first..]
            .iter()
            .chain(&urls[..first])
            .cloned()
            .collect();
        list.join(",")
    };
    for round in 0..urls.len() {
        let broker = TestBroker::on(from(round), &format!("fresh{round}"), &["web"]);
        let appended: Vec<String> = std::thread::scope(|scope| {
            let appends: Vec<_> = (0..urls.len())
                .map(|node| {
                    let broker = erel_master::amqp::Broker::new(from(node), broker.prefix.clone())
                        .expect("valid broker");
                    scope.spawn(move || {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime")
                            .block_on(erel_master::amqp::log::append(
                                &broker,
                                &format!("# not a config: appended through node {node}\n"),
                                None,
                                "test",
                            ))
                            .err()
                            .map(|e| format!("through node {node}: {e}"))
                    })
                })
                .collect();
            appends
                .into_iter()
                .filter_map(|append| append.join().expect("append thread"))
                .collect()
        });
        assert!(appended.is_empty(), "round {round}: {appended:?}");
        let (ok, out) = fleet.publish(&broker, &fleet.config(1, "1.0.0", ""));
        assert!(
            ok,
            "round {round}: published through node {round} of a cluster just started: {out}"
        );
        assert_eq!(log_revisions(&broker), vec![1], "round {round}");
    }
}
