//! An operator's own PKI, made with the `openssl` command line: a root CA, an
//! intermediate CA, a master certificate with an RSA key in PKCS#1 PEM, a host
//! certificate with an EC key in SEC1 PEM, and the intermediate's CRL in crl.pem.
//! Real agents run on such bundles and real `erel` commands reach them. These tests
//! need `openssl` on PATH (scripts/test.sh installs it) and fail without it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use erel_certs::layout;
use erel_certs::testing::openssl::{concat, KeyKind, Leaf, Pki};

use crate::helper::AgentCommands;
use crate::helper::{
    exit_within, holds_all, output_text, AgentProc, AGENT_BIN, MASTER_BIN, PATIENCE,
};

/// How long an agent may take to refuse a bundle and exit: the same bound the
/// helper gives an agent to start.
const AGENT_START_LIMIT: Duration = Duration::from_secs(30);

/// The issue's PKI: root -> intermediate -> host (EC, SEC1) and master (RSA, PKCS#1).
struct Site {
    tmp: tempfile::TempDir,
    pki: Pki,
    host: Leaf,
    master: Leaf,
}

impl Site {
    fn new(host_id: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(&tmp.path().join("pki"), "Example").expect("openssl PKI");
        let host = pki
            .issue_host(&pki.intermediate, host_id, KeyKind::EcP256Sec1)
            .expect("host certificate");
        let master = pki
            .issue_master(&pki.intermediate, "master", KeyKind::RsaPkcs1)
            .expect("master certificate");
        Site {
            tmp,
            pki,
            host,
            master,
        }
    }

    /// An agent bundle: ca.pem the root, host.pem the leaf then the intermediate,
    /// host.key, and `crls` as crl.pem.
    fn bundle(&self, name: &str, crls: &[String]) -> PathBuf {
        let dir = self.tmp.path().join(name);
        self.write(&dir, &self.host, layout::HOST_PEM, layout::HOST_KEY, crls);
        dir
    }

    /// A master certificate directory laid out the same way (no ca.key: the CA is
    /// the operator's).
    fn certs(&self, name: &str, crls: &[String]) -> PathBuf {
        let dir = self.tmp.path().join(name);
        self.write(
            &dir,
            &self.master,
            layout::MASTER_PEM,
            layout::MASTER_KEY,
            crls,
        );
        dir
    }

    fn write(&self, dir: &Path, leaf: &Leaf, cert: &str, key: &str, crls: &[String]) {
        fs::create_dir_all(dir).expect("mkdir");
        let ca = concat(&[&self.pki.root.cert]).expect("ca");
        fs::write(dir.join(layout::CA_PEM), ca).expect("ca.pem");
        let chain = concat(&[&leaf.cert, &self.pki.intermediate.cert]).expect("chain");
        fs::write(dir.join(cert), chain).expect("cert");
        fs::copy(&leaf.key, dir.join(key)).expect("key");
        fs::write(dir.join(layout::CRL_PEM), crls.concat()).expect("crl.pem");
    }

    fn intermediate_crl(&self) -> String {
        self.pki
            .crl(&self.pki.intermediate)
            .expect("intermediate crl")
    }
}

/// `erel --certs CERTS ping HOST [args]`.
fn erel_ping(certs: &Path, agent: &AgentProc, args: &[&str]) -> Output {
    Command::new(MASTER_BIN)
        .arg("--certs")
        .arg(certs)
        .arg("ping")
        .arg(agent.host().to_string())
        .args(args)
        .output()
        .expect("run erel ping")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_an_operators_own_pki_answers_the_master() {
    let site = Site::new("web-1");
    let crl = site.intermediate_crl();
    let agent =
        AgentProc::start_with_bundle(site.bundle("bundle", std::slice::from_ref(&crl)), "web-1");
    let certs = site.certs("certs", &[crl]);

    let out = erel_ping(&certs, &agent, &["--json"]);
    assert!(
        out.status.success(),
        "{}\nagent log:\n{}",
        output_text(&out),
        agent.log()
    );
    let pong: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        pong.to_string().contains("\"web-1\""),
        "the agent answers as web-1: {pong}"
    );

    // The library client too, and the agent logs the master's certificate name.
    let config = erel_certs::MasterDir::new(&certs)
        .client_config()
        .expect("client config");
    let mut client = erel_master::client::Connector::new(config, "pki-test")
        .connect(&agent.host())
        .await
        .expect("connect");
    let pong = client.ping().await.expect("ping");
    assert_eq!(pong.host_id, "web-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_revoked_by_the_intermediate_is_refused_by_the_master() {
    let site = Site::new("web-1");
    let agent =
        AgentProc::start_with_bundle(site.bundle("bundle", &[site.intermediate_crl()]), "web-1");
    site.pki
        .revoke(&site.pki.intermediate, &site.host)
        .expect("openssl ca -revoke");
    let certs = site.certs("certs", &[site.intermediate_crl()]);

    let out = erel_ping(&certs, &agent, &[]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("revoked"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_the_intermediates_crl_names_the_certificate_and_its_issuer() {
    let site = Site::new("web-1");
    let agent =
        AgentProc::start_with_bundle(site.bundle("bundle", &[site.intermediate_crl()]), "web-1");
    let root_crl = site.pki.crl(&site.pki.root).expect("root crl");
    let certs = site.certs("certs", &[root_crl]);

    let out = erel_ping(&certs, &agent, &[]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let said = output_text(&out);
    for part in [
        "revocation status",
        "CN=web-1",
        "no CRL from its issuer \"O=Example, CN=Example Intermediate CA\"",
    ] {
        assert!(said.contains(part), "{said:?} should contain {part:?}");
    }
}

#[test]
fn an_agent_refuses_to_start_on_a_crl_from_a_foreign_ca() {
    let site = Site::new("web-1");
    let foreign = Pki::new(&site.tmp.path().join("foreign"), "Foreign").expect("foreign PKI");
    let foreign_crl = foreign.crl(&foreign.intermediate).expect("foreign crl");
    let bundle = site.bundle("bundle", &[foreign_crl]);
    let root = site.tmp.path().join("root");
    fs::create_dir(&root).expect("root");

    let mut child = Command::new(AGENT_BIN)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--root")
        .arg(&root)
        .arg("--certs")
        .arg(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn erel-boot");
    let Some(status) = exit_within(&mut child, AGENT_START_LIMIT) else {
        let _ = child.kill();
        panic!("the agent did not refuse its bundle within {AGENT_START_LIMIT:?}");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!status.success(), "{stderr}");
    for part in [
        "crl.pem",
        "Foreign Intermediate CA",
        "not a CA of this bundle",
    ] {
        assert!(stderr.contains(part), "{stderr:?} should contain {part:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_the_intermediates_crl_names_the_masters_certificate_and_its_issuer() {
    let site = Site::new("web-1");
    let root_crl = site.pki.crl(&site.pki.root).expect("root crl");
    let agent = AgentProc::start_with_bundle(site.bundle("bundle", &[root_crl]), "web-1");
    let certs = site.certs("certs", &[site.intermediate_crl()]);

    let out = erel_ping(&certs, &agent, &[]);
    assert!(!out.status.success(), "{}", output_text(&out));
    let said = output_text(&out);
    assert!(
        said.contains("agent refused our certificate") && said.contains("crl.pem"),
        "{said}"
    );
    // The agent's log line says which certificate and which issuer.
    let log = agent
        .log_showing("Example Intermediate CA", AGENT_START_LIMIT)
        .await;
    assert!(
        holds_all(
            &log,
            &[
                "master's certificate \"O=Example, CN=erel-master\"",
                "agent's crl.pem holds no CRL from its issuer"
            ]
        ),
        "{log}"
    );
}

/// A replaced bundle is validated as a whole before new connections use it: a
/// host.pem that lost its intermediate is refused (the log names the issuer it
/// lacks) and the agent goes on with the bundle it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_its_bundle_when_a_replacement_lacks_the_intermediate() {
    let site = Site::new("web-1");
    let crl = site.intermediate_crl();
    let bundle = site.bundle("bundle", std::slice::from_ref(&crl));
    let agent = AgentProc::start_with_bundle(bundle.clone(), "web-1");
    let certs = site.certs("certs", &[crl]);
    let out = erel_ping(&certs, &agent, &[]);
    assert!(out.status.success(), "{}", output_text(&out));

    // Replace host.pem, by rename as a copy tool would, with the leaf alone.
    let staged = bundle.join(".host.pem.new");
    fs::copy(&site.host.cert, &staged).expect("stage");
    fs::rename(&staged, bundle.join(layout::HOST_PEM)).expect("replace host.pem");

    let out = erel_ping(&certs, &agent, &[]);
    assert!(
        out.status.success(),
        "the previous bundle still serves: {}\n{}",
        output_text(&out),
        agent.log()
    );
    let log = agent
        .log_showing("keeping the previous one", AGENT_START_LIMIT)
        .await;
    assert!(
        log.contains(
            "is issued by \"O=Example, CN=Example Intermediate CA\", which is neither in host.pem"
        ),
        "{log}"
    );
}

/// A CRL past its nextUpdate is still used (revocation is not enforced by date, so a
/// late CRL job cannot lock the masters out) but never silently: the agent says so
/// when it loads it, naming the CA and the date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_crl_is_used_and_warned_about() {
    let site = Site::new("web-1");
    let expired = site
        .pki
        .expired_crl(&site.pki.intermediate)
        .expect("expired crl");
    let agent = AgentProc::start_with_bundle(site.bundle("bundle", &[expired]), "web-1");
    let certs = site.certs("certs", &[site.intermediate_crl()]);
    let out = erel_ping(&certs, &agent, &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    let logged = ["past its nextUpdate", "Example Intermediate CA", "2020"];
    agent.log_showing_all(&logged, PATIENCE);
}
