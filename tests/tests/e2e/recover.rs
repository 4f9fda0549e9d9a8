//! Two operator procedures, run as the README gives them: a node replaced cold (a new
//! machine for the same host id, from a new kit, the old certificate revoked), and a
//! host whose agent lost its root (its state) while the host and its bundle survived.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helper::fleet::{beat, Fleet};
use crate::helper::release::beat_release;
use crate::helper::{
    free_port, output_text, wait_until_blocking, AgentProc, Pki, AGENT_BIN, PATIENCE,
};
use crate::kit::{certs_host_kit, install, InstalledAgent};

/// The release every test here deploys, with a TCP health check on its port.
const GROUP: &str =
    "[group.web]\nrelease = \"beat\"\nversion = \"1\"\narchive = \"releases/beat-1.tar.gz\"\n\
     stop_grace_secs = 5\nhealth = { tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 15 }\n";

/// Writes `site/releases/beat-1.tar.gz` and `site/cluster.toml` (revision 1, `hosts`, then
/// [`GROUP`]) under `dir`; the cluster file's path.
fn write_site(dir: &Path, hosts: &str) -> PathBuf {
    let site = dir.join("site");
    let releases = site.join("releases");
    std::fs::create_dir_all(&releases).expect("mkdir");
    let archive = beat_release(&releases, "beat", "1");
    assert_eq!(archive, releases.join("beat-1.tar.gz"));
    let cluster = site.join("cluster.toml");
    std::fs::write(&cluster, format!("revision = 1\n{hosts}{GROUP}")).expect("write cluster");
    cluster
}

/// `erel deploy --cluster CLUSTER`: (success, stdout + stderr).
fn deploy(pki: &Pki, cluster: &Path) -> (bool, String) {
    let out = pki
        .erel()
        .arg("deploy")
        .arg("--cluster")
        .arg(cluster)
        .output()
        .expect("run erel deploy");
    (out.status.success(), output_text(&out))
}

/// Unpacks `kit` in `dir/unpacked`, runs its `install.sh --prefix dir/host`, starts the
/// agent with the command it printed and waits until `host` (`ID@ADDR`) answers a ping.
fn install_and_start(pki: &Pki, kit: &Path, dir: &Path, host: &str) -> InstalledAgent {
    let unpacked = dir.join("unpacked");
    std::fs::create_dir_all(&unpacked).expect("mkdir");
    let out = Command::new("tar")
        .arg("xzf")
        .arg(kit)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar: {}", output_text(&out));
    let id = host.split('@').next().expect("id");
    let prefix = dir.join("host");
    let lines = install(&unpacked.join(format!("erel-host-{id}")), &prefix);
    let start = lines.last().expect("the start command");
    InstalledAgent::start(pki, start, &prefix.join("var/lib/erel"), host)
}

/// Copies the files of the bundle directory `from` into a new directory `to`.
pub(crate) fn copy_bundle(from: &Path, to: &Path) {
    std::fs::create_dir(to).expect("mkdir");
    for name in ["ca.pem", "host.pem", "host.key", "crl.pem"] {
        std::fs::copy(from.join(name), to.join(name)).expect("copy bundle file");
    }
}

#[test]
fn a_node_replaced_cold_gets_its_release_from_the_next_deploy_and_its_old_certificate_is_refused() {
    let pki = Pki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = std::fs::canonicalize(work.path()).expect("canonical");
    let listen = format!("127.0.0.1:{}", free_port());
    let host = format!("web-1@{listen}");
    let beat_port = free_port();
    let cluster = write_site(
        &work_dir,
        &format!(
            "[[host]]\nid = \"web-1\"\naddr = \"{listen}\"\ngroup = \"web\"\n\
             env = {{ BEAT_PORT = \"{beat_port}\" }}\n"
        ),
    );
    let kit_flags = ["--listen", &listen, "--agent", AGENT_BIN];
    let serving = || beat(beat_port) == "beat 1 web-1";

    let kit = work_dir.join("web-1.tar.gz");
    let out = certs_host_kit(&pki, "web-1", &kit, &kit_flags);
    assert!(out.status.success(), "certs host: {}", output_text(&out));
    let old_machine = work_dir.join("old");
    let old = install_and_start(&pki, &kit, &old_machine, &host);
    let (ok, text) = deploy(&pki, &cluster);
    assert!(ok, "deploy: {text}\n{}", old.process.log());
    assert!(
        wait_until_blocking(PATIENCE, serving),
        "{}",
        beat(beat_port)
    );

    // The old machine is gone, agent, release and disk; its bundle may be in the wrong
    // hands.
    let stolen = work_dir.join("stolen");
    copy_bundle(&pki.master.host_dir("web-1"), &stolen);
    drop(old);
    std::fs::remove_dir_all(&old_machine).expect("remove the old machine");
    assert!(
        wait_until_blocking(PATIENCE, || beat(beat_port).is_empty()),
        "{}",
        beat(beat_port)
    );

    // Revoke first: `certs revoke` names the host's current certificate.
    let mut revoke = pki.erel();
    let out = revoke.args(["certs", "revoke", "web-1"]).output();
    let out = out.expect("run certs revoke");
    assert!(out.status.success(), "certs revoke: {}", output_text(&out));
    let out = certs_host_kit(
        &pki,
        "web-1",
        &kit,
        &[&kit_flags[..], &["--force"]].concat(),
    );
    assert!(out.status.success(), "--force: {}", output_text(&out));
    let issued = std::fs::read(pki.master.host_dir("web-1").join("host.pem")).expect("pem");
    assert_ne!(issued, std::fs::read(stolen.join("host.pem")).expect("pem"));

    let new = install_and_start(&pki, &kit, &work_dir.join("new"), &host);
    let (ok, text) = deploy(&pki, &cluster);
    assert!(ok, "deploy: {text}\n{}", new.process.log());
    assert!(text.contains("switched from nothing"), "{text}");
    assert!(
        wait_until_blocking(PATIENCE, serving),
        "{}",
        beat(beat_port)
    );
    assert!(new.root.join("releases/beat/1").is_dir());
    drop(new);

    // An agent serving with the old bundle is refused by the master.
    let impostor = AgentProc::start_with_bundle(stolen, "web-1");
    let out = pki
        .erel()
        .args(["ping", &impostor.host().to_string()])
        .output()
        .expect("run ping");
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("revoked"), "{text}");
}

#[test]
fn a_host_whose_agent_lost_its_root_gets_its_release_from_the_next_deploy() {
    let mut fleet = Fleet::new("lost", &["web"]);
    let cluster = write_site(fleet.dir.path(), &fleet.hosts_toml("BEAT_PORT"));
    let (ok, text) = deploy(&fleet.pki, &cluster);
    assert!(ok, "deploy: {text}\n{}", fleet.agent_logs());
    fleet.wait_all_run("1", PATIENCE, "the first deploy", || fleet.agent_logs());
    let before = fleet.release_pids("beat").remove(0);
    assert!(!before.is_empty());

    // The root is lost; the release's processes from before still run, unknown to the
    // agent.
    fleet.agents[0].restart_on_wiped_root();
    let mut status = fleet.pki.erel();
    status.args(["status", "--json", "--cluster"]).arg(&cluster);
    let out = status.output().expect("run erel status");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows[0]["host"], "lost-1", "{rows}");
    assert!(rows[0]["running_version"].is_null(), "{rows}");
    assert_eq!(rows[0]["versions"], serde_json::json!([]), "{rows}");
    assert_eq!(rows[0]["converged"], false, "{rows}");
    fleet.expect_beats("1");

    // The next deploy pushes, unpacks and starts the release: its start stops what still
    // runs in the release's cgroup first (it is not adopted: the agent has no record of
    // it), so never two copies.
    let (ok, text) = deploy(&fleet.pki, &cluster);
    assert!(ok, "deploy: {text}\n{}", fleet.agent_logs());
    assert!(text.contains("switched from nothing"), "{text}");
    fleet.wait_all_run("1", PATIENCE, "the deploy after the wipe", || {
        fleet.agent_logs()
    });
    let after = fleet.release_pids("beat").remove(0);
    assert!(
        !after.is_empty() && after.iter().all(|pid| !before.contains(pid)),
        "{before:?} then {after:?}"
    );
    assert!(fleet.agents[0].root.join("releases/beat/1").is_dir());
}
