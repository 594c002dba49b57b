//! Who may send us pins, and which of their batches are fresh: only listed peers, each
//! batch newer than the last taken from that peer, and close to our own clock.

use std::{collections::HashMap, net::SocketAddr};

/// How far a batch's time may be from ours: a replay older than this is refused even by an
/// agent that just started (and so remembers no sequence number). Also how long a local
/// pin counts as newer than a peer's (see `directory::Recent`). Balancers' clocks must agree
/// to well within it (NTP).
pub const FRESH_NS: u64 = 5_000_000_000;

/// Why a batch from a listed peer is not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// Not newer than the last batch taken from that peer.
    Replayed,
    /// Its time is more than `FRESH_NS` from ours.
    Stale,
}

pub struct Peers {
    /// Per listed peer, the newest sequence number taken.
    last: HashMap<SocketAddr, u64>,
}

impl Peers {
    /// The peers in `listed`; batches sent before `now_ns` (this agent's start) are not
    /// taken, so a restarted agent does not take old batches again.
    pub fn new(listed: &[SocketAddr], now_ns: u64) -> Self {
        Self {
            last: listed
                .iter()
                .map(|p| (*p, now_ns.saturating_sub(1)))
                .collect(),
        }
    }

    pub fn is_listed(&self, from: &SocketAddr) -> bool {
        self.last.contains_key(from)
    }

    /// Takes batch `seq` from `from` (a listed peer whose MAC matched) if it is fresh.
    pub fn take(&mut self, from: &SocketAddr, seq: u64, now_ns: u64) -> Result<(), Stale> {
        let last = self.last.get_mut(from).ok_or(Stale::Replayed)?;
        if seq.abs_diff(now_ns) > FRESH_NS {
            return Err(Stale::Stale);
        }
        if seq <= *last {
            return Err(Stale::Replayed);
        }
        *last = seq;
        Ok(())
    }
}

/// The sequence numbers one sender uses: its clock in Unix nanoseconds, strictly
/// increasing even if the clock steps back or two batches share a nanosecond.
#[derive(Default)]
pub struct Sequence {
    last: u64,
}

impl Sequence {
    pub fn next(&mut self, now_ns: u64) -> u64 {
        self.last = now_ns.max(self.last + 1);
        self.last
    }
}

pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000_000_000;

    #[test]
    fn a_batch_is_taken_once_and_in_order() {
        let a: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        let mut peers = Peers::new(&[a], T0);
        assert_eq!(peers.take(&a, T0 + 10, T0 + 20), Ok(()));
        assert_eq!(peers.take(&a, T0 + 10, T0 + 20), Err(Stale::Replayed));
        assert_eq!(peers.take(&a, T0 + 5, T0 + 20), Err(Stale::Replayed));
        assert_eq!(peers.take(&a, T0 + 11, T0 + 20), Ok(()));
    }

    #[test]
    fn batches_from_before_the_start_or_far_off_the_clock_are_refused() {
        let a: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7946".parse().unwrap();
        let mut peers = Peers::new(&[a], T0);
        assert!(!peers.is_listed(&b));
        assert_eq!(peers.take(&b, T0 + 1, T0 + 1), Err(Stale::Replayed));
        assert_eq!(peers.take(&a, T0 - 1_000, T0 + 1), Err(Stale::Replayed));
        let late = T0 + 2 * FRESH_NS;
        assert_eq!(peers.take(&a, T0 + 1, late), Err(Stale::Stale));
        assert_eq!(peers.take(&a, late + FRESH_NS + 1, late), Err(Stale::Stale));
        assert_eq!(peers.take(&a, late + 1, late), Ok(()));
    }

    #[test]
    fn sequence_numbers_only_grow() {
        let mut seq = Sequence::default();
        let a = seq.next(T0);
        let b = seq.next(T0);
        let c = seq.next(T0 - 5);
        assert!(a < b && b < c);
        assert_eq!(seq.next(T0 + 100), T0 + 100);
    }
}
