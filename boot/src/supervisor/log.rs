//! Release output: `.erel/logs/<name>.log` and `<name>.log.1`, kept under the cap at every
//! instant by a small writer process per run.
//!
//! # How output flows
//!
//! ```text
//! release (stdout, stderr) ──pipe──▶ output writer ──▶ <name>.log ──rename──▶ <name>.log.1
//! ```
//!
//! At each start the agent makes a pipe, writes the `--- erel: starting … ---` header into
//! it, gives its write end to the release as stdout and stderr, and starts an *output
//! writer* on its read end: the agent's own program run as `erel-boot output-writer LOG
//! MAX_BYTES` ([`run_output_writer`]), a small process that does one thing. The writer
//! starts first, in a process group of its own, outside the release's session and cgroup:
//! it is never a member of the release, so a stop (SIGTERM to every member, then the
//! cgroup's kill) does not reach it, and it drains whatever the release wrote to its last
//! byte. It ends at end of input, when the release and everything that shares its output
//! have closed it; so a stopped release leaves no writer behind. It also blocks SIGTERM,
//! SIGINT and SIGHUP, which a terminal or a careless `kill` might send it.
//!
//! The writer, not the release, decides how many bytes reach the disk, so the cap holds at
//! every instant and does not depend on how fast the release writes: `<name>.log` never
//! holds more than half the cap; when the next bytes do not fit, the writer renames it to
//! `<name>.log.1` (which drops the previous `.1`) and starts a new one. A line that fits is
//! never split across the two files. So the two files together never hold more than
//! `log_max_bytes`: there is **no slack in bytes**; the disk space they take is that plus
//! the file system's rounding to its block size (at most one block per file). Rotation
//! needs no free space (a rename), unlike a copy. Writers of one release (there can be two
//! for a moment when a leftover of an earlier run still holds its output) take turns under
//! an `flock(2)` on `<name>.log.lock`, check the size the file really has, and reopen the
//! log when another one rotated it, so the cap holds for them together.
//!
//! # When the disk is full
//!
//! The writer never blocks the release: it always drains the pipe. When a write fails for
//! lack of space (`ENOSPC`, `EDQUOT`) it makes room from the release's own older output,
//! newest output first: it removes `<name>.log.1`, then cuts `<name>.log` down to its last
//! [`OUTPUT_TAIL_MAX`] bytes, and writes again. When that is still not enough, the bytes
//! are dropped and counted, and once writing works again a line `--- erel: N bytes of
//! output lost: … ---` says how many. Its own troubles go to its stderr (the agent's, so
//! the journal), once per kind of trouble.
//!
//! # Why not another design
//!
//! - *The release appending to the file itself* (the earlier design, with copy-truncate
//!   every few seconds) bounds nothing between two checks: `yes` writes gigabytes in that
//!   time, and the copy needs as much free space again.
//! - *`RLIMIT_FSIZE`* kills the release with `SIGXFSZ`, or fails its writes to every file,
//!   its data included.
//! - *The agent reading the pipe itself* ties the release's output to the agent's life: the
//!   pipe breaks when the agent is restarted or killed and the release dies of `SIGPIPE`,
//!   whereas releases must run on through an agent restart. The writer outlives the agent
//!   as the release does; the next agent adopts the release and its writer keeps going.
//!
//! This is the design of daemontools' `multilog`, runit's `svlogd` and s6's `s6-log`.
//!
//! # The tail
//!
//! [`output_tail`] reads the end of `<name>.log`, completed from the end of
//! `<name>.log.1` when the log was just rotated or cut. After a release ends, the
//! supervisor waits (bounded) for its writer, whose pid the run record keeps across an
//! agent restart, to be gone before it records the end, so the tail `Ping` reports holds
//! the release's last words.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use erel_proto::OUTPUT_TAIL_MAX;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::error::{Error, IoContext, Result};
use crate::fs::{Root, State};
use crate::settings::{OutputWriter, MIN_LOG_MAX_BYTES};

/// Permission bits of a new log file.
const LOG_MODE: u32 = 0o640;
/// The subcommand that makes the agent's program an output writer.
pub(crate) const OUTPUT_WRITER_COMMAND: &str = "output-writer";
/// Least time between two reports that room was made on a full disk.
const ROOM_REPORT_EVERY: Duration = Duration::from_secs(60);
/// Bytes read from the pipe at a time (the default pipe capacity on Linux, `pipe(7)`).
const READ_CHUNK: usize = 64 * 1024;

/// `.erel/logs/<name>.log`.
pub(crate) fn log_path(root: &Root, name: &str) -> PathBuf {
    root.state(State::Logs).join(format!("{name}.log"))
}

/// `log` with `suffix` appended to its file name.
fn beside(log: &Path, suffix: &str) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The rotated log beside `log`: `<name>.log.1`.
fn rotated_path(log: &Path) -> PathBuf {
    beside(log, ".1")
}

/// The output of one run of a release before it starts: a pipe (both ends close-on-exec,
/// so no other child inherits them) holding `header` as the run's first line. Returns its
/// read end, for the output writer, and two descriptors of its write end, for the
/// release's stdout and stderr. The agent keeps none: the writer sees the end of the
/// output once the release and what it started have closed theirs.
pub(crate) fn output_pipe(log: &Path, header: &str) -> Result<(File, (OwnedFd, OwnedFd))> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).io("make the output pipe for", log)?;
    let mut write = File::from(write);
    // An empty pipe holds far more than one line: this never blocks.
    write
        .write_all(format!("{header}\n").as_bytes())
        .io("write the header for", log)?;
    let dup = || {
        let copy = write.try_clone().map(OwnedFd::from);
        copy.io("duplicate the output pipe for", log)
    };
    Ok((File::from(read), (dup()?, dup()?)))
}

/// Starts the output writer on `read`, the read end of the [`output_pipe`], in a process
/// group of its own: outside the release's session and cgroup, so it is never counted as
/// the release, is not reached by its stop signals or its cgroup's kill, and drains the
/// last output of a release that was killed. It ends at end of input, once every process
/// that holds the write end (the release and all it started) is gone. It is not waited
/// for here; the runtime reaps it while this agent runs, its new parent after an agent
/// restart. Returns its pid.
pub(crate) fn start_writer(
    read: File,
    log: &Path,
    writer: &OutputWriter,
    max_bytes: u64,
) -> Result<u32> {
    let mut command = std::process::Command::new(&writer.program);
    // `ps` shows the agent's name rather than `/proc/self/exe`.
    let own = writer.program == Path::new(OutputWriter::SELF);
    let exe = own.then(std::env::current_exe).and_then(|exe| exe.ok());
    if let Some(name) = exe.as_deref().and_then(Path::file_name) {
        command.arg0(name);
    }
    command
        .args(&writer.args)
        .arg(log)
        .arg(max_bytes.to_string())
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(false);
    let child = command.spawn().map_err(|e| {
        let e = std::io::Error::new(e.kind(), format!("for {}: {e}", log.display()));
        Error::io("start the output writer", &writer.program, e)
    })?;
    let pid = child.id().ok_or_else(|| {
        let log = log.display();
        Error::Internal(format!(
            "the output writer for {log} exited before it had a pid"
        ))
    })?;
    Ok(pid)
}

/// The output writer process: copies its stdin into the capped log until end of input.
/// `args` are what follows `output-writer`: the log's absolute path and the cap in bytes
/// (at least [`MIN_LOG_MAX_BYTES`]). Exit status 0 at end of input, 1 when stdin cannot
/// be read, 2 for bad arguments.
pub(crate) fn run_output_writer(args: &[OsString]) -> ExitCode {
    let (log, max_bytes) = match parse_writer_args(args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("erel-boot {OUTPUT_WRITER_COMMAND}: {message}");
            eprintln!("usage: erel-boot {OUTPUT_WRITER_COMMAND} LOG MAX_BYTES (output on stdin)");
            return ExitCode::from(2);
        }
    };
    // A terminal or a stray signal must not cut the release's output: the writer keeps
    // draining until the release is gone. Blocked, not ignored, so nothing needs unsafe
    // code.
    let blocked = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP]);
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None) {
        eprintln!("erel-boot {OUTPUT_WRITER_COMMAND}: cannot block SIGTERM: {e}");
    }
    let mut capped = CappedLog::new(log, max_bytes);
    match capped.copy_from(&mut std::io::stdin().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "erel-boot {OUTPUT_WRITER_COMMAND}: {}: cannot read the release's output: {e}",
                capped.path.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn parse_writer_args(args: &[OsString]) -> std::result::Result<(PathBuf, u64), String> {
    let [log, max] = args else {
        return Err(format!("expected 2 arguments, got {}", args.len()));
    };
    let log = PathBuf::from(log);
    if !log.is_absolute() {
        return Err(format!("{}: the log path must be absolute", log.display()));
    }
    let max: u64 = max
        .to_str()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("{max:?}: MAX_BYTES must be a number of bytes"))?;
    if max < MIN_LOG_MAX_BYTES {
        return Err(format!(
            "MAX_BYTES {max} is below the minimum of {MIN_LOG_MAX_BYTES}"
        ));
    }
    Ok((log, max))
}

/// True for the errors that mean the file system has no room for the bytes.
fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// A release's log as one writer sees it: `<name>.log` of at most half the cap, rotated to
/// `<name>.log.1`.
#[derive(Debug)]
pub(crate) struct CappedLog {
    path: PathBuf,
    rotated: PathBuf,
    /// Bytes one file may hold: half the cap.
    half: u64,
    /// `<name>.log.lock`, taken around every write; `None` when it cannot be opened (the
    /// writer then works alone, which is the usual case anyway).
    lock: Option<File>,
    /// The log as this writer opened it (`O_APPEND`); reopened when the path names
    /// another file.
    file: Option<File>,
    /// Bytes dropped since the last successful write.
    lost: u64,
    /// Why they were dropped, and the last trouble reported on stderr.
    trouble: Option<String>,
    /// When making room was last reported, and how often it was done since.
    room_reported: Option<Instant>,
    room_unreported: u32,
}

impl CappedLog {
    /// A writer for `path` holding at most `max_bytes` across both files.
    pub(crate) fn new(path: PathBuf, max_bytes: u64) -> CappedLog {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(LOG_MODE)
            .open(beside(&path, ".lock"))
            .ok();
        CappedLog {
            rotated: rotated_path(&path),
            path,
            half: (max_bytes / 2).max(1),
            lock,
            file: None,
            lost: 0,
            trouble: None,
            room_reported: None,
            room_unreported: 0,
        }
    }

    /// Copies `input` into the log until end of input; an error only when `input` fails.
    pub(crate) fn copy_from(&mut self, input: &mut impl Read) -> std::io::Result<()> {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.write(&buf[..n]);
        }
    }

    /// Writes `data` under the cap, taking turns with other writers of the same log.
    /// Never fails: what cannot be written is counted, reported and dropped.
    pub(crate) fn write(&mut self, data: &[u8]) {
        let guard = self
            .lock
            .take()
            .and_then(|file| Flock::lock(file, FlockArg::LockExclusive).ok());
        self.write_locked(data);
        // Unlocking fails only for a bad descriptor; dropping the guard unlocks too.
        self.lock = guard.and_then(|guard| guard.unlock().ok());
    }

    fn write_locked(&mut self, data: &[u8]) {
        if self.lost > 0 {
            let marker = format!(
                "--- erel: {} bytes of output lost: {} ---\n",
                self.lost,
                self.trouble.as_deref().unwrap_or("cannot write the log")
            );
            if self.append(marker.as_bytes()).is_err() {
                self.lost += data.len() as u64;
                return;
            }
            eprintln!(
                "erel-boot {OUTPUT_WRITER_COMMAND}: {}: writing again after {} bytes lost",
                self.path.display(),
                self.lost
            );
            self.lost = 0;
            self.trouble = None;
        }
        if let Err((unwritten, e)) = self.append(data) {
            self.lost += unwritten;
            let trouble = if is_no_space(&e) {
                format!("no space left on the disk ({e})")
            } else {
                e.to_string()
            };
            if self.trouble.as_deref() != Some(&trouble) {
                eprintln!(
                    "erel-boot {OUTPUT_WRITER_COMMAND}: {}: {trouble}; dropping output until it can be written",
                    self.path.display()
                );
                self.trouble = Some(trouble);
            }
        }
    }

    /// Appends `data`, rotating whenever the next bytes do not fit. On failure, how many
    /// bytes of `data` were not written, and why.
    fn append(&mut self, mut data: &[u8]) -> std::result::Result<(), (u64, std::io::Error)> {
        let fail = |data: &[u8], e| (data.len() as u64, e);
        // Each step that makes room frees some of our own older output; two are possible.
        let mut room_steps = 0;
        while !data.is_empty() {
            let size = match self.current() {
                Ok(size) => size,
                Err(e) => return Err(fail(data, e)),
            };
            let room = usize::try_from(self.half.saturating_sub(size)).unwrap_or(usize::MAX);
            let take = if data.len() <= room {
                data.len()
            } else if let Some(end) = data[..room].iter().rposition(|&b| b == b'\n') {
                end + 1
            } else if size > 0 {
                // Start the line in a fresh file rather than split it.
                if let Err(e) = self.rotate() {
                    return Err(fail(data, e));
                }
                continue;
            } else {
                // A line longer than a whole file: split it.
                room
            };
            let Some(file) = self.file.as_mut() else {
                return Err(fail(data, std::io::Error::other("the log is not open")));
            };
            match write_counted(file, &data[..take]) {
                Ok(()) => data = &data[take..],
                Err((written, e)) => {
                    data = &data[written..];
                    if !is_no_space(&e) || room_steps >= 2 {
                        return Err(fail(data, e));
                    }
                    room_steps += 1;
                    match self.make_room() {
                        Ok(done) => self.report_room(&e, done),
                        Err(e) => return Err(fail(data, e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes sure `self.file` is the file the path names (another writer may have rotated
    /// it, or someone removed it), and returns its size.
    fn current(&mut self) -> std::io::Result<u64> {
        if let Some(file) = &self.file {
            let open = file.metadata()?;
            match fs::metadata(&self.path) {
                Ok(named) if named.dev() == open.dev() && named.ino() == open.ino() => {
                    return Ok(open.len())
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(LOG_MODE)
            .open(&self.path)?;
        let size = file.metadata()?.len();
        self.file = Some(file);
        Ok(size)
    }

    /// `<name>.log` becomes `<name>.log.1` (the previous one is dropped); the next write
    /// opens a new `<name>.log`.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        fs::rename(&self.path, &self.rotated)
    }

    /// Says on stderr that room was made, at most once per [`ROOM_REPORT_EVERY`] (a full
    /// disk under a flood of output would otherwise flood the journal too).
    fn report_room(&mut self, cause: &std::io::Error, done: &str) {
        if self
            .room_reported
            .is_some_and(|at| at.elapsed() < ROOM_REPORT_EVERY)
        {
            self.room_unreported += 1;
            return;
        }
        let more = match self.room_unreported {
            0 => String::new(),
            n => format!(" (made room {n} more times since the last report)"),
        };
        eprintln!(
            "erel-boot {OUTPUT_WRITER_COMMAND}: {}: no space left on the disk ({cause}): {done} to make room for new output{more}",
            self.path.display()
        );
        self.room_reported = Some(Instant::now());
        self.room_unreported = 0;
    }

    /// Frees room for new output from this release's own older output: first
    /// `<name>.log.1`, then all but the last [`OUTPUT_TAIL_MAX`] bytes of `<name>.log`.
    /// Says what it did.
    fn make_room(&mut self) -> std::io::Result<&'static str> {
        match fs::remove_file(&self.rotated) {
            Ok(()) => return Ok("removed the rotated log"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let Some(file) = self.file.as_mut() else {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        };
        let size = file.metadata()?.len();
        if size <= OUTPUT_TAIL_MAX as u64 {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let tail = tail_of(&self.path, OUTPUT_TAIL_MAX)?;
        file.set_len(0)?;
        // The tail fits in the blocks just freed.
        file.write_all(&tail)?;
        Ok("cut the log to its last bytes")
    }
}

/// `write_all` that says how many bytes it wrote before failing.
fn write_counted(file: &mut File, data: &[u8]) -> std::result::Result<(), (usize, std::io::Error)> {
    let mut written = 0;
    while written < data.len() {
        match file.write(&data[written..]) {
            Ok(0) => {
                return Err((
                    written,
                    std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote nothing"),
                ))
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

/// The last bytes of a file, at most `max`.
fn tail_of(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max as u64)))?;
    let mut bytes = Vec::with_capacity(max.min(len as usize));
    file.take(max as u64).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last [`OUTPUT_TAIL_MAX`] bytes of a release's output, as lossy UTF-8, starting at
/// the start of a line (at a character boundary when one line fills the tail). When the
/// log was just rotated, its end is taken from the rotated copy.
pub(crate) fn output_tail(path: &Path) -> String {
    // One byte more than the tail holds, to tell whether it starts at a line.
    let want = OUTPUT_TAIL_MAX + 1;
    let mut bytes = tail_of(path, want).unwrap_or_default();
    if bytes.len() < want {
        let older = tail_of(&rotated_path(path), want - bytes.len());
        let mut older = older.unwrap_or_default();
        older.extend_from_slice(&bytes);
        bytes = older;
    }
    tail_text(from_a_line(&bytes, OUTPUT_TAIL_MAX), OUTPUT_TAIL_MAX)
}

/// The end of `bytes` of at most `max` bytes that starts a line: what follows the first
/// newline within the last `max + 1` bytes (the byte before the window tells whether the
/// window starts a line). When no newline is there (one long line), the last `max` bytes.
fn from_a_line(bytes: &[u8], max: usize) -> &[u8] {
    if bytes.len() <= max {
        return bytes;
    }
    let window = &bytes[bytes.len() - max - 1..];
    match window.iter().position(|&b| b == b'\n') {
        Some(newline) => &window[newline + 1..],
        None => &window[1..],
    }
}

/// Lossy UTF-8 of the end of `bytes`, at most `max` bytes long, starting at a character.
fn tail_text(bytes: &[u8], max: usize) -> String {
    // Skip a character cut in half at the front.
    let start = bytes
        .iter()
        .take(4)
        .position(|b| b & 0b1100_0000 != 0b1000_0000)
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&bytes[start..]);
    // Replacement characters can make the text longer than the bytes it came from.
    let mut cut = text.len().saturating_sub(max);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_string()
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`, for log lines.
pub(crate) fn utc_now() -> String {
    utc(time::OffsetDateTime::now_utc())
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(time: time::OffsetDateTime) -> String {
    let (date, month) = (time.date(), u8::from(time.month()));
    let (year, day) = (date.year(), date.day());
    let (hour, minute, second) = time.to_hms();
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        let day = |days: i64| utc(time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(days));
        assert_eq!(day(0), "1970-01-01T00:00:00Z");
        assert_eq!(day(19_723), "2024-01-01T00:00:00Z");
        assert_eq!(day(19_782), "2024-02-29T00:00:00Z");
        assert_eq!(utc_now().len(), "2024-01-01T00:00:00Z".len());
    }

    #[test]
    fn tail_starts_at_a_line() {
        // The byte before the window ends a line: the window is kept whole.
        assert_eq!(from_a_line(b"ab\ncd\nef\n", 6), b"cd\nef\n");
        // The window starts mid-line: its partial first line is dropped.
        assert_eq!(from_a_line(b"abcd\nef\n", 6), b"ef\n");
        // Shorter than the tail: all of it (the start of the output starts a line).
        assert_eq!(from_a_line(b"cd\nef", 6), b"cd\nef");
        // One line longer than the tail: its end.
        assert_eq!(from_a_line(b"abcdefghij", 4), b"ghij");
    }

    #[test]
    fn tail_is_bounded_and_starts_at_a_character() {
        let text = "é".repeat(3000);
        let tail = tail_text(&text.as_bytes()[1..], OUTPUT_TAIL_MAX);
        assert!(tail.len() <= OUTPUT_TAIL_MAX);
        assert!(tail.chars().all(|c| c == 'é'));
        let invalid = vec![0xffu8; 3000];
        let tail = tail_text(&invalid, OUTPUT_TAIL_MAX);
        assert!(tail.len() <= OUTPUT_TAIL_MAX && !tail.is_empty());
    }

    /// A writer for `app.log` in a new temporary directory.
    fn temp_log(cap: u64) -> (tempfile::TempDir, PathBuf, CappedLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("app.log");
        let capped = CappedLog::new(log.clone(), cap);
        (dir, log, capped)
    }

    fn size(path: &Path) -> u64 {
        fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    /// Both files, checked against the cap.
    fn assert_capped(log: &Path, cap: u64) {
        let (now, old) = (size(log), size(&rotated_path(log)));
        assert!(now <= cap / 2, "{now} bytes in the log, cap {cap}");
        assert!(old <= cap / 2, "{old} bytes in the rotated log, cap {cap}");
    }

    #[test]
    fn the_cap_holds_after_every_write_of_any_size() {
        let cap = MIN_LOG_MAX_BYTES * 4;
        let (_dir, log, mut capped) = temp_log(cap);
        let mut last = String::new();
        for (i, len) in [1usize, 7, 100, 4000, 65_536, 3, 20_000, 9_000, 1]
            .iter()
            .cycle()
            .take(200)
            .enumerate()
        {
            let line = format!("{i:05}:{}\n", "x".repeat(*len));
            capped.write(line.as_bytes());
            assert_capped(&log, cap);
            last = line;
        }
        assert!(output_tail(&log).ends_with(&last[last.len().saturating_sub(OUTPUT_TAIL_MAX)..]));
        assert!(rotated_path(&log).exists(), "it rotated");
    }

    #[test]
    fn lines_that_fit_are_not_split_and_long_ones_are() {
        let cap = MIN_LOG_MAX_BYTES;
        let half = (cap / 2) as usize;
        let (_dir, log, mut capped) = temp_log(cap);
        let line = |c: char, n: usize| format!("{}\n", c.to_string().repeat(n - 1));
        capped.write(line('a', half - 10).as_bytes());
        // 20 bytes do not fit in the 10 left: the line starts a new file.
        capped.write(line('b', 20).as_bytes());
        assert_eq!(
            fs::read_to_string(rotated_path(&log)).expect("rotated"),
            line('a', half - 10)
        );
        assert_eq!(fs::read_to_string(&log).expect("log"), line('b', 20));
        // Several lines in one write: cut after the last one that fits.
        let two = format!("{}{}", line('c', half - 40), line('d', 30));
        capped.write(two.as_bytes());
        assert_eq!(
            fs::read_to_string(rotated_path(&log)).expect("rotated"),
            format!("{}{}", line('b', 20), line('c', half - 40))
        );
        assert_eq!(fs::read_to_string(&log).expect("log"), line('d', 30));
        // A line longer than a file is split, and still never over the cap.
        capped.write(line('e', half * 3).as_bytes());
        assert_capped(&log, cap);
        assert!(fs::read_to_string(&log).expect("log").ends_with("eee\n"));
    }

    #[test]
    fn two_writers_keep_the_cap_together_and_never_write_into_a_removed_file() {
        let cap = MIN_LOG_MAX_BYTES * 2;
        let (_dir, log, mut one) = temp_log(cap);
        let mut two = CappedLog::new(log.clone(), cap);
        for i in 0..500 {
            one.write(format!("one {i:04} {}\n", "1".repeat(i % 300)).as_bytes());
            assert_capped(&log, cap);
            two.write(format!("two {i:04} {}\n", "2".repeat(i % 200)).as_bytes());
            assert_capped(&log, cap);
        }
        let text = fs::read_to_string(&log).expect("log");
        assert!(
            text.contains("two 0499"),
            "the last line is in the named file"
        );
        // Neither holds a descriptor of a file that is no longer named.
        for writer in [&one, &two] {
            if let Some(file) = &writer.file {
                assert_ne!(
                    file.metadata().expect("fstat").nlink(),
                    0,
                    "writes into an unlinked file"
                );
            }
        }
    }

    #[test]
    fn a_removed_log_is_created_again() {
        let (_dir, log, mut capped) = temp_log(MIN_LOG_MAX_BYTES);
        capped.write(b"before\n");
        fs::remove_file(&log).expect("remove");
        capped.write(b"after\n");
        assert_eq!(fs::read_to_string(&log).expect("log"), "after\n");
    }

    #[test]
    fn lost_output_is_counted_and_said_once_writing_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        fs::create_dir(&logs).expect("mkdir");
        let log = logs.join("app.log");
        let mut capped = CappedLog::new(log.clone(), MIN_LOG_MAX_BYTES);
        capped.write(b"first\n");
        // The log's directory goes away: nothing can be written.
        capped.file = None;
        fs::remove_dir_all(&logs).expect("remove");
        capped.write(b"dropped\n");
        capped.write(b"dropped too\n");
        assert_eq!(capped.lost, 20);
        fs::create_dir(&logs).expect("mkdir");
        capped.write(b"back\n");
        let text = fs::read_to_string(&log).expect("log");
        let (said, then) = ("--- erel: 20 bytes of output lost: ", " ---\nback\n");
        assert!(text.starts_with(said) && text.ends_with(then), "{text}");
    }

    #[test]
    fn the_tail_spans_a_rotation() {
        let (_dir, log, mut capped) = temp_log(MIN_LOG_MAX_BYTES);
        // 25 lines of 60 bytes, then one that does not fit beside them: a rotation.
        for i in 0..25 {
            capped.write(format!("old line {i:02} {}\n", "o".repeat(47)).as_bytes());
        }
        capped.write(format!("{}\n", "n".repeat(1000)).as_bytes());
        let tail = output_tail(&log);
        assert!(
            tail.len() > OUTPUT_TAIL_MAX - 60,
            "the tail is full but for a line"
        );
        assert!(tail.len() <= OUTPUT_TAIL_MAX);
        assert!(
            tail.starts_with("old line "),
            "from the start of a line: {tail}"
        );
        assert!(
            tail.ends_with(&format!("o\n{}\n", "n".repeat(1000))),
            "{tail}"
        );
    }

    #[test]
    fn writer_arguments_are_checked() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(parse_writer_args(&args(&["/x/app.log", "4096"])).is_ok());
        assert!(parse_writer_args(&args(&["app.log", "4096"]))
            .unwrap_err()
            .contains("absolute"));
        assert!(parse_writer_args(&args(&["/x/app.log", "100"]))
            .unwrap_err()
            .contains("minimum"));
        assert!(parse_writer_args(&args(&["/x/app.log", "lots"]))
            .unwrap_err()
            .contains("number"));
        assert!(parse_writer_args(&args(&["/x/app.log"])).is_err());
    }
}
