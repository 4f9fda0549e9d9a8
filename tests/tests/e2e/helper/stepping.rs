//! Catching a process in the middle of one of its operations (a push being received, an
//! archive being unpacked), however busy the machine.
//!
//! Polling a running process for "the operation has begun" can look first just after the
//! operation ended: a 25 MB push over loopback takes a few hundredths of a second, and a
//! test thread may wait longer than that for a core. Here the process runs in short
//! slices instead and is stopped between them (`SIGSTOP`, job control as signal(7)
//! describes it: every thread stops, nothing of its kernel state is lost); the probe is
//! asked only while every thread is stopped. Once the probe sees the moment, the process
//! stays stopped, so that what the test does next (kill it, fill its disk, cut its link,
//! kill its peer) happens before the process goes one step further. A slice is the test
//! thread's sleep: a busy machine may stretch it to some milliseconds, still a small part
//! of any operation caught this way. What the process's peers do meanwhile goes on (an
//! agent still drains the socket of a pusher held stopped). The process goes on when the
//! [`Stopped`] it is handed is resumed or dropped (`SIGCONT`, sent only while the pid is
//! still the same process: a process killed and reaped meanwhile is left alone).

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::PATIENCE;

/// How long the process runs between two looks. Far shorter than any operation a test
/// catches this way: the smallest, a push of 25 MB, needs tens of milliseconds of CPU.
pub const SLICE: Duration = Duration::from_millis(1);

/// A process held stopped; `SIGCONT` when resumed or dropped. Killing the process while
/// it is held is fine (`SIGKILL` ends a stopped process).
#[must_use = "the process stays stopped only while this is held"]
pub struct Stopped {
    pid: Pid,
    /// When the process started (`starttime` in `/proc/<pid>/stat`, proc(5)): a pid that
    /// names another process by the time of the resume is not signalled.
    started: Option<u64>,
    resumed: bool,
}

impl Stopped {
    /// Lets the process go on.
    pub fn resume(mut self) {
        self.cont();
    }

    fn cont(&mut self) {
        if !self.resumed {
            self.resumed = true;
            if self.started.is_some() && start_time(self.pid) == self.started {
                let _ = kill(self.pid, Signal::SIGCONT);
            }
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.cont();
    }
}

/// Runs the process `pid` in slices of [`SLICE`], stopped between them, until `probe`
/// (asked while it is stopped) gives a value or `limit` passes. The value and the process
/// still stopped; `None` when `limit` passed first (the process then runs on as before).
/// Panics when the process does not stop within [`PATIENCE`] (a thread in an
/// uninterruptible sleep stops only when it returns to user space).
pub fn step_until<T>(
    pid: u32,
    limit: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<(T, Stopped)> {
    let pid = Pid::from_raw(pid as i32);
    let deadline = Instant::now() + limit;
    loop {
        let stopped = stop(pid);
        if let Some(value) = probe() {
            return Some((value, stopped));
        }
        drop(stopped);
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(SLICE);
    }
}

/// Stops `pid` and waits until every thread of it is stopped (or the process is gone).
fn stop(pid: Pid) -> Stopped {
    let stopped = Stopped {
        pid,
        started: start_time(pid),
        resumed: false,
    };
    if kill(pid, Signal::SIGSTOP).is_err() {
        return stopped; // gone: nothing runs
    }
    let deadline = Instant::now() + PATIENCE;
    while !all_threads_stopped(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} did not stop within {PATIENCE:?}"
        );
        std::thread::yield_now();
    }
    stopped
}

/// The fields of a process's or a thread's `stat` file after the command's closing
/// parenthesis, the state first (proc(5)); `None` when it cannot be read.
fn stat_fields(path: &std::path::Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// When `pid` started, in clock ticks after boot (field 22 of `/proc/<pid>/stat`, the
/// 20th after the command); `None` once the pid names no process.
fn start_time(pid: Pid) -> Option<u64> {
    let path = std::path::PathBuf::from(format!("/proc/{pid}/stat"));
    stat_fields(&path)?.get(19)?.parse().ok()
}

/// True when no thread of `pid` can run: each is stopped, traced, or dead, or the process
/// is gone. The state is the field after the command's closing parenthesis in
/// `/proc/<pid>/task/<tid>/stat` (proc(5)).
fn all_threads_stopped(pid: Pid) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        // A thread whose stat cannot be read has ended.
        let fields = stat_fields(&task.path().join("stat")).unwrap_or_default();
        matches!(
            fields.first().map(String::as_str),
            Some("T" | "t" | "Z" | "X") | None
        )
    })
}

#[cfg(test)]
mod tests {
    // Paths in full: the benchmarks build this module too, without its tests.
    #[test]
    fn a_process_is_held_stopped_once_the_probe_sees_it_and_goes_on_when_resumed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counter = dir.path().join("counter");
        // Writes 1, 2, 3, ... to a file, as fast as it can, with built-ins only: no
        // process of its own that a stop of the shell would not hold.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"n=0; while :; do n=$((n+1)); echo $n > "$1"; done"#)
            .arg("sh")
            .arg(&counter)
            .spawn()
            .expect("spawn sh");
        let read = || {
            std::fs::read_to_string(&counter)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
        };
        let caught = super::step_until(child.id(), super::PATIENCE, || read().filter(|n| *n >= 50));
        let Some((seen, held)) = caught else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the counter never reached 50");
        };
        // Held: however long the test looks, the counter does not move.
        std::thread::sleep(super::SLICE * 50);
        assert_eq!(read(), Some(seen));
        held.resume();
        let moved = super::super::wait_until_blocking(super::PATIENCE, || read() > Some(seen));
        let _ = child.kill();
        let _ = child.wait();
        assert!(moved, "the counter goes on once resumed");
    }
}
