//! Translating pins between balancers: this balancer's backend ids mean nothing to a peer,
//! so a pin travels as addresses (VIP from the flow, backend address) and each side maps
//! it to and from its own ids. Also which local pins are newer than a peer's.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use lb_common::{FlowEvent, FlowKey, FlowValue, VipKey};

use super::wire::Pin;

/// Why a peer's pin is not installed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// This balancer does not serve the flow's VIP.
    NoVip,
    /// The VIP here has no backend at that address.
    NoBackend,
    /// This balancer pinned the flow itself after the peer's batch was sent.
    LocalNewer,
}

/// Backend ids and addresses of every VIP, as of one state version.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    pub version: u64,
    /// id -> (generation, address), for this balancer's own events.
    by_id: HashMap<u32, (u32, IpAddr)>,
    /// (VIP, backend address) -> the pin's value here, for peers' pins.
    by_addr: HashMap<(VipKey, IpAddr), FlowValue>,
    vips: std::collections::HashSet<VipKey>,
}

/// The VIP a flow is for: its destination.
pub fn vip_of(flow: &FlowKey) -> VipKey {
    VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    }
}

impl Directory {
    pub fn new(version: u64) -> Self {
        Self {
            version,
            ..Default::default()
        }
    }

    pub fn add_vip(&mut self, vip: VipKey) {
        self.vips.insert(vip);
    }

    pub fn add_backend(&mut self, vip: VipKey, addr: IpAddr, id: u32, generation: u32) {
        self.vips.insert(vip);
        self.by_id.insert(id, (generation, addr));
        self.by_addr.insert(
            (vip, addr),
            FlowValue {
                backend_id: id,
                backend_generation: generation,
            },
        );
    }

    /// The pin a local event means to peers; None if its backend id is not (or no longer)
    /// the one this directory knows. A flow opened by a SYN carries the handshake bit
    /// beside its generation (`lb_common::FLOW_F_HANDSHAKE`): compared without it.
    pub fn outgoing(&self, event: &FlowEvent) -> Option<Pin> {
        let (generation, addr) = self.by_id.get(&event.backend_id)?;
        (*generation == event.backend_generation & lb_common::GENERATION_MASK).then_some(Pin {
            flow: event.flow,
            backend: *addr,
        })
    }

    /// A peer's pin in this balancer's ids.
    pub fn incoming(&self, pin: &Pin) -> Result<FlowValue, Skip> {
        let vip = vip_of(&pin.flow);
        if !self.vips.contains(&vip) {
            return Err(Skip::NoVip);
        }
        self.by_addr
            .get(&(vip, pin.backend))
            .copied()
            .ok_or(Skip::NoBackend)
    }
}

/// The flows this balancer pinned in the last `peers::FRESH_NS`, with when: a peer's batch
/// sent before a local pin of the same flow must not replace it (a client that reused its
/// port opened a new connection here). Older local pins need no record, since batches
/// older than that are refused as stale.
#[derive(Default)]
pub struct Recent {
    at: HashMap<FlowKey, u64>,
    order: VecDeque<(u64, FlowKey)>,
}

impl Recent {
    pub fn pinned_here(&mut self, flow: FlowKey, now_ns: u64) {
        self.at.insert(flow, now_ns);
        self.order.push_back((now_ns, flow));
    }

    /// Whether this balancer pinned `flow` after `sent_ns`.
    pub fn newer_than(&self, flow: &FlowKey, sent_ns: u64) -> bool {
        self.at.get(flow).is_some_and(|&t| t > sent_ns)
    }

    /// Forgets local pins older than `horizon_ns`.
    pub fn expire(&mut self, horizon_ns: u64) {
        while let Some(&(t, flow)) = self.order.front() {
            if t >= horizon_ns {
                break;
            }
            self.order.pop_front();
            if self.at.get(&flow) == Some(&t) {
                self.at.remove(&flow);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{PROTO_TCP, addr_to_map};

    use super::*;

    fn vip(last: u8) -> VipKey {
        let (addr, family) = addr_to_map(IpAddr::from([10, 99, 1, last]));
        VipKey {
            addr,
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family,
        }
    }

    fn flow(to: VipKey, sport: u16) -> FlowKey {
        FlowKey {
            src: addr_to_map(IpAddr::from([10, 99, 0, 1])).0,
            dst: to.addr,
            sport: sport.to_be(),
            dport: to.port,
            proto: to.proto,
            family: to.family,
            _pad: [0; 2],
        }
    }

    #[test]
    fn a_pin_crosses_over_by_address_into_local_ids() {
        let b1 = IpAddr::from([10, 99, 0, 11]);
        let b2 = IpAddr::from([10, 99, 0, 12]);
        // Here the backends have other ids than on the sender.
        let mut sender = Directory::new(1);
        sender.add_backend(vip(1), b1, 0, 1);
        sender.add_backend(vip(1), b2, 1, 1);
        let mut receiver = Directory::new(1);
        receiver.add_backend(vip(1), b2, 5, 3);
        receiver.add_backend(vip(1), b1, 6, 2);

        let event = FlowEvent {
            flow: flow(vip(1), 40_000),
            backend_id: 1,
            backend_generation: 1,
        };
        let pin = sender.outgoing(&event).unwrap();
        assert_eq!(pin.backend, b2);
        // A flow still in its handshake (opened by a SYN) is the same pin.
        let syn = FlowEvent {
            backend_generation: 1 | lb_common::FLOW_F_HANDSHAKE,
            ..event
        };
        assert_eq!(sender.outgoing(&syn), Some(pin));
        let value = receiver.incoming(&pin).unwrap();
        assert_eq!((value.backend_id, value.backend_generation), (5, 3));

        // An id reused since the event was made is not translated.
        let stale = FlowEvent {
            backend_generation: 0,
            ..event
        };
        assert_eq!(sender.outgoing(&stale), None);
    }

    #[test]
    fn pins_of_unknown_vips_and_backends_are_skipped() {
        let mut dir = Directory::new(1);
        dir.add_backend(vip(1), IpAddr::from([10, 99, 0, 11]), 0, 1);
        dir.add_vip(vip(2));
        let pin = |to, backend| Pin {
            flow: flow(to, 1),
            backend,
        };
        assert_eq!(
            dir.incoming(&pin(vip(3), IpAddr::from([10, 99, 0, 11]))),
            Err(Skip::NoVip)
        );
        assert_eq!(
            dir.incoming(&pin(vip(2), IpAddr::from([10, 99, 0, 11]))),
            Err(Skip::NoBackend)
        );
        assert_eq!(
            dir.incoming(&pin(vip(1), IpAddr::from([10, 99, 0, 13]))),
            Err(Skip::NoBackend)
        );
    }

    #[test]
    fn a_local_pin_is_newer_than_batches_sent_before_it_until_it_expires() {
        let mut recent = Recent::default();
        let f = flow(vip(1), 1);
        recent.pinned_here(f, 100);
        assert!(recent.newer_than(&f, 99));
        assert!(!recent.newer_than(&f, 100));
        assert!(!recent.newer_than(&flow(vip(1), 2), 0));
        recent.pinned_here(f, 200);
        recent.expire(150);
        assert!(recent.newer_than(&f, 150), "the later pin is kept");
        recent.expire(201);
        assert!(recent.is_empty());
    }
}
