//! `erel demo`: the whole story on one machine, with nothing installed beyond this
//! program. A temporary CA; agents on loopback, run in this process with the erel-boot
//! library; a release built on the spot (this very program, copied into the tarball,
//! serving `beat VERSION HOST` through the hidden `demo-beat` command); deploy v1,
//! status, a node-at-a-time roll to v2, a v3 that fails its health check and is rolled
//! back on the canary while the other hosts stay on v2, final status, clean up.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use erel_boot::{Config, Limits, Supervision};
use erel_certs::MasterDir;
use erel_proto::Stopped;
use tokio_util::sync::CancellationToken;

use super::deploy::event_line;
use super::status::{collect, status_table};
use crate::client::{stop_request, Connector, HostSession};
use crate::cluster::Plan;
use crate::error::{Error, Result, ResultExt as _};
use crate::release::BeatRelease;
use crate::rollout::{self, HostFailure, HostOutcome, RolloutOptions, RolloutReport};
use crate::HostAddr;

/// The demo's release name.
const RELEASE: &str = "beat";

/// `erel demo`.
#[derive(Debug, Args)]
pub(super) struct DemoArgs {
    /// How many agents to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=20))]
    hosts: u16,
}

/// An agent running inside this process.
struct LocalAgent {
    id: String,
    addr: SocketAddr,
    beat_port: u16,
    /// Holds `beat_port` for this agent's beat while the demo runs: bound with
    /// `SO_REUSEPORT` and never listening, so the beat (which binds the same way) can
    /// listen there and nobody else can take the port.
    _beat_port_held: tokio::net::TcpSocket,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::result::Result<(), erel_boot::Error>>,
}

/// Runs the demo; exit 0 only when every step went as told.
pub(super) async fn demo(args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("erel-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let dir = work.path().to_path_buf();
    step(&format!("temporary directory {}", dir.display()));

    let certs = MasterDir::new(dir.join("certs"));
    certs.init("demo").context("creating the demo CA")?;
    step("a new cluster CA and master certificate");

    let mut agents = Vec::new();
    let outcome = async {
        for index in 1..=args.hosts {
            let id = format!("demo-{index}");
            let agent = start_agent(&certs, &dir, &id).await?;
            agents.push(agent);
        }
        for agent in &agents {
            println!("    agent {} listening on {}", agent.id, agent.addr);
        }
        step(&format!(
            "{} agents on loopback, each with its own root",
            agents.len()
        ));
        script(&dir, &certs, &agents).await
    }
    .await;

    // Clean up whatever happened: stop the releases, the agents, remove the files.
    for agent in &agents {
        stop_release(&certs, agent).await;
        agent.shutdown.cancel();
    }
    for agent in agents {
        if let Ok(Err(e)) = agent.server.await {
            println!("    agent {} failed: {e}", agent.id);
        }
    }
    drop(work);
    step(&format!(
        "cleaned up: releases stopped, agents shut down, {} removed",
        dir.display()
    ));

    let ok = outcome?;
    println!("\ndemo finished in {:.1}s", started.elapsed().as_secs_f64());
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The deploys and checks. `Ok(false)` when something did not go as the story says.
async fn script(dir: &Path, certs: &MasterDir, agents: &[LocalAgent]) -> Result<bool> {
    let exe = std::env::current_exe().context("finding this program")?;
    let releases = dir.join("releases");
    std::fs::create_dir_all(&releases).map_err(|e| Error::local(&releases, e))?;
    let build = {
        let releases = releases.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<PathBuf>> {
            Ok(vec![
                beat_release(&exe, &releases, "0.1.0", None)?,
                beat_release(&exe, &releases, "0.2.0", None)?,
                beat_release(&exe, &releases, "0.3.0", Some("exit"))?,
            ])
        })
    };
    let tarballs = build.await.context("building the releases")??;
    step("built releases beat 0.1.0, 0.2.0 and 0.3.0 (0.3.0 is broken on purpose)");
    for tarball in &tarballs {
        let size = std::fs::metadata(tarball).map(|m| m.len()).unwrap_or(0);
        println!(
            "    {} ({:.1} MiB)",
            tarball.display(),
            size as f64 / 1048576.0
        );
    }

    let connector = Connector::new(certs.client_config()?, "erel-demo");
    let cluster = dir.join("cluster.toml");
    let mut ok = true;

    // v1
    let plan = write_cluster(&cluster, 1, "0.1.0", agents)?;
    step("cluster.toml, revision 1: group demo runs beat 0.1.0");
    let text = std::fs::read_to_string(&cluster).map_err(|e| Error::local(&cluster, e))?;
    print!("{}", indent_block(&text));
    step("deploy beat 0.1.0");
    let report = deploy(&plan, &connector).await?;
    ok &= expect(report.converged(), "every host runs 0.1.0");
    step("status");
    print!("{}", status_table(&plan, &collect(&plan, &connector).await));
    ok &= expect(
        beats(agents, "0.1.0").await,
        "every host answers `beat 0.1.0`",
    );

    // v2
    let plan = write_cluster(&cluster, 2, "0.2.0", agents)?;
    step("revision 2: roll to beat 0.2.0, one node at a time (max_in_flight = 1)");
    let report = deploy(&plan, &connector).await?;
    ok &= expect(
        report.converged() && report.switched() == agents.len(),
        "every host switched to 0.2.0",
    );
    ok &= expect(
        beats(agents, "0.2.0").await,
        "every host answers `beat 0.2.0`",
    );

    step("deploy revision 2 again: nothing to do");
    let report = deploy(&plan, &connector).await?;
    ok &= expect(
        report.converged() && report.switched() == 0,
        "a repeated deploy changes nothing",
    );

    // v3, broken
    let plan = write_cluster(&cluster, 3, "0.3.0", agents)?;
    step("revision 3: beat 0.3.0, which dies at start: the canary fails its health check");
    let report = deploy(&plan, &connector).await?;
    let canary_rolled_back = report.groups.first().is_some_and(|group| {
        group.halted.is_some()
            && matches!(
                group.hosts.first().map(|h| &h.outcome),
                Some(HostOutcome::Failed(HostFailure {
                    rolled_back: true,
                    ..
                }))
            )
            && group.hosts[1..]
                .iter()
                .all(|h| h.outcome == HostOutcome::Untouched)
    });
    ok &= expect(
        canary_rolled_back,
        "the canary was rolled back to 0.2.0 and the group halted, no other host touched",
    );

    step("final status");
    print!("{}", status_table(&plan, &collect(&plan, &connector).await));
    ok &= expect(
        beats(agents, "0.2.0").await,
        "every host still answers `beat 0.2.0`",
    );
    Ok(ok)
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn expect(condition: bool, what: &str) -> bool {
    if condition {
        println!("    ok: {what}");
    } else {
        println!("    NOT AS EXPECTED: {what}");
    }
    condition
}

fn indent_block(text: &str) -> String {
    text.lines().map(|l| format!("    | {l}\n")).collect()
}

/// Runs one rollout, printing its events as they happen.
async fn deploy(plan: &Plan, connector: &Connector) -> Result<RolloutReport> {
    let start = Instant::now();
    let options = RolloutOptions {
        poll_interval: Duration::from_millis(100),
        ..RolloutOptions::default()
    };
    let print = |event: &_| {
        if let Some(line) = event_line(event) {
            println!("    [{:>5.2}s] {line}", start.elapsed().as_secs_f64());
        }
    };
    rollout::run(plan, connector, &options, print).await
}

/// Asks every host's release what it runs; true when all say `version`.
async fn beats(agents: &[LocalAgent], version: &str) -> bool {
    let mut all = true;
    for agent in agents {
        let answer = tokio::task::spawn_blocking({
            let port = agent.beat_port;
            move || -> std::io::Result<String> {
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut text = String::new();
                stream.read_to_string(&mut text)?;
                Ok(text.trim().to_string())
            }
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match answer {
            Ok(text) => {
                println!("    {}:{} says: {text}", agent.id, agent.beat_port);
                all &= text == format!("beat {version} {}", agent.id);
            }
            Err(e) => {
                println!("    {}:{} does not answer: {e}", agent.id, agent.beat_port);
                all = false;
            }
        }
    }
    all
}

/// Starts an agent for `id` in this process, on 127.0.0.1 with a fresh root.
async fn start_agent(certs: &MasterDir, dir: &Path, id: &str) -> Result<LocalAgent> {
    let what = || format!("starting agent {id}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .with_context(what)?;
    let addr = listener.local_addr().with_context(what)?;
    let loopback = std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST);
    let config = Config {
        listen: addr,
        root: dir.join("agents").join(id),
        certs: certs.issue_host(id, &[loopback], &[]).with_context(what)?,
        limits: Limits::default(),
        supervision: Supervision {
            restart_backoff: Duration::from_millis(100),
            restart_backoff_max: Duration::from_millis(400),
            stable_after: Duration::from_millis(1500),
            crash_loop_after: 3,
            ..Supervision::default()
        },
        remove_cgroups_on_exit: true,
    };
    let shutdown = CancellationToken::new();
    let (held, beat_port) = hold_port().with_context(what)?;
    let server = tokio::spawn(erel_boot::run(config, listener, shutdown.clone()));
    Ok(LocalAgent {
        id: id.to_string(),
        addr,
        beat_port,
        _beat_port_held: held,
        shutdown,
        server,
    })
}

/// Stops the demo's release on `agent`, as any master does; what fails is left to the
/// agent's shutdown and the removal of the temporary directory.
async fn stop_release(certs: &MasterDir, agent: &LocalAgent) {
    let host = HostAddr {
        id: agent.id.clone(),
        addr: agent.addr.to_string(),
    };
    let Ok(tls) = certs.client_config() else {
        return;
    };
    let mut session = HostSession::new(host, Connector::new(tls, "erel-demo"));
    let request = stop_request(RELEASE, Duration::from_secs(5));
    let _ = session.command::<Stopped>(request).await;
}

/// A port on 127.0.0.1 for a beat, and the socket that holds it (see
/// [`LocalAgent`]): bound with `SO_REUSEPORT`, not listening.
fn hold_port() -> std::io::Result<(tokio::net::TcpSocket, u16)> {
    let socket = reusable_socket()?;
    socket.bind((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let port = socket.local_addr()?.port();
    Ok((socket, port))
}

/// A TCP socket that may share its port with others of this user that say so too.
fn reusable_socket() -> std::io::Result<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    Ok(socket)
}

/// This program as the beat release's server, running its hidden `demo-beat` command.
fn beat_release(exe: &Path, dir: &Path, version: &str, fail: Option<&str>) -> Result<PathBuf> {
    let release = BeatRelease {
        name: RELEASE,
        version,
        server: exe,
        server_args: &["demo-beat"],
        fail,
    };
    release.write(dir)
}

/// Writes the cluster file for `version` and loads it.
fn write_cluster(path: &Path, revision: u64, version: &str, agents: &[LocalAgent]) -> Result<Plan> {
    let mut text = format!("revision = {revision}\n");
    for agent in agents {
        text.push_str(&format!(
            "\n[[host]]\nid = \"{}\"\naddr = \"{}\"\ngroup = \"demo\"\nenv = {{ BEAT_PORT = \"{}\" }}\n",
            agent.id, agent.addr, agent.beat_port
        ));
    }
    text.push_str(&format!(
        "\n[group.demo]\nrelease = \"{RELEASE}\"\nversion = \"{version}\"\n\
         archive = \"releases/{RELEASE}-{version}.tar.gz\"\nargv = [\"bin/beat\"]\n\
         max_in_flight = 1\ncanaries = 1\nstop_grace_secs = 5\n\
         health = {{ tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 10 }}\n"
    ));
    std::fs::write(path, text).map_err(|e| Error::local(path, e))?;
    Plan::load(path)
}

/// `erel demo-beat`: serves `beat VERSION HOST` on 127.0.0.1:$BEAT_PORT until killed.
/// `BEAT_FAIL=exit` exits at once with code 3; `BEAT_FAIL=silent` runs without listening.
pub(super) async fn beat() -> Result<ExitCode> {
    let version = std::env::var("EREL_VERSION").unwrap_or_else(|_| "unknown".into());
    let host = std::env::var("EREL_HOST_ID").unwrap_or_else(|_| "unknown".into());
    match std::env::var("BEAT_FAIL").as_deref() {
        Ok("exit") => {
            eprintln!("beat {version} on {host}: failing on purpose (BEAT_FAIL=exit)");
            return Ok(ExitCode::from(3));
        }
        Ok("silent") => {
            println!("beat {version} on {host}: running without listening (BEAT_FAIL=silent)");
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    let port: u16 = std::env::var("BEAT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // The demo holds the port with SO_REUSEPORT while it runs; binding the same way
    // shares it with that holder, which never listens.
    let listener = reusable_socket()
        .and_then(|socket| {
            socket.bind((std::net::Ipv4Addr::LOCALHOST, port).into())?;
            socket.listen(128)
        })
        .with_context(|| format!("beat {version}: cannot listen on 127.0.0.1:{port}"))?;
    let local = port_of(&listener)?;
    println!("beat {version} on {host} listening on {local}");
    loop {
        let (mut stream, _) = listener.accept().await.context("accepting")?;
        let line = format!("beat {version} {host}\n");
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stream.write_all(line.as_bytes()).await;
        });
    }
}

fn port_of(listener: &tokio::net::TcpListener) -> Result<u16> {
    Ok(listener.local_addr().context("the beat's address")?.port())
}
