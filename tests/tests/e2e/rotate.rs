//! Keys rotate from the master: `erel certs rotate` and `erel certs revoke --push`
//! against real agents over real TLS, with a release running throughout; and the
//! agent's judgement of a pushed bundle (refusals, probation).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use erel_certs::{MasterDir, PushedBundle, PUSHED_BUNDLE};
use erel_master::client::{AgentClient, Connector, WriteSource};

use crate::helper::fleet::Fleet;
use crate::helper::install::{install_and_start, no_progress};
use crate::helper::release::beat_release;
use crate::helper::AgentCommands;
use crate::helper::{output_text, wait_until, AgentProc, Pki};

const RELEASE: &str = "beat";
/// Bound on a release coming up, and on an agent noticing a pushed bundle.
const PATIENCE: Duration = Duration::from_secs(30);

/// A fleet of one agent per entry of `groups` (its group), each running the beat
/// release, and its cluster file.
async fn running_fleet(prefix: &str, groups: &[&str]) -> (Fleet, PathBuf) {
    let fleet = Fleet::new(prefix, groups);
    let tarball = beat_release(fleet.dir.path(), RELEASE, "0.1.0");
    for (agent, port) in fleet.agents.iter().zip(&fleet.ports) {
        let mut client = fleet.pki.connect(agent).await;
        let env = vec![("BEAT_PORT".to_string(), port.to_string())];
        install_and_start(&mut client, &tarball, RELEASE, "0.1.0", env).await;
    }
    let all = wait_until(PATIENCE, || async { fleet.all_run("0.1.0") }).await;
    assert!(
        all,
        "release up: {:?}\n{}",
        fleet.beats(),
        fleet.agent_logs()
    );
    let name = tarball.file_name().expect("name").to_string_lossy();
    let mut text = format!("revision = 1\n{}", fleet.hosts_toml("BEAT_PORT"));
    let mut named: Vec<&str> = groups.to_vec();
    named.sort_unstable();
    named.dedup();
    for group in named {
        text.push_str(&format!(
            "[group.{group}]\nrelease = \"{RELEASE}\"\nversion = \"0.1.0\"\narchive = \"{name}\"\ncanaries = 1\n"
        ));
    }
    let cluster = fleet.dir.path().join("cluster.toml");
    std::fs::write(&cluster, text).expect("cluster file");
    (fleet, cluster)
}

/// Runs `erel --certs <pki> <words> --cluster <cluster>`; (success, output).
fn erel(pki: &Pki, words: &[&str], cluster: &Path) -> (bool, String) {
    let out = pki
        .erel()
        .args(words)
        .arg("--cluster")
        .arg(cluster)
        .output()
        .expect("run erel");
    (out.status.success(), output_text(&out))
}

/// A copy of the master's credentials as they are now (to try them later).
fn keep_master(pki: &Pki, name: &str) -> PathBuf {
    let dir = pki.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for file in ["ca.pem", "master.pem", "master.key", "crl.pem"] {
        std::fs::copy(pki.master.path().join(file), dir.join(file)).expect("copy");
    }
    dir
}

/// A client that presents the master credentials kept in `kept` and trusts what the
/// certificate directory trusts now (so a refusal is the agent's).
fn kept_master_config(pki: &Pki, kept: &Path) -> Arc<rustls::ClientConfig> {
    erel_certs::client_config_from(
        &pki.master.ca_pem(),
        &kept.join("master.pem"),
        &kept.join("master.key"),
        Some(&pki.master.crl_pem()),
    )
    .expect("client config")
}

/// A session of the master credentials kept in `kept` with `agent`, proved by a ping.
async fn connect_kept(pki: &Pki, kept: &Path, agent: &AgentProc) -> AgentClient {
    let mut client = Connector::new(kept_master_config(pki, kept), "held-master")
        .connect(&agent.host())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", agent.id, agent.log()));
    client.ping().await.expect("a ping before the change");
    client
}

/// Whether `agent` lets a master with `tls` in and answers a ping.
async fn answers(tls: Arc<rustls::ClientConfig>, agent: &AgentProc) -> Result<(), String> {
    let mut client = Connector::new(tls, "test-master")
        .with_connect_timeout(Duration::from_secs(10))
        .connect(&agent.host())
        .await
        .map_err(|e| e.to_string())?;
    client.ping().await.map_err(|e| e.to_string())?;
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_ca_keeps_the_release_running_and_locks_the_old_master_out() {
    let (mut fleet, cluster) = running_fleet("rot", &["web"; 3]).await;
    let pids = fleet.release_pids(RELEASE);
    let old = keep_master(&fleet.pki, "old-master");
    let mut held = connect_kept(&fleet.pki, &old, &fleet.agents[0]).await;

    let (ok, dry) = erel(&fleet.pki, &["certs", "rotate", "--dry-run"], &cluster);
    assert!(ok, "{dry}");
    assert!(dry.contains("1. rot-1@"), "{dry}");

    let (ok, out) = erel(&fleet.pki, &["certs", "rotate"], &cluster);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    assert!(out.contains("rotation done"), "{out}");
    assert!(
        !fleet.pki.master.path().join(".pushing").exists(),
        "the staging directory is removed once every bundle is pushed"
    );
    assert_eq!(
        fleet.release_pids(RELEASE),
        pids,
        "the release was not restarted"
    );
    assert!(fleet.all_run("0.1.0"), "{:?}", fleet.beats());
    assert!(!fleet.pki.master.next().path().exists());
    assert!(!fleet.pki.master.previous().path().exists());

    // The master's configuration now trusts the new CA alone: every agent serves the
    // new chain, and takes the new master certificate.
    let new = fleet.pki.client_config();
    for agent in &fleet.agents {
        answers(new.clone(), agent).await.expect("new credentials");
        let old_try = answers(kept_master_config(&fleet.pki, &old), agent).await;
        assert!(
            old_try.is_err(),
            "{}: the old master is still let in",
            agent.id
        );
    }

    // A session the old master opened before the rotation ends at its next request.
    let refused = held
        .ping()
        .await
        .expect_err("the retired CA's session still runs");
    let text = refused.to_string();
    assert!(
        text.contains("the master's certificate is no longer accepted")
            && text.contains("unknown CA")
            && text.contains("after this session began"),
        "{text}"
    );

    // Restarted, an agent serves with the confirmed bundle at once.
    fleet.agents[1].restart();
    answers(new, &fleet.agents[1])
        .await
        .unwrap_or_else(|e| panic!("after a restart: {e}\n{}", fleet.agents[1].log()));
    assert_eq!(fleet.release_pids(RELEASE), pids);
}

/// Writes `bundle` to the agent's `certs/bundle.toml` with WriteFile.
async fn push(pki: &Pki, agent: &AgentProc, bundle: &PushedBundle) {
    let file = pki.dir.path().join(format!("push-{}.toml", agent.id));
    std::fs::write(&file, bundle.to_toml()).expect("stage");
    let source = WriteSource {
        path: file,
        sha256: None,
        sha256_of: None,
    };
    let mut client = pki.connect(agent).await;
    client
        .write_file(&source, PUSHED_BUNDLE, 0o600, &mut no_progress())
        .await
        .expect("push");
    client.close().await;
}

/// Pushes `bundle`, then checks the master still gets in with its credentials and
/// that the agent set the file aside as `bundle.toml.refused`, naming `check`.
async fn refused(pki: &Pki, agent: &AgentProc, bundle: &PushedBundle, check: &str) {
    push(pki, agent, bundle).await;
    answers(pki.client_config(), agent)
        .await
        .unwrap_or_else(|e| panic!("the previous bundle serves: {e}\n{}", agent.log()));
    let set_aside = agent.root.join(format!("{PUSHED_BUNDLE}.refused"));
    assert!(set_aside.is_file(), "{}", agent.log());
    agent
        .log_showing(&format!("refused ({check})"), PATIENCE)
        .await;
    std::fs::remove_file(set_aside).expect("clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushed_bundles_are_refused_and_the_agent_keeps_answering() {
    let pki = Pki::new();
    let agent = AgentProc::start(&pki, "bad-1", &[]);
    answers(pki.client_config(), &agent)
        .await
        .expect("first contact");
    let own = PushedBundle::from_dir(&pki.bundle("bad-1")).expect("own bundle");
    let other_dir = pki.bundle("bad-2");
    let other_key = std::fs::read_to_string(other_dir.join("host.key")).expect("key");
    let mismatched = PushedBundle::new(
        own.ca.clone(),
        own.certificate.clone(),
        other_key,
        own.crl.clone(),
    );
    refused(&pki, &agent, &mismatched, "key").await;
    let other_host = PushedBundle::from_dir(&other_dir).expect("bundle");
    refused(&pki, &agent, &other_host, "same host").await;
    let stranger = MasterDir::new(pki.dir.path().join("stranger"));
    stranger.init("stranger").expect("init");
    let lockout = PushedBundle::from_dir(
        &stranger
            .issue_host("bad-1", &["127.0.0.1".parse().expect("ip")], &[])
            .expect("host"),
    )
    .expect("bundle");
    refused(&pki, &agent, &lockout, "master kept").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_no_master_confirms_reverts_after_its_probation() {
    let pki = Pki::new();
    let agent = AgentProc::start(&pki, "prob-1", &["--bundle-probation-secs", "2"]);
    answers(pki.client_config(), &agent)
        .await
        .expect("first contact");
    // The next CA's certificate, trusting both CAs: valid for the agent, but a master
    // that trusts only the current CA never completes a handshake with it.
    pki.master.begin_rotation(&["prob-1"]).expect("next CA");
    let overlap = pki
        .master
        .next()
        .overlap_bundle(&pki.master, "prob-1")
        .expect("overlap");
    push(&pki, &agent, &overlap).await;
    let only_current = erel_certs::client_config_from(
        &pki.master.ca_pem(),
        &pki.master.master_pem(),
        &pki.master.master_key(),
        Some(&pki.master.crl_pem()),
    )
    .expect("config");
    assert!(
        answers(only_current.clone(), &agent).await.is_err(),
        "the pushed bundle serves"
    );
    let reverted = agent.root.join(format!("{PUSHED_BUNDLE}.reverted"));
    let back = wait_until(PATIENCE, || async {
        answers(only_current.clone(), &agent).await.is_ok() && reverted.is_file()
    })
    .await;
    assert!(back, "not reverted:\n{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_push_locks_a_revoked_master_out_of_every_agent() {
    let (fleet, cluster) = running_fleet("rvk", &["web"; 2]).await;
    let pids = fleet.release_pids(RELEASE);
    let stolen = keep_master(&fleet.pki, "stolen");
    let (ok, out) = erel(
        &fleet.pki,
        &["certs", "revoke", "master", "--push"],
        &cluster,
    );
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    for agent in &fleet.agents {
        answers(fleet.pki.client_config(), agent)
            .await
            .expect("the new master");
        let tried = answers(kept_master_config(&fleet.pki, &stolen), agent).await;
        assert!(
            tried.is_err(),
            "{}: the revoked master is still let in",
            agent.id
        );
    }
    assert_eq!(fleet.release_pids(RELEASE), pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_open_when_its_master_is_revoked_is_refused_at_its_next_request() {
    let (fleet, cluster) = running_fleet("rvs", &["web"]).await;
    let agent = &fleet.agents[0];
    let stolen = keep_master(&fleet.pki, "stolen");
    let pem = std::fs::read(stolen.join("master.pem")).expect("master.pem");
    let (_, der) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    let serial = der
        .parse_x509()
        .expect("certificate")
        .raw_serial_as_string();
    let mut held = connect_kept(&fleet.pki, &stolen, agent).await;

    let (ok, out) = erel(
        &fleet.pki,
        &["certs", "revoke", "master", "--push"],
        &cluster,
    );
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    let refused = held
        .ping()
        .await
        .expect_err("the revoked master's session still runs");
    let expected =
        format!("the master's certificate was revoked (serial {serial}) after this session began");
    assert!(refused.to_string().contains(&expected), "{refused}");
    let after = held.ping().await;
    assert!(after.is_err(), "the session stays open: {after:?}");
    let logged = wait_until(PATIENCE, || async { agent.log().contains(&expected) }).await;
    assert!(logged, "{}", agent.log());
    answers(fleet.pki.client_config(), agent)
        .await
        .expect("a fresh master gets in");
}

/// A copy of `host`'s bundle as the master issued it, as a thief would keep it; its
/// directory.
fn stolen_bundle(fleet: &Fleet, host: &str) -> PathBuf {
    let stolen = fleet.pki.dir.path().join("stolen-host");
    crate::recover::copy_bundle(&fleet.pki.master.host_dir(host), &stolen);
    stolen
}

/// `erel certs revoke HOST --push`; its output, after asserting that it succeeded and
/// that every agent of `fleet` answers the master's credentials afterwards.
async fn revoke_push(fleet: &Fleet, cluster: &Path, host: &str) -> String {
    let (ok, out) = erel(&fleet.pki, &["certs", "revoke", host, "--push"], cluster);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    every_agent_answers(fleet, &out).await;
    out
}

/// Asserts that `erel ping` refuses an agent serving the bundle in `stolen` (host `id`),
/// naming its certificate as revoked.
fn expect_refused_as_revoked(fleet: &Fleet, stolen: PathBuf, id: &str) {
    let impostor = AgentProc::start_with_bundle(stolen, id);
    let out = fleet
        .pki
        .erel()
        .args(["ping", &impostor.host().to_string()])
        .output();
    let text = output_text(&out.expect("run ping"));
    assert!(text.contains("revoked"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_push_of_a_host_gives_it_a_new_certificate_and_the_old_one_is_refused() {
    let (fleet, cluster) = running_fleet("rvh", &["web"; 2]).await;
    let pids = fleet.release_pids(RELEASE);
    let stolen = stolen_bundle(&fleet, "rvh-1");

    let out = revoke_push(&fleet, &cluster, "rvh-1").await;
    assert!(out.contains("issued a new certificate for rvh-1"), "{out}");
    let pushed = PushedBundle::read(&fleet.agents[0].root.join(PUSHED_BUNDLE)).expect("pushed");
    let old = std::fs::read_to_string(stolen.join("host.pem")).expect("host.pem");
    assert_ne!(
        pushed.certificate, old,
        "the host still serves its revoked certificate"
    );
    assert_eq!(fleet.release_pids(RELEASE), pids);

    // An agent serving with the revoked certificate is refused by the master.
    expect_refused_as_revoked(&fleet, stolen, "rvh-1");
}

/// After a rotation (kept old CA, then finished), the revoked host (the second of the
/// rollout) still gets its new certificate: the master lets the host's revoked one in
/// for that push only, then proves the new one with the new CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_push_of_a_host_after_a_rotation_gives_it_a_new_certificate() {
    let (fleet, cluster) = running_fleet("rvr", &["web"; 2]).await;
    let pids = fleet.release_pids(RELEASE);
    for words in [
        &["certs", "rotate", "--keep-old-ca"][..],
        &["certs", "rotate"],
    ] {
        let (ok, out) = erel(&fleet.pki, words, &cluster);
        assert!(ok, "{words:?}: {out}\n{}", fleet.agent_logs());
    }
    let stolen = stolen_bundle(&fleet, "rvr-2");

    let out = revoke_push(&fleet, &cluster, "rvr-2").await;
    assert!(out.contains("issued a new certificate for rvr-2"), "{out}");
    // The host serves the certificate the master issued it in place of the revoked one.
    let agent = &fleet.agents[1];
    assert_eq!(agent.id, "rvr-2");
    let pushed = PushedBundle::read(&agent.root.join(PUSHED_BUNDLE)).expect("pushed");
    let issued = fleet.pki.master.host_dir("rvr-2").join("host.pem");
    let issued = std::fs::read_to_string(issued).expect("host.pem");
    let old = std::fs::read_to_string(stolen.join("host.pem")).expect("host.pem");
    assert_ne!(issued, old, "no new certificate issued: {out}");
    assert_eq!(pushed.certificate, issued, "{out}\n{}", agent.log());

    // Run again (as after a stop), it revokes the certificate the host serves now and
    // gets it in the same way.
    let again = revoke_push(&fleet, &cluster, "rvr-2").await;
    let pushed = PushedBundle::read(&agent.root.join(PUSHED_BUNDLE)).expect("pushed");
    assert_ne!(pushed.certificate, issued, "{again}");
    assert_eq!(fleet.release_pids(RELEASE), pids);

    // An agent serving with the revoked certificate is refused by the master.
    expect_refused_as_revoked(&fleet, stolen, "rvr-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stops_answering_stops_the_rotation_and_a_second_run_resumes() {
    let (mut fleet, cluster) = running_fleet("halt", &["web"; 3]).await;
    let pids = fleet.release_pids(RELEASE);
    assert!(fleet.agents[1].terminate(), "{}", fleet.agents[1].log());

    let (ok, out) = erel(&fleet.pki, &["certs", "rotate"], &cluster);
    assert!(!ok, "{out}");
    assert!(
        out.contains("halt-2: the overlap round stopped at this host"),
        "{out}"
    );
    // The canary holds the overlap bundle, the last host was not touched: both still
    // take the master's current credentials.
    for agent in [&fleet.agents[0], &fleet.agents[2]] {
        answers(fleet.pki.client_config(), agent)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", agent.id, agent.log()));
    }
    assert!(!fleet.agents[2].root.join(PUSHED_BUNDLE).exists());

    fleet.agents[1].restart();
    let (ok, out) = erel(&fleet.pki, &["certs", "rotate"], &cluster);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    every_agent_answers(&fleet, "").await;
    assert_eq!(fleet.release_pids(RELEASE), pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_run_keeps_every_host_reachable_and_a_second_run_finishes() {
    let (fleet, cluster) = running_fleet("grp", &["ga", "gb"]).await;
    let pids = fleet.release_pids(RELEASE);

    let (ok, dry) = erel(
        &fleet.pki,
        &["certs", "rotate", "--group", "ga", "--dry-run"],
        &cluster,
    );
    assert!(ok, "{dry}");
    assert!(dry.contains("1. grp-1@"), "{dry}");
    assert!(!dry.contains("grp-2"), "{dry}");
    assert!(dry.contains("the final round waits"), "{dry}");

    let (ok, out) = erel(&fleet.pki, &["certs", "rotate", "--group", "ga"], &cluster);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    assert!(!out.contains("rotation done"), "{out}");
    assert!(out.contains("still on the old CA alone: grp-2"), "{out}");
    assert!(!fleet.pki.master.previous().path().exists(), "{out}");
    assert!(fleet.agents[0].root.join(PUSHED_BUNDLE).exists());
    assert!(!fleet.agents[1].root.join(PUSHED_BUNDLE).exists());
    every_agent_answers(&fleet, &out).await;

    let (ok, out) = erel(&fleet.pki, &["certs", "rotate", "--group", "gb"], &cluster);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    assert!(
        out.contains("grp-1: already holds the overlap bundle"),
        "{out}"
    );
    assert!(out.contains("rotation done"), "{out}");
    assert!(out.contains("other masters: copy"), "{out}");
    assert!(!fleet.pki.master.next().path().exists());
    assert!(!fleet.pki.master.previous().path().exists());
    every_agent_answers(&fleet, &out).await;
    assert_eq!(fleet.release_pids(RELEASE), pids);
}

/// A host started from a bundle directory of its own (as a kit installs it) keeps the
/// rotated credentials across a refused push and a restart: the agent serves its
/// confirmed copy, not the `--certs` directory the master no longer trusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_a_refused_push_and_a_restart_the_new_master_still_gets_in() {
    let pki = Pki::new();
    let id = "keep-1";
    let own = pki.dir.path().join("own-bundle");
    std::fs::create_dir(&own).expect("mkdir");
    for entry in std::fs::read_dir(pki.bundle(id)).expect("bundle") {
        let from = entry.expect("entry").path();
        std::fs::copy(&from, own.join(from.file_name().expect("name"))).expect("copy");
    }
    let mut agent = AgentProc::start_with_bundle(own, id);
    answers(pki.client_config(), &agent)
        .await
        .expect("first contact");
    let cluster = pki.dir.path().join("cluster.toml");
    let text = format!(
        "revision = 1\n[[host]]\nid = \"{id}\"\naddr = \"{}\"\ngroup = \"web\"\n\
         [group.web]\nrelease = \"{RELEASE}\"\nversion = \"0.1.0\"\narchive = \"{RELEASE}-0.1.0.tar.gz\"\n",
        agent.addr
    );
    std::fs::write(&cluster, text).expect("cluster file");
    let (ok, out) = erel(&pki, &["certs", "rotate"], &cluster);
    assert!(ok, "{out}\n{}", agent.log());

    let other = PushedBundle::from_dir(&pki.bundle("keep-2")).expect("bundle");
    push(&pki, &agent, &other).await;
    answers(pki.client_config(), &agent)
        .await
        .unwrap_or_else(|e| panic!("the confirmed bundle serves: {e}\n{}", agent.log()));
    let refused = agent.root.join(format!("{PUSHED_BUNDLE}.refused"));
    assert!(refused.is_file(), "{}", agent.log());

    agent.restart();
    let ping = pki.erel_at("ping", &agent).output().expect("run erel ping");
    assert!(
        ping.status.success(),
        "{}\n{}",
        output_text(&ping),
        agent.log()
    );
}

/// Every agent of `fleet` answers a new connection made with the master's current
/// credentials; a failure names the agent, `context` (the command's output) and its log.
async fn every_agent_answers(fleet: &Fleet, context: &str) {
    for agent in &fleet.agents {
        answers(fleet.pki.client_config(), agent)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{context}\n{}", agent.id, agent.log()));
    }
}

/// A master certificate directory elsewhere (another master of the cluster) holding
/// `files` of `from`.
fn other_master(pki: &Pki, name: &str, from: &MasterDir) -> MasterDir {
    let dir = pki.dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for file in ["ca.pem", "master.pem", "master.key", "crl.pem"] {
        std::fs::copy(from.path().join(file), dir.join(file)).expect("copy");
    }
    MasterDir::new(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_old_ca_stops_before_the_switch_and_another_master_with_the_next_credentials_stays_in()
{
    let (fleet, cluster) = running_fleet("keep", &["web"; 2]).await;
    let pids = fleet.release_pids(RELEASE);
    let unchanged = other_master(&fleet.pki, "unchanged-master", &fleet.pki.master);

    let (ok, out) = erel(&fleet.pki, &["certs", "rotate", "--keep-old-ca"], &cluster);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    assert!(out.contains("the old CA is kept (--keep-old-ca)"), "{out}");
    assert!(!out.contains("rotation done"), "{out}");
    let next = fleet.pki.master.next();
    assert!(next.path().join("master.pem").is_file(), "{out}");
    assert!(
        !fleet.pki.master.previous().path().exists(),
        "no switch: {out}"
    );
    every_agent_answers(&fleet, &out).await;

    // A master still on the old CA alone no longer trusts the hosts' new certificates.
    for agent in &fleet.agents {
        let tls = unchanged.client_config().expect("client config");
        let refused = answers(tls, agent).await.expect_err("old CA alone");
        assert!(
            refused.contains("is not signed by the cluster CA (unknown CA)"),
            "{refused}"
        );
    }
    // Given the next credentials, another master gets in now and after the final round.
    let other = other_master(&fleet.pki, "other-master", &next);
    for agent in &fleet.agents {
        let tls = other.client_config().expect("client config");
        answers(tls, agent)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", agent.id, agent.log()));
    }

    let (ok, out) = erel(&fleet.pki, &["certs", "rotate"], &cluster);
    assert!(ok, "{out}\n{}", fleet.agent_logs());
    assert!(out.contains("rotation done"), "{out}");
    every_agent_answers(&fleet, &out).await;
    for agent in &fleet.agents {
        let tls = other.client_config().expect("client config");
        answers(tls, agent)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", agent.id, agent.log()));
        let tls = kept_master_config(&fleet.pki, unchanged.path());
        let refused = answers(tls, agent)
            .await
            .expect_err("old master certificate");
        assert!(
            refused.contains("the agent refused our certificate: unknown CA"),
            "{refused}"
        );
    }
    assert_eq!(fleet.release_pids(RELEASE), pids);
}
