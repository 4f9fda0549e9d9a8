//! What the `request` and `unpack` targets share: a private, `noexec` file system for the
//! agent's roots, a fresh root per input, and one session of frames served against it.
//!
//! The agent runs in this process through `erel_boot::Sessions` (its command side
//! without TLS). Every root lives on a tmpfs mounted `noexec` over `/tmp` in a mount
//! namespace of this process alone, so a `Start` of whatever a fuzzed `WriteFile` or
//! archive put under the root is refused by the kernel at `execve` (the agent answers
//! `SpawnFailed`): no fuzzed program ever runs. That needs root (`CAP_SYS_ADMIN`); without
//! it the targets stop at once, saying so.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use erel_boot::{CgroupParent, Limits, OutputWriter, Sessions, Supervision};
use erel_proto::{decode_body, encode_frame, Hello, Request, Response, PROTOCOL_VERSION};

/// Where the private tmpfs is mounted (in this process's mount namespace only).
const SCRATCH: &str = "/tmp";

/// Size of the private tmpfs: far above what the limits below let one input write.
const SCRATCH_SIZE: &str = "size=512m";

/// The limits the agent runs with: small, so that one input stays quick.
pub fn limits() -> Limits {
    Limits {
        max_file_bytes: 1 << 20,
        disk_reserve_bytes: 16 << 20,
        max_unpack_bytes: 4 << 20,
        max_unpack_entries: 1000,
        ..Limits::default()
    }
}

/// Supervision without cgroups, with an output writer that discards the output.
fn supervision() -> Supervision {
    Supervision {
        restart_backoff: Duration::from_secs(3600),
        output_writer: OutputWriter {
            program: PathBuf::from("/bin/sh"),
            args: vec![
                "-c".into(),
                "exec cat >/dev/null".into(),
                "output-writer".into(),
            ],
        },
        cgroup_parent: CgroupParent::None,
        ..Supervision::default()
    }
}

/// Mounts the private `noexec` tmpfs once; exits the process when it cannot.
fn scratch() -> &'static Path {
    static MOUNTED: OnceLock<()> = OnceLock::new();
    MOUNTED.get_or_init(|| {
        if let Err(why) = mount_scratch() {
            eprintln!(
                "erel fuzz: cannot mount a private noexec tmpfs on {SCRATCH} ({why}); \
                 the request and unpack targets need root so that no fuzzed program can run"
            );
            std::process::exit(2);
        }
    });
    Path::new(SCRATCH)
}

fn mount_scratch() -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    // Nothing mounted from now on propagates to the rest of the system.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    let flags = MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("tmpfs"),
        SCRATCH,
        Some("tmpfs"),
        flags,
        Some(SCRATCH_SIZE),
    )
}

/// The runtime every input runs on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// A fresh directory holding one root (`<dir>/root`), removed when dropped.
#[derive(Debug)]
pub struct Fresh {
    dir: PathBuf,
}

impl Fresh {
    /// A new, empty directory on the private tmpfs.
    pub fn new() -> Fresh {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = scratch().join(format!("input-{n}"));
        std::fs::create_dir(&dir).expect("a fresh directory on the private tmpfs");
        std::fs::create_dir(dir.join("root")).expect("a fresh root");
        Fresh { dir }
    }

    /// The root the agent serves.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Opens the agent on the root, serves one session that reads `stream` after our
    /// `Hello` frame, and returns the agent's answers, each decoded (every frame the agent
    /// sends must be a whole `Response`). Then asserts that nothing was written beside
    /// the root and that no unpack staging was left behind.
    pub fn serve(&self, stream: &[u8]) -> Vec<Response> {
        let hello = Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: "fuzz".into(),
            software: "erel-fuzz".into(),
        });
        let mut input = encode_frame(&hello).expect("the Hello frame");
        input.extend_from_slice(stream);
        let mut output = Vec::new();
        runtime().block_on(async {
            let sessions = Sessions::open(&self.root(), "fuzz-host", limits(), supervision())
                .await
                .expect("the agent opens a fresh root");
            let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
            let stream = tokio::io::join(&input[..], &mut output);
            sessions.serve(stream, peer, "fuzz").await;
            sessions.close().await;
        });
        let answers = responses(&output);
        self.assert_confined();
        answers
    }

    /// Nothing beside the root, and no unpack staging left in it.
    fn assert_confined(&self) {
        let beside: Vec<_> = std::fs::read_dir(&self.dir)
            .expect("the input's directory")
            .map(|entry| entry.expect("an entry").file_name())
            .collect();
        assert_eq!(beside, ["root"], "something was written beside the root");
        let staging = self.root().join(".erel/unpack");
        let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "unpack staging left behind");
    }
}

impl Default for Fresh {
    fn default() -> Self {
        Fresh::new()
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Splits what the agent sent into frames and decodes each as a `Response`.
fn responses(mut output: &[u8]) -> Vec<Response> {
    let mut answers = Vec::new();
    while !output.is_empty() {
        assert!(output.len() >= 4, "the agent sent a partial length prefix");
        let len = u32::from_be_bytes(output[..4].try_into().expect("4 bytes")) as usize;
        let body = output
            .get(4..4 + len)
            .expect("the agent sent a partial frame");
        answers.push(decode_body::<Response>(body).expect("the agent sent a valid Response"));
        output = &output[4 + len..];
    }
    answers
}

/// Encodes `value` as a frame (for building inputs).
pub fn frame<T: serde::Serialize>(value: &T) -> Vec<u8> {
    encode_frame(value).expect("a frame")
}
