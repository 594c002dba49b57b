//! Select: the backend of a packet, from the flow table or, for a new flow, from the VIP's
//! ring (round robin or Maglev hash), remembered in the flow table.

use core::arch::asm;

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, Backend, FLOW_F_HANDSHAKE, FlowKey, FlowValue, Reason,
    VIP_F_HASH, VIP_F_LEASTCONN, VipMeta, flow_hash,
};

use crate::{
    count, leastconn,
    maps::{BACKEND_STATS, BACKENDS, FLOWS, RING_SLAB, RR_CURSOR, VIP_STATS},
    persist, policy,
};

/// The backend a flow is pinned to, if it still keeps flows (it is in use and healthy,
/// also while it drains) and its id was not given to another server since. A removed or
/// failed backend's flows find `None` and are balanced afresh by `new_flow`.
///
/// A SYN finds its flow only while the flow is in its handshake (a retransmitted SYN keeps
/// its backend); a SYN for a flow past its handshake is a new connection reusing the
/// ports, balanced afresh. The first other packet of a flow ends its handshake: one write,
/// once per flow.
#[inline(always)]
pub fn established(flow: &FlowKey, syn: bool) -> Option<(u32, &'static Backend)> {
    let entry = FLOWS.get_ptr_mut(flow)?;
    // SAFETY: the value is copied out at once; an LRU element stays valid for the rest of
    // the run (RCU), and a racing update rewrites both words of a value that was valid.
    let pinned = unsafe { *entry };
    if syn && !pinned.in_handshake() {
        return None;
    }
    let backend = pinned_backend(&pinned)?;
    if !syn && pinned.in_handshake() {
        // SAFETY: as above; one aligned 32-bit store, and a racing writer stores a value
        // that is just as valid.
        unsafe { (*entry).backend_generation = pinned.generation() };
    }
    Some((pinned.backend_id, backend))
}

/// The backend of a pinned flow, if it still keeps the flow: the one check of established
/// packets and of ICMP errors about a flow.
#[inline(always)]
pub fn pinned_backend(pinned: &FlowValue) -> Option<&'static Backend> {
    let backend = BACKENDS.get(pinned.backend_id)?;
    let keep = BACKEND_F_IN_USE | BACKEND_F_KEEP_FLOWS;
    if backend.flags & keep == keep && backend.generation == pinned.generation() {
        return Some(backend);
    }
    None
}

/// A backend for a new flow (within the source's rate limit and the VIP's ceiling) from
/// the VIP's ring, pinned in the flow table; a flow opened by a SYN is marked as in its
/// handshake (see `established`).
#[inline(always)]
pub fn new_flow(
    flow: &FlowKey,
    vip: &VipMeta,
    syn: bool,
) -> Result<(u32, &'static Backend), Reason> {
    policy::rate_limit(flow, vip)?;
    policy::vip_ceiling(vip)?;
    let backend_id = pick_for_new_flow(flow, vip)?;
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropNoBackend)?;
    if backend.flags & BACKEND_F_IN_USE == 0 {
        return Err(Reason::DropNoBackend);
    }
    let handshake = if syn { FLOW_F_HANDSHAKE } else { 0 };
    let pinned = FlowValue {
        backend_id,
        backend_generation: backend.generation | handshake,
    };
    // A full table evicts the least recently used flow; insert cannot fail otherwise.
    let _ = FLOWS.insert(flow, &pinned, 0);
    crate::share::flow_pinned(flow, &pinned);
    count::new_flow(&VIP_STATS, vip.vip_id);
    count::new_flow(&BACKEND_STATS, backend_id);
    Ok((backend_id, backend))
}

/// The backend of a new flow: the client's remembered one on a VIP with affinity (even a
/// draining one, and even while the ring is empty), else one from the ring; the choice is
/// remembered, and on a least-connections VIP counted as active.
#[inline(always)]
pub fn pick_for_new_flow(flow: &FlowKey, vip: &VipMeta) -> Result<u32, Reason> {
    let persists = vip.persist_ns != 0;
    let leastconn = vip.flags & VIP_F_LEASTCONN != 0;
    if !persists && !leastconn {
        return pick_from_ring(flow, vip);
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let backend_id = if persists {
        let client = persist::client(flow, vip);
        let backend_id = match persist::remembered(&client, vip, now) {
            Some(id) => {
                persist::count_followed(vip.vip_id);
                id
            }
            None => pick_from_ring(flow, vip)?,
        };
        persist::remember(&client, backend_id, now);
        backend_id
    } else {
        pick_from_ring(flow, vip)?
    };
    if leastconn {
        leastconn::opened(flow, backend_id, now);
    }
    Ok(backend_id)
}

/// Round robin takes ring entries in turn (one shared cursor per VIP, so the order holds
/// across CPUs); hash mode takes the entry the flow hashes to (Maglev), or with affinity the
/// entry its source hashes to; least connections compares the ring's backends.
#[inline(always)]
pub fn pick_from_ring(flow: &FlowKey, vip: &VipMeta) -> Result<u32, Reason> {
    if vip.ring_len == 0 {
        return Err(Reason::DropNoBackend);
    }
    let slot = if vip.flags & VIP_F_HASH != 0 {
        let hash = if vip.persist_ns != 0 {
            persist::source_hash(flow, vip)
        } else {
            flow_hash(flow)
        };
        hash % vip.ring_len
    } else {
        let cursor = RR_CURSOR
            .get_ptr_mut(vip.vip_id)
            .ok_or(Reason::DropNoBackend)?;
        // SAFETY: an array element, valid for the map's lifetime; the add is atomic.
        let turn = unsafe { fetch_add(cursor, 1) };
        if vip.flags & VIP_F_LEASTCONN != 0 {
            return leastconn::pick(vip, turn);
        }
        (turn % vip.ring_len as u64) as u32
    };
    RING_SLAB
        .get(vip.ring_off + slot)
        .copied()
        .ok_or(Reason::DropNoBackend)
}

/// Atomic fetch-and-add. rustc hands bpf-linker the "generic" CPU, for which LLVM refuses
/// to use the old value of an atomic add, although every kernel this runs on (5.12+) has
/// the BPF_FETCH instruction; aya-build owns the rustflags, so the instruction is spelled
/// out here instead.
///
/// # Safety
/// `ptr` must point to a u64 in map memory.
#[inline(always)]
pub(crate) unsafe fn fetch_add(ptr: *mut u64, value: u64) -> u64 {
    let mut old = value;
    unsafe {
        asm!(
            "{old} = atomic_fetch_add((u64 *)({ptr} + 0), {old})",
            ptr = in(reg) ptr,
            old = inout(reg) old,
            options(nostack),
        );
    }
    old
}
