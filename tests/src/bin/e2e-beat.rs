//! A tiny release program for the tests: `foreground` serves TCP on `$BEAT_PORT` (on
//! `$BEAT_ADDR`, 127.0.0.1 by default) and answers every connection with
//! `beat <version> <host>`. `$BEAT_FAIL` makes it
//! misbehave on purpose: `exit` exits at once with code 3, `silent` runs without
//! listening, `slow-stop` serves on for [`SLOW_STOP`] after a SIGTERM (saying so on
//! stdout), then exits with code 0.

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

/// How long the `slow-stop` mode serves on after a SIGTERM.
const SLOW_STOP: Duration = Duration::from_secs(2);

fn main() {
    let version = std::env::var("EREL_VERSION").unwrap_or_else(|_| "unknown".into());
    let host = std::env::var("EREL_HOST_ID").unwrap_or_else(|_| "unknown".into());
    match std::env::var("BEAT_FAIL").as_deref() {
        Ok("exit") => {
            eprintln!("beat {version}: failing on purpose");
            std::process::exit(3);
        }
        Ok("silent") => {
            println!("beat {version}: running without listening");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Ok("slow-stop") => stop_slowly_on_sigterm(version.clone()),
        _ => {}
    }
    let port = std::env::var("BEAT_PORT").unwrap_or_else(|_| "0".into());
    let addr = std::env::var("BEAT_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = match TcpListener::bind(format!("{addr}:{port}")) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("beat {version}: cannot listen on {port}: {e}");
            std::process::exit(2);
        }
    };
    let local = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("beat {version} on {host} listening on {local}");
    let _ = std::io::stdout().flush();
    for stream in listener.incoming().flatten() {
        let mut stream = stream;
        let _ = writeln!(stream, "beat {version} {host}");
    }
}

/// Blocks SIGTERM in this thread (and so in every thread started after) and waits for it
/// on a thread of its own, which says so, serves on for [`SLOW_STOP`] and exits.
fn stop_slowly_on_sigterm(version: String) {
    use nix::sys::signal::{SigSet, Signal};
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    if let Err(e) = term.thread_block() {
        eprintln!("beat {version}: cannot block SIGTERM: {e}");
        std::process::exit(2);
    }
    std::thread::spawn(move || {
        if term.wait().is_ok() {
            println!("beat {version}: SIGTERM, stopping in {SLOW_STOP:?}");
            let _ = std::io::stdout().flush();
            std::thread::sleep(SLOW_STOP);
            std::process::exit(0);
        }
    });
}
