//! One rollout with an event callback: the one way `deploy`, `demo` and both daemons
//! run a rollout.

use tokio::sync::mpsc;

use super::{driver, RolloutEvent, RolloutOptions, RolloutReport};
use crate::client::Connector;
use crate::cluster::Plan;
use crate::error::Result;

/// Brings the hosts of `plan` (all groups, or `options.groups`) to their desired
/// versions, handing each event to `on_event` as it happens. Errors only when the plan
/// cannot be rolled out at all (an unknown group, archives not checked); what happens
/// to hosts is in the report.
pub async fn run(
    plan: &Plan,
    connector: &Connector,
    options: &RolloutOptions,
    mut on_event: impl FnMut(&RolloutEvent),
) -> Result<RolloutReport> {
    let (events, mut received) = mpsc::unbounded_channel();
    let rollout = driver::rollout(plan, connector, options, &events);
    tokio::pin!(rollout);
    let report = loop {
        tokio::select! {
            Some(event) = received.recv() => on_event(&event),
            report = &mut rollout => break report,
        }
    };
    while let Ok(event) = received.try_recv() {
        on_event(&event);
    }
    report
}
