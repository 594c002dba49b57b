//! Least connections (`--algo leastconn`): a new flow goes to the backend with the fewest
//! active flows per unit of weight.
//!
//! With direct server return the balancer sees only the client's half of a connection, so
//! "active" is what that half shows: a flow is active from its first packet until the
//! client's FIN or RST, or until it has been idle for long (the agent's periodic walk of
//! `ACTIVE_FLOWS` forgets it and recounts every backend). Each counted flow has one entry
//! in `ACTIVE_FLOWS`; whoever deletes the entry (a FIN, a RST, a reopened 5-tuple, the
//! agent) is the one that uncounts it, so nothing is counted twice.
//!
//! The ring of such a VIP holds (backend id, weight) pairs, one per backend in rotation;
//! the pick reads at most `MAX_LEASTCONN_BACKENDS` counters (a loop the verifier can
//! bound), a window starting at a rotating position: ties go round robin, and a VIP with
//! more backends than the window compares a different window for each new flow, so every
//! backend takes its share.

use aya_ebpf::programs::XdpContext;
use lb_common::{ActiveFlow, FlowKey, MAX_LEASTCONN_BACKENDS, PROTO_TCP, Reason, VipMeta};

use crate::{
    frame::load,
    maps::{ACTIVE_FLOWS, BACKEND_ACTIVE, BACKENDS, RING_SLAB},
    parse::{Packet, TCP_FIN, TCP_RST},
    select::fetch_add,
};

/// A packet of an established flow renews its idle clock at most this often, so a busy
/// flow does not write its entry on every packet.
const RENEW_NS: u64 = 1_000_000_000;

/// The backend with the fewest active flows per weight; `turn` rotates where the scan
/// starts, so equal backends take turns.
#[inline(always)]
pub fn pick(vip: &VipMeta, turn: u64) -> Result<u32, Reason> {
    let n = vip.ring_len / 2;
    if n == 0 {
        return Err(Reason::DropNoBackend);
    }
    let start = (turn % n as u64) as u32;
    let window = n.min(MAX_LEASTCONN_BACKENDS);
    let (mut best, mut best_active, mut best_weight) = (u32::MAX, 0u64, 0u64);
    let mut i = 0;
    while i < MAX_LEASTCONN_BACKENDS {
        if i >= window {
            break;
        }
        let mut j = start + i;
        if j >= n {
            j -= n;
        }
        let at = vip.ring_off + 2 * j;
        let id = *RING_SLAB.get(at).ok_or(Reason::DropNoBackend)?;
        let weight = *RING_SLAB.get(at + 1).ok_or(Reason::DropNoBackend)? as u64;
        let active = active(id);
        // active / weight < best_active / best_weight, without dividing.
        if best == u32::MAX || active * best_weight < best_active * weight {
            (best, best_active, best_weight) = (id, active, weight);
        }
        i += 1;
    }
    if best == u32::MAX {
        Err(Reason::DropNoBackend)
    } else {
        Ok(best)
    }
}

/// A backend's active flows. The count is decremented without a lock, so a decrement that
/// raced the agent's recount may leave it a little below zero: read that as none.
#[inline(always)]
fn active(id: u32) -> u64 {
    let n = BACKEND_ACTIVE.get(id).copied().unwrap_or(0);
    if n > u32::MAX as u64 { 0 } else { n }
}

#[inline(always)]
fn add(id: u32, delta: u64) {
    if let Some(n) = BACKEND_ACTIVE.get_ptr_mut(id) {
        // SAFETY: an array element, valid for the map's lifetime; the add is atomic.
        unsafe { fetch_add(n, delta) };
    }
}

/// A new flow went to `backend_id`: it counts as active there. A 5-tuple that was counted
/// already (a client reusing its source port) stops counting where it was.
#[inline(always)]
pub fn opened(flow: &FlowKey, backend_id: u32, now: u64) {
    let Some(backend) = BACKENDS.get(backend_id) else {
        return;
    };
    if let Some(old) = ACTIVE_FLOWS.get_ptr(flow) {
        // SAFETY: copied out at once; an LRU element stays valid for the run (RCU).
        let old = unsafe { (*old).backend_id };
        if ACTIVE_FLOWS.remove(flow).is_ok() {
            add(old, u64::MAX);
        }
    }
    let entry = ActiveFlow {
        backend_id,
        backend_generation: backend.generation,
        last_seen_ns: now,
    };
    if ACTIVE_FLOWS.insert(flow, &entry, 0).is_ok() {
        add(backend_id, 1);
    }
}

/// A packet of an established flow of a least-connections backend: the client's FIN or RST
/// ends its activity; anything else renews its idle clock.
#[inline(always)]
pub fn seen(ctx: &XdpContext, pkt: &Packet, now: u64) {
    if pkt.flow.proto == PROTO_TCP {
        let flags: u8 = load(ctx, pkt.l4 + 13).unwrap_or(0);
        if flags & (TCP_FIN | TCP_RST) != 0 {
            closed(&pkt.flow);
            return;
        }
    }
    if let Some(entry) = ACTIVE_FLOWS.get_ptr_mut(&pkt.flow) {
        // SAFETY: an LRU element stays valid for the rest of the run (RCU); a racing
        // writer writes a timestamp just as recent.
        let entry = unsafe { &mut *entry };
        if now.saturating_sub(entry.last_seen_ns) > RENEW_NS {
            entry.last_seen_ns = now;
        }
    }
}

#[inline(always)]
fn closed(flow: &FlowKey) {
    let Some(entry) = ACTIVE_FLOWS.get_ptr(flow) else {
        return;
    };
    // SAFETY: as in `opened`.
    let backend_id = unsafe { (*entry).backend_id };
    // Of a FIN and its retransmission, or a FIN and the RST after it, only one deletes.
    if ACTIVE_FLOWS.remove(flow).is_ok() {
        add(backend_id, u64::MAX);
    }
}
