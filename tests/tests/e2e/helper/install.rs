//! Putting a release on an agent the way most tests do: push an archive with its digest,
//! unpack it where the agent keeps releases, start it; and reading one release's status.

use std::path::Path;

use erel_master::client::{Progress, WriteSource};
use erel_master::AgentClient;
use erel_proto::{ReleaseStatus, Start};

use super::release::{sha256, shell_release};
use super::AgentCommands;
use super::{AgentProc, Pki};

/// A progress callback for pushes whose progress no test looks at.
pub fn no_progress() -> impl FnMut(Progress) + Send {
    |_| {}
}

/// A push of `path` with its digest given in advance.
pub fn with_digest(path: &Path) -> WriteSource {
    WriteSource {
        path: path.to_path_buf(),
        sha256: Some(sha256(path)),
        sha256_of: None,
    }
}

/// A push of `path` whose digest the master computes as it sends.
pub fn without_digest(path: &Path) -> WriteSource {
    WriteSource {
        path: path.to_path_buf(),
        sha256: None,
        sha256_of: None,
    }
}

/// Pushes `tarball` to `archives/<name>-<version>.tar.gz` with its digest and unpacks it
/// into `releases/<name>/<version>`.
pub async fn push_and_unpack(client: &mut AgentClient, tarball: &Path, name: &str, version: &str) {
    let dest = format!("archives/{name}-{version}.tar.gz");
    let source = with_digest(tarball);
    client
        .write_file(&source, &dest, 0o644, &mut no_progress())
        .await
        .expect("push");
    client
        .unpack(
            &dest,
            &erel_proto::rules::version_dir(name, version),
            source.sha256,
        )
        .await
        .expect("unpack");
}

/// A shell release `name` `version` whose `bin/<name>` is `script`, made in `work`,
/// pushed to `agent` and unpacked there ([`push_and_unpack`]); the client that did it.
pub async fn unpack_shell_release(
    pki: &Pki,
    agent: &AgentProc,
    work: &Path,
    name: &str,
    version: &str,
    script: &str,
) -> AgentClient {
    let tarball = shell_release(work, name, version, script);
    let mut client = pki.connect(agent).await;
    push_and_unpack(&mut client, &tarball, name, version).await;
    client
}

/// A start of `name` `version` with `argv` (empty: the release's default), no extra
/// environment, as the agent's own user.
pub fn start_request(name: &str, version: &str, argv: &[&str]) -> Start {
    Start {
        name: name.into(),
        version: version.into(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        user: None,
    }
}

/// [`push_and_unpack`], then a start with the default argv and `env`.
pub async fn install_and_start(
    client: &mut AgentClient,
    tarball: &Path,
    name: &str,
    version: &str,
    env: Vec<(String, String)>,
) {
    push_and_unpack(client, tarball, name, version).await;
    client
        .start(Start {
            env,
            ..start_request(name, version, &[])
        })
        .await
        .expect("start");
}

/// What the agent says of release `name`; `None` when it does not know it.
pub async fn release_status(pki: &Pki, agent: &AgentProc, name: &str) -> Option<ReleaseStatus> {
    let mut client = pki.connect(agent).await;
    let pong = client.ping().await.expect("ping");
    pong.releases.into_iter().find(|r| r.name == name)
}
