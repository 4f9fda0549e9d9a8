//! `Ping`: the agent's live state — its id and version (with the containment mode),
//! uptime, free disk, and every release's status — in one answer that always fits in a
//! frame.

use erel_proto::{Pong, ReleaseState};

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

/// Many releases with long output tails could exceed the frame limit: shorten the tails
/// (newest output kept, from the start of a line) until the answer fits, running
/// releases' first, since an ended release's last words are what explains it; as a last
/// resort, report fewer releases.
fn fit_in_a_frame(pong: &mut Pong) {
    let too_large = |pong: &Pong| {
        erel_proto::encode_body(pong).map_or(true, |body| body.len() > erel_proto::MAX_FRAME)
    };
    for running_only in [true, false] {
        let mut limit = erel_proto::OUTPUT_TAIL_MAX;
        while limit > 0 && too_large(pong) {
            limit /= 2;
            let shortened = pong
                .releases
                .iter_mut()
                .filter(|r| !running_only || r.state == ReleaseState::Running);
            for release in shortened {
                keep_last(&mut release.output_tail, limit);
            }
        }
    }
    while !pong.releases.is_empty() && too_large(pong) {
        pong.releases.truncate(pong.releases.len() / 2);
    }
}

/// Keeps at most the last `max` bytes of `text`: from the start of a line when one
/// starts within them (the byte before them tells), else from a character boundary.
fn keep_last(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let window = text.len() - max - 1;
    let mut cut = match text.as_bytes()[window..].iter().position(|&b| b == b'\n') {
        Some(newline) => window + newline + 1,
        None => window + 1,
    };
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text.drain(..cut);
}

#[cfg(test)]
mod tests {
    use erel_proto::{ReleaseStatus, MAX_FRAME, OUTPUT_TAIL_MAX};

    use super::*;

    /// Release `release-{i}` at version 1, desired running, in `state` after `restarts`,
    /// with `tail` as its output.
    fn release(i: usize, state: ReleaseState, restarts: u32, tail: &str) -> ReleaseStatus {
        ReleaseStatus {
            name: format!("release-{i}"),
            versions: vec!["1".into()],
            version: Some("1".into()),
            desired_running: true,
            pid: None,
            state,
            restarts,
            up_secs: None,
            output_tail: tail.to_string(),
        }
    }

    /// A `Pong` from host `web-1` reporting `releases`.
    fn sample_pong(releases: Vec<ReleaseStatus>) -> Pong {
        Pong {
            host_id: "web-1".into(),
            agent_version: "0.1.0".into(),
            uptime_secs: 1,
            free_disk_bytes: 1,
            releases,
        }
    }

    #[test]
    fn a_ping_answer_too_large_for_a_frame_keeps_the_newest_output() {
        let tail = format!("{}END", "x".repeat(OUTPUT_TAIL_MAX - 3));
        let releases = (0..60)
            .map(|i| release(i, ReleaseState::CrashLooping, 5, &tail))
            .collect();
        let mut pong = sample_pong(releases);
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

    #[test]
    fn running_releases_tails_give_way_before_an_ended_ones_last_words() {
        let lines: String = (0..300).map(|i| format!("line {i:03}\n")).collect();
        let tail = lines[lines.len() - OUTPUT_TAIL_MAX..].to_string();
        let mut releases: Vec<_> = (0..40)
            .map(|i| release(i, ReleaseState::Running, 0, &tail))
            .collect();
        releases.push(release(40, ReleaseState::CrashLooping, 0, &tail));
        let mut pong = sample_pong(releases);
        fit_in_a_frame(&mut pong);
        assert!(erel_proto::encode_body(&pong).expect("encode").len() <= MAX_FRAME);
        let crashed = pong.releases.last().expect("still reported");
        assert_eq!(
            crashed.output_tail, tail,
            "the crashed release's tail is whole"
        );
        for running in &pong.releases[..40] {
            assert!(running.output_tail.len() < tail.len());
            assert!(
                running.output_tail.starts_with("line "),
                "from a line's start"
            );
            assert!(running.output_tail.ends_with("line 299\n"));
        }
    }
}
