//! Expiring translations: the data plane makes them (two entries per flow, see
//! lb-ebpf/src/nat.rs), the agent removes them, both halves together, when the flow has
//! been idle for its protocol's time, and the halves a race left alone.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::Result;
use lb_common::{FlowKey, NAT_F_FIN, NAT_F_RST, NatEntry, PROTO_TCP, nat_reverse_key};

use crate::kernel::datapath::NatTables;

/// How long a translation lives after the last packet either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// An established TCP connection: long, as a pooled connection may sit quiet.
    pub tcp: Duration,
    /// A TCP connection one side has closed (a FIN one way).
    pub tcp_closing: Duration,
    /// A TCP connection closed both ways or reset: soon, but not at once, so the last ACK
    /// and retransmitted FINs still find it.
    pub tcp_closed: Duration,
    pub udp: Duration,
    /// A half whose other half is missing or points elsewhere (two CPUs raced on a flow's
    /// first packets, or the flow moved to another backend) is removed after this long
    /// without packets: a new translation's halves are written one after the other.
    pub orphan: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp: Duration::from_secs(3600),
            tcp_closing: Duration::from_secs(120),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            orphan: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    /// The idle time after which a flow with these flags (both directions') expires.
    pub fn for_flow(&self, proto: u8, fwd_flags: u32, rev_flags: u32) -> Duration {
        if proto != PROTO_TCP {
            return self.udp;
        }
        let any = fwd_flags | rev_flags;
        if any & NAT_F_RST != 0 || (fwd_flags & NAT_F_FIN != 0 && rev_flags & NAT_F_FIN != 0) {
            self.tcp_closed
        } else if any & NAT_F_FIN != 0 {
            self.tcp_closing
        } else {
            self.tcp
        }
    }
}

/// What one sweep found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Translations (pairs) left in place.
    pub live: u64,
    /// Translations removed for idleness.
    pub expired: u64,
    /// Lone halves removed.
    pub orphans: u64,
}

/// What to do with one table entry, from both tables' contents.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Remove this forward entry and its reverse one.
    Expire,
    /// Remove this entry alone: its other half is gone or belongs to another flow.
    Orphan,
}

fn idle(now_ns: u64, last_ns: u64) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(last_ns))
}

/// The fate of the forward entry `key` -> `fwd`, given its reverse entry if any.
pub fn judge_forward(
    key: &FlowKey,
    fwd: &NatEntry,
    rev: Option<&NatEntry>,
    now_ns: u64,
    t: &Timeouts,
) -> Verdict {
    match rev {
        Some(rev) if nat_reverse_key(&rev.to) == *key => {
            let last = fwd.last_seen_ns.max(rev.last_seen_ns);
            if idle(now_ns, last) > t.for_flow(key.proto, fwd.flags, rev.flags) {
                Verdict::Expire
            } else {
                Verdict::Keep
            }
        }
        _ if idle(now_ns, fwd.last_seen_ns) > t.orphan => Verdict::Orphan,
        _ => Verdict::Keep,
    }
}

/// One pass over both tables: the forward table first, then the reverse one, so that a
/// forward entry read always has its reverse half in the second read (it is written
/// first), unless that half was removed.
pub fn sweep(tables: &mut NatTables, now_ns: u64, t: &Timeouts) -> Result<Swept> {
    let fwd = NatTables::read(&tables.fwd)?;
    let rev: HashMap<FlowKey, NatEntry> = NatTables::read(&tables.rev)?.into_iter().collect();
    let mut swept = Swept::default();
    let mut paired = HashSet::new();
    for (key, entry) in &fwd {
        let rev_key = nat_reverse_key(&entry.to);
        let verdict = judge_forward(key, entry, rev.get(&rev_key), now_ns, t);
        if verdict != Verdict::Orphan {
            paired.insert(rev_key);
        }
        match verdict {
            Verdict::Keep => swept.live += 1,
            Verdict::Expire => {
                // Gone already (another sweep) is as good.
                let _ = tables.fwd.remove(key);
                let _ = tables.rev.remove(&rev_key);
                swept.expired += 1;
            }
            Verdict::Orphan => {
                let _ = tables.fwd.remove(key);
                swept.orphans += 1;
            }
        }
    }
    for (key, entry) in &rev {
        if !paired.contains(key) && idle(now_ns, entry.last_seen_ns) > t.orphan {
            let _ = tables.rev.remove(key);
            swept.orphans += 1;
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FAMILY_V4, PROTO_UDP};

    const S: u64 = 1_000_000_000;

    fn key(a: u32, b: u32, sp: u16, dp: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: [a, 0, 0, 0],
            dst: [b, 0, 0, 0],
            sport: sp,
            dport: dp,
            proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// A client flow, its translation and the reverse entry, last seen at `fwd_s` and
    /// `rev_s` seconds with these flags.
    fn pair(proto: u8, fwd: (u64, u32), rev: (u64, u32)) -> (FlowKey, NatEntry, NatEntry) {
        let client = key(1, 2, 40000, 80, proto);
        let to = key(3, 4, 1024, 80, proto);
        let f = NatEntry {
            to,
            last_seen_ns: fwd.0 * S,
            flags: fwd.1,
            ..Default::default()
        };
        let r = NatEntry {
            to: nat_reverse_key(&client),
            last_seen_ns: rev.0 * S,
            flags: rev.1,
            ..Default::default()
        };
        (client, f, r)
    }

    #[test]
    fn each_state_of_a_flow_has_its_idle_time() {
        let t = Timeouts::default();
        let cases = [
            // (proto, fwd (seen, flags), rev (seen, flags), now, verdict)
            (PROTO_TCP, (0, 0), (100, 0), 3000, Verdict::Keep),
            (PROTO_TCP, (0, 0), (100, 0), 3701, Verdict::Expire),
            (PROTO_TCP, (100, NAT_F_FIN), (100, 0), 200, Verdict::Keep),
            (PROTO_TCP, (100, NAT_F_FIN), (100, 0), 221, Verdict::Expire),
            (
                PROTO_TCP,
                (100, NAT_F_FIN),
                (100, NAT_F_FIN),
                105,
                Verdict::Keep,
            ),
            (
                PROTO_TCP,
                (100, NAT_F_FIN),
                (100, NAT_F_FIN),
                111,
                Verdict::Expire,
            ),
            (PROTO_TCP, (100, 0), (100, NAT_F_RST), 111, Verdict::Expire),
            (PROTO_UDP, (100, 0), (0, 0), 159, Verdict::Keep),
            (PROTO_UDP, (100, 0), (0, 0), 161, Verdict::Expire),
        ];
        for (proto, f, r, now, want) in cases {
            let (client, fwd, rev) = pair(proto, f, r);
            assert_eq!(
                judge_forward(&client, &fwd, Some(&rev), now * S, &t),
                want,
                "{proto} {f:?} {r:?} at {now}"
            );
        }
    }

    /// A forward entry whose reverse half is missing or belongs to another flow is removed
    /// alone, and only once it has been quiet a while (its reverse may be a moment old).
    #[test]
    fn lone_halves_go_after_a_grace() {
        let t = Timeouts::default();
        let (client, fwd, mut rev) = pair(PROTO_TCP, (100, 0), (100, 0));
        assert_eq!(
            judge_forward(&client, &fwd, None, 105 * S, &t),
            Verdict::Keep
        );
        assert_eq!(
            judge_forward(&client, &fwd, None, 111 * S, &t),
            Verdict::Orphan
        );
        rev.to.sport = 1; // another client's
        assert_eq!(
            judge_forward(&client, &fwd, Some(&rev), 111 * S, &t),
            Verdict::Orphan
        );
    }
}
