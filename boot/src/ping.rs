//! `Ping`: the agent's live state — its id and version (with the containment mode),
//! uptime, free disk, and every release's status — in one answer that always fits in a
//! frame.

use erel_proto::Pong;

use crate::fs::free_disk;
use crate::server::Agent;

/// The answer to a `Ping`.
pub(crate) async fn ping(agent: &Agent) -> Pong {
    let root = agent.root.path().to_path_buf();
    let free = tokio::task::spawn_blocking(move || free_disk(&root))
        .await
        .unwrap_or(0);
    let mut pong = Pong {
        host_id: agent.host_id.clone(),
        // The containment mode rides in this text field (no protocol change):
        // `0.1.0 (containment: cgroup v2 …)` or `0.1.0 (containment: fallback to …)`.
        agent_version: format!(
            "{} (containment: {})",
            env!("CARGO_PKG_VERSION"),
            agent.supervisor.containment()
        ),
        uptime_secs: agent.started.elapsed().as_secs(),
        free_disk_bytes: free,
        releases: agent.supervisor.statuses().await,
    };
    fit_in_a_frame(&mut pong);
    pong
}

/// Many crashed releases with long output tails could exceed the frame limit: shorten
/// the tails (newest output kept) until the answer fits.
fn fit_in_a_frame(pong: &mut Pong) {
    let mut limit = erel_proto::OUTPUT_TAIL_MAX;
    while erel_proto::encode_body(&*pong).map_or(true, |body| body.len() > erel_proto::MAX_FRAME) {
        if limit == 0 {
            pong.releases.truncate(pong.releases.len() / 2);
            continue;
        }
        limit /= 2;
        for release in &mut pong.releases {
            if release.output_tail.len() > limit {
                let mut cut = release.output_tail.len() - limit;
                while !release.output_tail.is_char_boundary(cut) {
                    cut += 1;
                }
                release.output_tail.drain(..cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use erel_proto::{ReleaseState, ReleaseStatus, MAX_FRAME, OUTPUT_TAIL_MAX};

    use super::*;

    #[test]
    fn a_ping_answer_too_large_for_a_frame_keeps_the_newest_output() {
        let tail = format!("{}END", "x".repeat(OUTPUT_TAIL_MAX - 3));
        let releases = (0..60)
            .map(|i| ReleaseStatus {
                name: format!("release-{i}"),
                versions: vec!["1".into()],
                version: Some("1".into()),
                desired_running: true,
                pid: None,
                state: ReleaseState::CrashLooping,
                restarts: 5,
                up_secs: None,
                output_tail: tail.clone(),
            })
            .collect();
        let mut pong = Pong {
            host_id: "web-1".into(),
            agent_version: "0.1.0".into(),
            uptime_secs: 1,
            free_disk_bytes: 1,
            releases,
        };
        let before = erel_proto::encode_body(&pong).expect("encode").len();
        assert!(
            before > MAX_FRAME,
            "the sample must overflow ({before} bytes)"
        );
        fit_in_a_frame(&mut pong);
        let after = erel_proto::encode_body(&pong).expect("encode").len();
        assert!(after <= MAX_FRAME, "{after} bytes");
        assert_eq!(pong.releases.len(), 60, "every release is still reported");
        for release in &pong.releases {
            assert!(release.output_tail.ends_with("END"), "newest output kept");
            assert!(release.output_tail.len() < OUTPUT_TAIL_MAX);
        }
    }
}
