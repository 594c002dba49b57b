//! Flow sharing: a new flow's pin goes to the agent through a ring buffer, for the peer
//! balancers (lb-userspace/src/flowsync). A balancer that shares nothing pays one array
//! read per new flow; a full ring loses the event, counted, never the packet.

use lb_common::{FLOW_SHARE_ON, FlowEvent, FlowKey, FlowValue};

use crate::maps::{FLOW_EVENTS, FLOW_SHARE, FLOW_SHARE_DROPS};

#[inline(always)]
pub fn flow_pinned(flow: &FlowKey, pinned: &FlowValue) {
    if FLOW_SHARE.get(FLOW_SHARE_ON).copied().unwrap_or(0) == 0 {
        return;
    }
    let event = FlowEvent {
        flow: *flow,
        backend_id: pinned.backend_id,
        backend_generation: pinned.backend_generation,
    };
    if FLOW_EVENTS.output(&event, 0).is_err()
        && let Some(drops) = FLOW_SHARE_DROPS.get_ptr_mut(0)
    {
        // SAFETY: a per-CPU array element, valid for the map's lifetime and written only
        // by this CPU.
        unsafe { *drops += 1 };
    }
}
