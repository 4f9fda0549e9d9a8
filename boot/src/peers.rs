//! The budget for peers that have not yet proved who they are.
//!
//! Every accepted connection takes a [`HandshakeSlot`] until its TLS handshake ends;
//! only a peer whose certificate verified goes on to take a session permit (the
//! agent's `max_connections`). So idle or slow peers without a certificate never use
//! the room kept for the cluster's masters, and their own room is bounded twice: at
//! most `max_per_address` pending handshakes from one address, and `max_total` in all.
//!
//! A full budget does not refuse the newcomer: it drops the *oldest* pending handshake
//! of the address that has the most (with a per-address cap, the newcomer's own
//! address). A master finishes its handshake in one round trip, so a flood keeps it out
//! only by opening a whole budget of connections from more addresses than the budget
//! holds within that round trip; idle peers that merely sit on connections are pushed
//! out by the next arrival instead of pushing the master out. The same idea as the
//! kernel's dropping of the oldest half-open connections under a SYN flood.
//!
//! Addresses are counted as an IPv4 address, or an IPv6 /64 prefix (the smallest
//! block one site is normally given, RFC 6177), so one host cannot multiply itself
//! through its interface identifiers. IPv4-mapped IPv6 addresses count as IPv4.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// At most one warning about dropped handshakes per this interval (the others are
/// counted into the next one), so a flood cannot flood the log too.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Which peers count together against the per-address cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AddressKey(IpAddr);

impl AddressKey {
    /// IPv4 as is; IPv6 reduced to its /64 prefix; IPv4-mapped IPv6 as IPv4.
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                AddressKey(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
        }
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why a pending handshake was dropped for a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crowding {
    /// Its address already had `max_per_address` pending handshakes.
    Address,
    /// The agent already had `max_total` pending handshakes.
    Total,
}

#[derive(Debug)]
struct Pending {
    id: u64,
    evict: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    total: usize,
    by_address: HashMap<AddressKey, VecDeque<Pending>>,
    dropped_unreported: u64,
    last_warning: Option<Instant>,
}

/// The pending handshakes of one agent.
#[derive(Debug)]
pub(crate) struct Handshakes {
    max_total: usize,
    max_per_address: usize,
    state: Mutex<State>,
}

impl Handshakes {
    /// A budget of `max_total` pending handshakes, `max_per_address` from one address
    /// (both at least 1).
    pub(crate) fn new(max_total: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Each operation leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip`, dropping the oldest pending handshake that
    /// the budget has no room for. Returns the newcomer's slot and, when one was
    /// dropped, whose and why.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> (HandshakeSlot, Option<(AddressKey, Crowding)>) {
        let address = AddressKey::of(ip);
        let mut state = self.state();
        let own = state.by_address.get(&address).map_or(0, VecDeque::len);
        let crowded = if own >= self.max_per_address {
            Some((address, Crowding::Address))
        } else if state.total >= self.max_total {
            // The address holding the most; among equals, the one waiting longest.
            state
                .by_address
                .iter()
                .filter(|(_, queue)| !queue.is_empty())
                .max_by(|(_, a), (_, b)| a.len().cmp(&b.len()).then_with(|| b[0].id.cmp(&a[0].id)))
                .map(|(key, _)| (*key, Crowding::Total))
        } else {
            None
        };
        if let Some((victim, why)) = crowded {
            let oldest = state.by_address.get(&victim).and_then(VecDeque::front);
            if let Some(dropped) = oldest.map(|p| p.id).and_then(|id| state.remove(victim, id)) {
                dropped.evict.cancel();
            }
            state.dropped_unreported += 1;
            let due = state
                .last_warning
                .is_none_or(|at| at.elapsed() >= WARN_EVERY);
            if due {
                let dropped = std::mem::take(&mut state.dropped_unreported);
                state.last_warning = Some(Instant::now());
                let limit = match why {
                    Crowding::Address => format!(
                        "{} pending handshakes from {victim} (max_handshakes_per_address)",
                        self.max_per_address
                    ),
                    Crowding::Total => {
                        format!("{} pending handshakes (max_handshakes)", self.max_total)
                    }
                };
                warn!(%victim, dropped, "unauthenticated peers at the limit of {limit}; dropped the oldest to make room");
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        state
            .by_address
            .entry(address)
            .or_default()
            .push_back(Pending {
                id,
                evict: evicted.clone(),
            });
        state.total += 1;
        drop(state);
        let slot = HandshakeSlot {
            budget: self.clone(),
            address,
            id,
            evicted,
        };
        (slot, crowded)
    }

    /// Pending handshakes now: in all, and from `ip`'s address.
    #[cfg(test)]
    fn pending(&self, ip: IpAddr) -> (usize, usize) {
        let state = self.state();
        let own = state
            .by_address
            .get(&AddressKey::of(ip))
            .map_or(0, VecDeque::len);
        (state.total, own)
    }
}

impl State {
    /// Takes pending handshake `id` of `address` out of the budget; `None` when it had
    /// already been dropped for a newcomer.
    fn remove(&mut self, address: AddressKey, id: u64) -> Option<Pending> {
        let queue = self.by_address.get_mut(&address)?;
        let pending = queue.remove(queue.iter().position(|p| p.id == id)?)?;
        if queue.is_empty() {
            self.by_address.remove(&address);
        }
        self.total -= 1;
        Some(pending)
    }
}

/// One pending handshake's place in the budget, given back on drop (when the
/// handshake ends, either way).
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    budget: Arc<Handshakes>,
    address: AddressKey,
    id: u64,
    evicted: CancellationToken,
}

impl HandshakeSlot {
    /// Completes when this handshake was dropped to make room for a newcomer.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await;
    }

    /// Whether this handshake was dropped to make room for a newcomer.
    #[cfg(test)]
    fn is_evicted(&self) -> bool {
        self.evicted.is_cancelled()
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.budget.state().remove(self.address, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn one_address_never_holds_more_than_its_cap() {
        let budget = Handshakes::new(100, 3);
        let flood: Vec<_> = (0..5).map(|_| budget.admit(ip("10.0.0.9"))).collect();
        assert_eq!(budget.pending(ip("10.0.0.9")), (3, 3));
        // The two oldest were dropped for the newer ones, for the address cap.
        for (i, (slot, crowded)) in flood.iter().enumerate() {
            assert_eq!(slot.is_evicted(), i < 2, "slot {i}");
            let expected = (i >= 3).then_some((AddressKey::of(ip("10.0.0.9")), Crowding::Address));
            assert_eq!(*crowded, expected, "slot {i}");
        }
        // Another address is not touched by that flood.
        let (master, crowded) = budget.admit(ip("10.0.0.1"));
        assert!(crowded.is_none() && !master.is_evicted());
        drop(flood);
        assert_eq!(budget.pending(ip("10.0.0.1")), (1, 1));
        drop(master);
        assert_eq!(budget.pending(ip("10.0.0.1")), (0, 0));
    }

    #[test]
    fn a_full_budget_drops_from_the_address_holding_the_most() {
        let budget = Handshakes::new(6, 4);
        let mut kept = Vec::new();
        for n in 0..4 {
            kept.push(budget.admit(ip("192.0.2.7")).0);
            if n < 2 {
                kept.push(budget.admit(ip(&format!("192.0.2.{}", 100 + n))).0);
            }
        }
        assert_eq!(budget.pending(ip("192.0.2.7")), (6, 4));
        let (master, crowded) = budget.admit(ip("198.51.100.1"));
        assert_eq!(
            crowded,
            Some((AddressKey::of(ip("192.0.2.7")), Crowding::Total))
        );
        assert!(!master.is_evicted());
        assert!(kept[0].is_evicted(), "the oldest of the heaviest address");
        assert_eq!(kept.iter().filter(|s| s.is_evicted()).count(), 1);
        assert_eq!(budget.pending(ip("192.0.2.7")), (6, 3));
    }

    #[test]
    fn among_equal_addresses_the_longest_waiting_goes() {
        let budget = Handshakes::new(2, 2);
        let first = budget.admit(ip("10.1.0.1")).0;
        let second = budget.admit(ip("10.1.0.2")).0;
        let (_third, crowded) = budget.admit(ip("10.1.0.3"));
        assert_eq!(
            crowded,
            Some((AddressKey::of(ip("10.1.0.1")), Crowding::Total))
        );
        assert!(first.is_evicted() && !second.is_evicted());
        // A dropped slot gives nothing back twice.
        drop(first);
        assert_eq!(budget.pending(ip("10.1.0.3")), (2, 1));
    }

    #[test]
    fn ipv6_counts_by_64_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            AddressKey::of(ip("2001:db8:1:2:aaaa::1")),
            AddressKey::of(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            AddressKey::of(ip("2001:db8:1:2::1")),
            AddressKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddressKey::of(ip("::ffff:192.0.2.1")),
            AddressKey::of(ip("192.0.2.1"))
        );
        assert_eq!(
            AddressKey::of(ip("2001:db8:1:2::9")).to_string(),
            "2001:db8:1:2::/64"
        );
        let budget = Handshakes::new(10, 2);
        let slots: Vec<_> = (1..=3)
            .map(|n| budget.admit(ip(&format!("2001:db8::{n}"))).0)
            .collect();
        assert!(slots[0].is_evicted(), "one /64 is one address");
    }
}
