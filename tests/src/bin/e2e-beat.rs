//! A tiny release program for the tests: `foreground` serves TCP on `$BEAT_PORT` (on
//! `$BEAT_ADDR`, 127.0.0.1 by default) and answers every connection with
//! `beat <version> <host>`. `$BEAT_FAIL` makes it
//! misbehave on purpose: `exit` exits at once with code 3, `silent` runs without
//! listening, `slow-stop` serves on for [`SLOW_STOP`] after a SIGTERM (saying so on
//! stdout), then exits with code 0, `exit-at-<ms>` serves, then exits with code 3 once
//! its process is `<ms>` milliseconds old (counted from the fork that made it, so
//! however long the start script and the program's own start took).

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
        Ok(mode) if mode.starts_with("exit-at-") => {
            let Ok(ms) = mode["exit-at-".len()..].parse() else {
                eprintln!("beat {version}: not a number of milliseconds: {mode}");
                std::process::exit(2);
            };
            exit_at(Duration::from_millis(ms), version.clone());
        }
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

/// Exits with code 3, on a thread of its own, once this process is `age` old.
fn exit_at(age: Duration, version: String) {
    let Some(now) = process_age() else {
        eprintln!("beat {version}: cannot tell the process's age from /proc");
        std::process::exit(2);
    };
    std::thread::spawn(move || {
        std::thread::sleep(age.saturating_sub(now));
        eprintln!("beat {version}: exiting on purpose at {age:?} old");
        std::process::exit(3);
    });
}

/// How long ago this process was forked: `starttime` (field 22 of `/proc/self/stat`,
/// in clock ticks since boot) against the first field of `/proc/uptime` (seconds since
/// boot), as proc(5) describes both. `exec` keeps the process, so this counts from the
/// fork of the supervisor that started it. Precise to a clock tick.
fn process_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from
    // after its closing one, where field 3 begins.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let start_ticks: u64 = rest.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let ticks_per_sec = u64::try_from(ticks_per_sec).ok().filter(|t| *t > 0)?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let started = Duration::from_secs_f64(start_ticks as f64 / ticks_per_sec as f64);
    Some(Duration::from_secs_f64(uptime).saturating_sub(started))
}
