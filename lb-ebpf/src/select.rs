//! Select: the backend of a packet, from the flow table or, for a new flow, from the VIP's
//! ring (round robin or Maglev hash), remembered in the flow table.

use core::arch::asm;

use lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, Backend, FlowKey, FlowValue, Reason, VIP_F_HASH,
    VipMeta, flow_hash,
};

use crate::{
    count,
    maps::{BACKEND_STATS, BACKENDS, FLOWS, RING_SLAB, RR_CURSOR, VIP_STATS},
    policy,
};

/// The backend an established flow is pinned to, if it still keeps flows (it is in use and
/// healthy, also while it drains) and its id was not given to another server since. A
/// removed or failed backend's flows find `None` and are balanced afresh by `new_flow`.
#[inline(always)]
pub fn established(flow: &FlowKey) -> Option<(u32, &'static Backend)> {
    // SAFETY: the value is copied out at once; an LRU element stays valid for the rest of
    // the run (RCU), and a racing update rewrites both words of a value that was valid.
    let pinned = unsafe { *FLOWS.get_ptr(flow)? };
    let backend = BACKENDS.get(pinned.backend_id)?;
    let keep = BACKEND_F_IN_USE | BACKEND_F_KEEP_FLOWS;
    if backend.flags & keep == keep && backend.generation == pinned.backend_generation {
        return Some((pinned.backend_id, backend));
    }
    None
}

/// A backend for a new flow (within the source's rate limit) from the VIP's ring, pinned in
/// the flow table. A TCP SYN always comes here, even when its 5-tuple is still in the table
/// (a client reusing a source port): it is a new connection, balanced afresh, so it never
/// lands on a backend that drains or left the ring since.
#[inline(always)]
pub fn new_flow(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, &'static Backend), Reason> {
    policy::rate_limit(flow, vip)?;
    let backend_id = pick_from_ring(flow, vip)?;
    let backend = BACKENDS.get(backend_id).ok_or(Reason::DropNoBackend)?;
    if backend.flags & BACKEND_F_IN_USE == 0 {
        return Err(Reason::DropNoBackend);
    }
    let pinned = FlowValue {
        backend_id,
        backend_generation: backend.generation,
    };
    // A full table evicts the least recently used flow; insert cannot fail otherwise.
    let _ = FLOWS.insert(flow, &pinned, 0);
    crate::share::flow_pinned(flow, &pinned);
    count::new_flow(&VIP_STATS, vip.vip_id);
    count::new_flow(&BACKEND_STATS, backend_id);
    Ok((backend_id, backend))
}

/// Round robin takes ring entries in turn (one shared cursor per VIP, so the order holds
/// across CPUs); hash mode takes the entry the flow hashes to (Maglev).
#[inline(always)]
pub fn pick_from_ring(flow: &FlowKey, vip: &VipMeta) -> Result<u32, Reason> {
    if vip.ring_len == 0 {
        return Err(Reason::DropNoBackend);
    }
    let slot = if vip.flags & VIP_F_HASH != 0 {
        flow_hash(flow) % vip.ring_len
    } else {
        let cursor = RR_CURSOR
            .get_ptr_mut(vip.vip_id)
            .ok_or(Reason::DropNoBackend)?;
        // SAFETY: an array element, valid for the map's lifetime; the add is atomic.
        let turn = unsafe { fetch_add(cursor, 1) };
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
unsafe fn fetch_add(ptr: *mut u64, value: u64) -> u64 {
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
