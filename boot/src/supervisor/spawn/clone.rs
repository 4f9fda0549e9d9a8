//! Spawning a release straight into its cgroup: `clone3(2)` with `CLONE_INTO_CGROUP`
//! (Linux 5.7).
//!
//! A process that joins a cgroup by writing to `cgroup.procs` takes the kernel's
//! cgroup-wide `cgroup_threadgroup_rwsem` for writing, which waits for an RCU grace
//! period: 7 to 15 ms here for every start, and starts on many releases at once queue
//! behind one another. A child created inside the cgroup takes no such lock. The child
//! is born in the cgroup, so nothing it runs, not even the code before `exec`, is ever
//! outside it.
//!
//! Between `clone3` and `execve` the child is a copy of a multi-threaded process with a
//! single thread: it may only make async-signal-safe calls (signal-safety(7)), so every
//! string, array and descriptor it uses is prepared before the clone, and it reports a
//! failure through a close-on-exec pipe, as std's `Command` does. Signals are blocked in
//! the parent around the clone, and the child puts every handled signal back to its
//! default before unblocking them, so the agent's own handlers (which write to
//! descriptors the child shares with the agent) never run in the child.
//!
//! When the kernel refuses the call (older than 5.7, or a seccomp filter), the caller
//! falls back to std's `Command` and the write to `cgroup.procs`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `CLONE_INTO_CGROUP` (linux/sched.h): create the child in the cgroup `cgroup` names.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// `CLONE_PIDFD` (linux/sched.h): return a pidfd for the child in `pidfd`.
const CLONE_PIDFD: u64 = 0x1000;
/// The highest signal number on Linux (`_NSIG - 1`, signal(7)).
const MAX_SIGNAL: libc::c_int = 64;

/// `struct clone_args` of linux/sched.h, `CLONE_ARGS_SIZE_VER2` (88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Everything the child needs, made before the clone.
pub(super) struct Plan {
    /// The program, an absolute path.
    pub(super) program: CString,
    /// `argv`, `argv[0]` first.
    pub(super) argv: Vec<CString>,
    /// The environment, `K=V` each.
    pub(super) env: Vec<CString>,
    /// The working directory.
    pub(super) cwd: CString,
    /// Standard input, output and error.
    pub(super) stdio: [OwnedFd; 3],
    /// Supplementary groups, group and user to drop to, when not the agent's.
    pub(super) ids: Option<(Vec<Gid>, Gid, Uid)>,
}

/// A child spawned by [`spawn`], waited for through its pidfd.
#[derive(Debug)]
pub(crate) struct ClonedChild {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
}

impl ClonedChild {
    /// Its pid.
    pub(crate) fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for it to end and reaps it.
    ///
    /// # Errors
    ///
    /// The pidfd cannot be polled, or `waitpid(2)` fails (it was reaped elsewhere).
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            let pid = Pid::from_raw(self.pid as i32);
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => ready.clear_ready(),
                Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw(code << 8)),
                Ok(WaitStatus::Signaled(_, signal, core)) => {
                    let core = if core { 0x80 } else { 0 };
                    return Ok(ExitStatus::from_raw(signal as i32 | core));
                }
                // Stopped or continued (not asked for): keep waiting.
                Ok(_) | Err(nix::errno::Errno::EINTR) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Why [`spawn`] did not start the child.
#[derive(Debug)]
pub(super) enum Refused {
    /// The kernel does not offer `clone3` into a cgroup: the caller may fall back.
    Unsupported(io::Error),
    /// The child was created but could not start the program: the step and its error.
    Failed(String),
}

/// Creates a child in the cgroup whose directory `cgroup` is, in a new session, running
/// `plan` (see the module documentation). Returns once the child has called `execve`.
///
/// # Errors
///
/// [`Refused::Unsupported`] when `clone3` fails (nothing was created);
/// [`Refused::Failed`] naming the step (`dup2`, `chdir`, `setsid`, `setgroups`,
/// `setgid`, `setuid`, `execve`) and the error when the child could not run the program
/// (it is reaped before this returns).
#[allow(unsafe_code)]
pub(super) fn spawn(plan: &Plan, cgroup: BorrowedFd<'_>) -> Result<ClonedChild, Refused> {
    let argv: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = plan
        .env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let ids = plan.ids.as_ref().map(|(groups, gid, uid)| {
        (
            groups.iter().map(|g| g.as_raw()).collect::<Vec<_>>(),
            gid.as_raw(),
            uid.as_raw(),
        )
    });
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Refused::Unsupported(e.into()))?;
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP | CLONE_PIDFD,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    let child = ChildSide {
        program: plan.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: plan.cwd.as_ptr(),
        stdio: [
            plan.stdio[0].as_raw_fd(),
            plan.stdio[1].as_raw_fd(),
            plan.stdio[2].as_raw_fd(),
        ],
        ids: ids
            .as_ref()
            .map(|(groups, gid, uid)| (groups.as_slice(), *gid, *uid)),
        report: report_write.as_raw_fd(),
    };
    // SAFETY: every signal is blocked while the clone is made, so no handler of the
    // agent runs in the child; the parent's mask is put back at once after. `clone3`
    // without CLONE_VM gives the child its own copy of memory, like fork(2); in the child
    // only `ChildSide::run` runs, which makes async-signal-safe calls alone on data made
    // above, and never returns (`execve` or `_exit`). `args` outlives the call and
    // `pidfd` is written by the kernel before it returns in the parent.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        );
        if pid == 0 {
            child.run();
        }
        let error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(Refused::Unsupported(error));
        }
        pid as u32
    };
    // SAFETY: CLONE_PIDFD made the kernel store a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(report_write);
    let report = read_report(report_read);
    let reap = || {
        let _ = waitpid(Pid::from_raw(pid as i32), None);
    };
    match report {
        Ok(None) => {}
        Ok(Some(why)) => {
            reap();
            return Err(Refused::Failed(why));
        }
        Err(e) => {
            reap();
            return Err(Refused::Failed(format!("reading the child's report: {e}")));
        }
    }
    // SAFETY: the `OwnedFd` owns the pidfd, which stays open, the same descriptor, for as
    // long as the `AsyncFd` holds it.
    let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
    match registered {
        Ok(pidfd) => Ok(ClonedChild { pid, pidfd }),
        Err(e) => {
            // The program runs: it cannot be waited for here, so it is stopped.
            let _ = nix::sys::signal::kill(
                Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            reap();
            Err(Refused::Failed(format!("watching its pidfd: {e}")))
        }
    }
}

/// What the child reported: nothing (it reached `execve`, which closed the pipe) or the
/// step that failed and its error.
fn read_report(read: OwnedFd) -> io::Result<Option<String>> {
    let mut buf = [0u8; 8];
    let mut filled = 0;
    loop {
        match nix::unistd::read(&read, &mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled == buf.len() {
                    break;
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    match filled {
        0 => Ok(None),
        8 => {
            let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let error = io::Error::from_raw_os_error(errno);
            Ok(Some(format!(
                "{}: {error}",
                STEPS[step as usize % STEPS.len()]
            )))
        }
        n => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{n} bytes of the child's report"),
        )),
    }
}

/// The child's steps, as [`ChildSide::run`] numbers them in its report.
const STEPS: [&str; 7] = [
    "dup2",
    "chdir",
    "setsid",
    "setgroups",
    "setgid",
    "setuid",
    "execve",
];

/// Raw pointers and descriptors the child uses: nothing it needs is allocated after the
/// clone.
struct ChildSide<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    ids: Option<(&'a [libc::gid_t], libc::gid_t, libc::uid_t)>,
    report: RawFd,
}

impl ChildSide<'_> {
    /// In the child: standard descriptors, signals back to their defaults, working
    /// directory, a new session, the user's ids, then `execve`. A failed step is written
    /// to the report pipe (step number, errno) and the child exits with 127.
    #[allow(unsafe_code)]
    unsafe fn run(&self) -> ! {
        let fail = |step: u32| -> ! {
            let errno = *libc::__errno_location();
            let mut report = [0u8; 8];
            report[..4].copy_from_slice(&step.to_ne_bytes());
            report[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(self.report, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        };
        for (target, source) in self.stdio.iter().enumerate() {
            let target = target as RawFd;
            if *source == target {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                    fail(0);
                }
            } else if libc::dup2(*source, target) < 0 {
                fail(0);
            }
        }
        // Handlers the agent installed would run its code here: back to the default.
        // Ignored signals stay ignored across exec, as with std's Command, except
        // SIGPIPE, which Rust programs ignore for themselves.
        for signal in 1..=MAX_SIGNAL {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut action) == 0
                && (action.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
                && action.sa_sigaction != libc::SIG_DFL
            {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::chdir(self.cwd) < 0 {
            fail(1);
        }
        if libc::setsid() < 0 {
            fail(2);
        }
        if let Some((groups, gid, uid)) = self.ids {
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0 {
                fail(3);
            }
            if libc::setgid(gid) < 0 {
                fail(4);
            }
            if libc::setuid(uid) < 0 {
                fail(5);
            }
        }
        libc::execve(self.program, self.argv, self.envp);
        fail(6)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::cgroup::{Containment, Tree};
    use super::*;
    use crate::settings::CgroupParent;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;

    /// A cgroup tree for the tests under a fresh root, removed on drop; `None` (said) where
    /// this machine has no writable cgroup v2 and is not expected to (not root).
    struct Cgroups {
        tree: Tree,
        dir: tempfile::TempDir,
    }

    impl Cgroups {
        fn new() -> Option<Cgroups> {
            let dir = tempfile::tempdir().expect("tempdir");
            match Containment::detect(&CgroupParent::Auto, dir.path()) {
                Containment::Cgroup(tree) => Some(Cgroups { tree, dir }),
                Containment::Fallback(why) => {
                    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
                        .is_ok_and(|m| m.lines().any(|l| l.contains(" - cgroup2 ")));
                    assert!(
                        !(nix::unistd::geteuid().is_root() && mounted),
                        "running as root with cgroup v2 mounted, yet: {why}"
                    );
                    eprintln!("SKIPPED: this test needs root and a writable cgroup v2: {why}");
                    None
                }
            }
        }

        /// A shell script at `name` in the temporary directory.
        fn script(&self, name: &str, body: &str) -> CString {
            let path = self.dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            CString::new(path.as_os_str().as_encoded_bytes()).expect("path")
        }

        /// A plan running `program` with its output to a pipe; the pipe's read end.
        fn plan(&self, program: CString) -> (Plan, std::fs::File) {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
            let null = std::fs::File::open("/dev/null").expect("/dev/null");
            let err = write.try_clone().expect("dup");
            let plan = Plan {
                argv: vec![program.clone(), CString::new("foreground").expect("arg")],
                program,
                env: vec![CString::new("ONLY=this").expect("env")],
                cwd: CString::new(self.dir.path().as_os_str().as_encoded_bytes()).expect("cwd"),
                stdio: [null.into(), write, err],
                ids: None,
            };
            (plan, read.into())
        }
    }

    impl Drop for Cgroups {
        fn drop(&mut self) {
            let _ = self.tree.kill("t");
            self.tree.remove("t");
            self.tree.remove_if_empty();
        }
    }

    /// Runs `plan` in cgroup `t`; what it wrote and how it ended.
    async fn run(cgroups: &Cgroups, plan: Plan, mut output: std::fs::File) -> (String, ExitStatus) {
        let joining = cgroups.tree.prepare("t").expect("prepare");
        let mut child = spawn(&plan, joining.dir.as_fd()).expect("spawn");
        drop(plan);
        let status = child.wait().await.expect("wait");
        let mut text = String::new();
        output.read_to_string(&mut text).expect("read output");
        (text, status)
    }

    #[test]
    fn clone_args_has_the_kernels_layout() {
        // CLONE_ARGS_SIZE_VER2 in linux/sched.h.
        assert_eq!(std::mem::size_of::<CloneArgs>(), 88);
    }

    #[tokio::test]
    async fn the_child_is_born_in_the_cgroup_leads_a_session_and_gets_only_what_it_is_given() {
        let Some(cgroups) = Cgroups::new() else {
            return;
        };
        let script = cgroups.script(
            "show",
            "cat /proc/self/cgroup; echo \"sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$\"; echo \"cwd=$(pwd)\"; \\
             env | grep -v '^PWD=\\|^SHLVL=\\|^_=' ; echo \"args=$*\"; \\
             grep -E '^Sig(Blk|Ign)' /proc/self/status; exit 3",
        );
        let (plan, output) = cgroups.plan(script);
        // Blocked here: the child starts with none blocked whatever the agent blocks.
        let mut usr1 = nix::sys::signal::SigSet::empty();
        usr1.add(nix::sys::signal::Signal::SIGUSR1);
        usr1.thread_block().expect("block SIGUSR1");
        let (text, status) = run(&cgroups, plan, output).await;
        usr1.thread_unblock().expect("unblock");
        assert_eq!(status.code(), Some(3), "{text}");
        let release = cgroups.tree.release_dir("t");
        let name = release
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        // The cgroup v2 line (`0::PATH`; a hybrid system lists its v1 hierarchies too).
        let v2 = text
            .lines()
            .find(|l| l.starts_with("0::/"))
            .unwrap_or_default();
        assert!(v2.ends_with(&format!("/{name}")), "{text}");
        let pid = text
            .split(" pid=")
            .nth(1)
            .and_then(|r| r.lines().next())
            .unwrap_or("?");
        assert!(text.contains(&format!("sid={pid} pid={pid}\n")), "{text}");
        assert!(
            text.contains(&format!("cwd={}", cgroups.dir.path().display())),
            "{text}"
        );
        assert!(text.contains("ONLY=this\n"), "{text}");
        assert!(text.contains("args=foreground"), "{text}");
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
        // SIGPIPE (13, bit 12) back to its default, not ignored as in the agent.
        let ignored = text
            .split("SigIgn:\t")
            .nth(1)
            .and_then(|r| r.lines().next())
            .unwrap_or("");
        let ignored = u64::from_str_radix(ignored, 16).expect("SigIgn");
        assert_eq!(ignored & (1 << 12), 0, "{text}");
    }

    #[tokio::test]
    async fn a_signal_that_ends_the_child_is_reported() {
        let Some(cgroups) = Cgroups::new() else {
            return;
        };
        let script = cgroups.script("die", "kill -KILL $$");
        let (plan, output) = cgroups.plan(script);
        let (_, status) = run(&cgroups, plan, output).await;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn a_program_that_cannot_run_is_refused_naming_the_step() {
        let Some(cgroups) = Cgroups::new() else {
            return;
        };
        let path = cgroups.dir.path().join("not-executable");
        std::fs::write(&path, "#!/bin/sh\n").expect("write");
        let program = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        let (plan, _output) = cgroups.plan(program);
        let joining = cgroups.tree.prepare("t").expect("prepare");
        match spawn(&plan, joining.dir.as_fd()) {
            Err(Refused::Failed(why)) => {
                assert!(
                    why.starts_with("execve: ") && why.contains("denied"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A working directory that is gone is refused at its own step.
        let (mut plan, _output) = cgroups.plan(cgroups.script("ok", "true"));
        plan.cwd = CString::new("/nonexistent-erel-dir").expect("cwd");
        match spawn(&plan, joining.dir.as_fd()) {
            Err(Refused::Failed(why)) => assert!(why.starts_with("chdir: "), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_descriptor_that_is_not_a_cgroup_is_refused_so_the_caller_can_fall_back() {
        let Some(cgroups) = Cgroups::new() else {
            return;
        };
        let (plan, _output) = cgroups.plan(cgroups.script("ok", "true"));
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        match spawn(&plan, file.as_fd()) {
            Err(Refused::Unsupported(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}
