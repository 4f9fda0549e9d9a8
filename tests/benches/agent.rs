//! Figures for the boot agent: stripped binary size, idle RSS, peak RSS while receiving
//! a 1 GiB file, and `WriteFile` throughput of 256 MiB on loopback, beside `scp` over
//! the same loopback when an `sshd` is installed.
//!
//! Run with `cargo bench -p erel-tests --bench agent`. It prints one line per figure.

mod common;
#[path = "../tests/e2e/helper/mod.rs"]
mod helper;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{make_file, MIB};
use erel_master::client::WriteSource;
use helper::{status_kib, AgentCommands, AgentProc, Pki, AGENT_BIN};

/// The pause before reading the idle RSS, after start-up and after the first ping. It
/// waits for nothing the agent reports (no setting governs it): it gives the agent's
/// start-up and first-connection work time to end and its memory to be handed back, so
/// the figure is the idle one. A figure, not an assertion: a fixed pause serves.
const SETTLE: Duration = Duration::from_millis(500);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let work = tempfile::tempdir().expect("tempdir");
    println!("# erel-boot figures (this machine: {} cores)", cores());
    let size = std::fs::metadata(AGENT_BIN).expect("agent binary").len();
    println!(
        "erel-boot binary, stripped (bench profile = release): {:.1} MiB",
        size as f64 / MIB as f64
    );

    let pki = Pki::new();
    let agent = AgentProc::start(&pki, "bench-1", &[]);
    let pid = agent.pid().expect("agent pid");
    // Let it settle, then touch it once so the TLS stack is warmed up.
    tokio::time::sleep(SETTLE).await;
    let mut client = pki.connect(&agent).await;
    client.ping().await.expect("ping");
    tokio::time::sleep(SETTLE).await;
    println!(
        "erel-boot idle RSS: {:.1} MiB",
        status_kib(pid, "VmRSS") as f64 / 1024.0
    );

    // 256 MiB throughput, digest known in advance and computed while sending.
    let file_256 = work.path().join("256m.bin");
    make_file(&file_256, 256 * MIB);
    let known = WriteSource {
        path: file_256.clone(),
        sha256: Some(erel_master::digest_cache::sha256_file(&file_256).expect("hash")),
        sha256_of: None,
    };
    let unknown = WriteSource {
        path: file_256.clone(),
        sha256: None,
        sha256_of: None,
    };
    for (label, source, dest) in [
        ("digest known in advance", &known, "bench/known.bin"),
        (
            "digest computed while sending",
            &unknown,
            "bench/unknown.bin",
        ),
    ] {
        let mut best = f64::MAX;
        for round in 0..3 {
            let dest = format!("{dest}.{round}");
            let started = Instant::now();
            let written = client
                .write_file(source, &dest, 0o644, &mut |_| {})
                .await
                .expect("push");
            assert_eq!(written.received, 256 * MIB);
            best = best.min(started.elapsed().as_secs_f64());
            let _ = std::fs::remove_file(agent.root.join(&dest));
        }
        println!(
            "WriteFile 256 MiB on loopback, {label}: {:.0} MiB/s (best of 3: {:.2} s)",
            256.0 / best,
            best
        );
    }
    client
        .write_file(&known, "bench/again.bin", 0o644, &mut |_| {})
        .await
        .expect("push");
    let again = client
        .write_file(&known, "bench/again.bin", 0o644, &mut |_| {})
        .await
        .expect("push again");
    assert_eq!(again.received, 0);
    let second = Instant::now();
    client
        .write_file(&known, "bench/again.bin", 0o644, &mut |_| {})
        .await
        .expect("push again");
    println!(
        "WriteFile 256 MiB already present: {:.0} ms, 0 bytes sent",
        second.elapsed().as_secs_f64() * 1000.0
    );
    match scp_peer(&file_256, work.path()).await {
        Some(seconds) => println!(
            "peer: scp 256 MiB on loopback (OpenSSH, default cipher): {:.0} MiB/s ({:.2} s)",
            256.0 / seconds,
            seconds
        ),
        None => println!("peer: scp not measured (no sshd on this machine)"),
    }
    let _ = std::fs::remove_file(&file_256);

    // Peak RSS while receiving 1 GiB, sampled, against the 32 MiB target.
    let file_1g = work.path().join("1g.bin");
    make_file(&file_1g, 1024 * MIB);
    let source = WriteSource {
        path: file_1g.clone(),
        sha256: None,
        sha256_of: None,
    };
    let sampling = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            let now = status_kib(pid, "VmRSS");
            if now == 0 {
                return peak;
            }
            peak = peak.max(now);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let started = Instant::now();
    client
        .write_file(&source, "bench/1g.bin", 0o644, &mut |_| {})
        .await
        .expect("push 1 GiB");
    let seconds = started.elapsed().as_secs_f64();
    let hwm = status_kib(pid, "VmHWM");
    sampling.abort();
    println!(
        "erel-boot peak RSS receiving 1 GiB: {:.1} MiB (high-water mark since start; target < 32 MiB); {:.0} MiB/s",
        hwm as f64 / 1024.0,
        1024.0 / seconds
    );
    let _ = std::fs::remove_file(&file_1g);
    let _ = std::fs::remove_file(agent.root.join("bench/1g.bin"));
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Times `scp` of `file` to a private sshd on a loopback port, or None without sshd.
async fn scp_peer(file: &Path, work: &Path) -> Option<f64> {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let dir = work.join("ssh");
    std::fs::create_dir_all(&dir).ok()?;
    let keygen = |path: &Path| {
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !keygen(&dir.join("host_key")) || !keygen(&dir.join("client_key")) {
        return None;
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).ok()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    std::fs::create_dir_all("/run/sshd").ok();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPasswordAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\nPidFile {}\n",
            dir.join("host_key").display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )
    .ok()?;
    let mut daemon = Command::new(&sshd)
        .arg("-D")
        .arg("-f")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let ready = helper::wait_until(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let target = work.join("scp-target.bin");
    let scp = |dest: &Path| {
        Command::new("scp")
            .args([
                "-q",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-P",
            ])
            .arg(port.to_string())
            .arg("-i")
            .arg(dir.join("client_key"))
            .arg(file)
            .arg(format!("root@127.0.0.1:{}", dest.display()))
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut best = None;
    if ready {
        for _ in 0..3 {
            let started = Instant::now();
            if !scp(&target) {
                break;
            }
            let seconds = started.elapsed().as_secs_f64();
            best = Some(best.map_or(seconds, |b: f64| b.min(seconds)));
            let _ = std::fs::remove_file(&target);
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    best
}
