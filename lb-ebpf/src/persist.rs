//! Source affinity (`--persist SECONDS`, IPVS persistence, HAProxy `balance source` with a
//! stick table): a client's new flows go to the backend its earlier flows went to, while
//! that backend keeps flows (up, draining or at weight 0, but not failed or removed) and
//! for `persist_ns` after the client's last new flow. A client is a source address, or for
//! IPv6 a source prefix (`persist_mask6`), at one VIP.
//!
//! Stored per client in an LRU map: only new flows read and write it, so established flows
//! never pay for it. On a Maglev VIP a client that is not remembered (or one this balancer
//! never saw) hashes by its source alone, so every balancer of a fleet sends it to the
//! same backend.

use lb_common::{
    BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, FAMILY_V6, FlowKey, PersistValue, RateKey, VipMeta,
    flow_hash,
};

use crate::maps::{BACKENDS, PERSIST, PERSIST_STATS};

/// The client a flow belongs to at its VIP: its source, an IPv6 one cut to the prefix.
#[inline(always)]
pub fn client(flow: &FlowKey, vip: &VipMeta) -> RateKey {
    let mut addr = flow.src;
    if flow.family == FAMILY_V6 {
        addr[0] &= vip.persist_mask6[0];
        addr[1] &= vip.persist_mask6[1];
        addr[2] &= vip.persist_mask6[2];
        addr[3] &= vip.persist_mask6[3];
    }
    RateKey {
        addr,
        vip_id: vip.vip_id,
        family: flow.family,
        _pad: [0; 3],
    }
}

/// The hash a Maglev VIP with affinity places a client by: its source alone.
#[inline(always)]
pub fn source_hash(flow: &FlowKey, vip: &VipMeta) -> u32 {
    let c = client(flow, vip);
    flow_hash(&FlowKey {
        src: c.addr,
        family: c.family,
        ..FlowKey::default()
    })
}

/// The backend the client is bound to, if it opened a flow within `persist_ns` and that
/// backend still keeps flows (the same server: its generation has not moved on).
#[inline(always)]
pub fn remembered(client: &RateKey, vip: &VipMeta, now: u64) -> Option<u32> {
    // SAFETY: copied out at once; an LRU element stays valid for the rest of the run.
    let bound = unsafe { *PERSIST.get_ptr(client)? };
    if now.saturating_sub(bound.last_seen_ns) > vip.persist_ns {
        return None;
    }
    let backend = BACKENDS.get(bound.backend_id)?;
    let keep = BACKEND_F_IN_USE | BACKEND_F_KEEP_FLOWS;
    if backend.flags & keep != keep
        || backend.generation != bound.backend_generation
        || backend.vip_id != vip.vip_id
    {
        return None;
    }
    Some(bound.backend_id)
}

/// Binds the client to `backend_id` from `now` on (or renews its binding).
#[inline(always)]
pub fn remember(client: &RateKey, backend_id: u32, now: u64) {
    let Some(backend) = BACKENDS.get(backend_id) else {
        return;
    };
    let bound = PersistValue {
        backend_id,
        backend_generation: backend.generation,
        last_seen_ns: now,
    };
    // A full map forgets the least recently seen client; insert cannot fail otherwise.
    let _ = PERSIST.insert(client, &bound, 0);
}

/// One new flow of `vip_id` that followed its client's affinity.
#[inline(always)]
pub fn count_followed(vip_id: u32) {
    if let Some(c) = PERSIST_STATS.get_ptr_mut(vip_id) {
        // SAFETY: a per-CPU array element is this CPU's alone while the program runs.
        unsafe { *c += 1 };
    }
}
