//! Transmit: direct server return at L2. Only the MACs change, so no checksum needs
//! touching; the frame leaves by XDP_TX when the backend is behind the interface it came
//! in on, else by XDP_REDIRECT through the devmap. A tunnel backend's packet gets its outer
//! header first (`tunnel`); the MACs are then the next hop's.

use aya_ebpf::programs::XdpContext;
use lb_common::{BACKEND_F_RESOLVED, BACKEND_F_TUNNEL, Backend, Reason, xdp};

use crate::{frame::store, maps::TX_PORTS, parse::Packet, tunnel};

/// Sends the frame to `backend`, or hands it to the host while its MAC is unknown.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, backend: &Backend) -> Result<u32, Reason> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Reason::PassNoNeigh);
    }
    if backend.flags & BACKEND_F_TUNNEL != 0 {
        tunnel::encapsulate(ctx, pkt, backend)?;
    }
    send(ctx, backend)
}

/// Sends the frame as it is (a NAT backend's, already translated) to `backend`, or hands
/// it to the host while its MAC is unknown; no tunnel path for the verifier to walk.
#[inline(always)]
pub fn forward_as_is(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Reason::PassNoNeigh);
    }
    send(ctx, backend)
}

/// The MACs of `backend`'s next hop, then XDP_TX or XDP_REDIRECT.
#[inline(always)]
fn send(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    rewrite_macs(ctx, backend)?;
    if backend.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(xdp::TX);
    }
    match TX_PORTS.redirect(backend.ifindex, 0) {
        Ok(xdp::REDIRECT) => Ok(xdp::REDIRECT),
        _ => Err(Reason::DropRedirectFailed),
    }
}

#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, backend: &Backend) -> Result<(), Reason> {
    let [d0, d1, d2, d3, d4, d5] = backend.mac;
    let [s0, s1, s2, s3, s4, s5] = backend.src_mac;
    // Checked once for all four stores: the frame holds at least the Ethernet header.
    store(ctx, 10, u16::from_ne_bytes([s4, s5])).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 0, u32::from_ne_bytes([d0, d1, d2, d3])).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 4, u16::from_ne_bytes([d4, d5])).ok_or(Reason::DropTruncatedL3)?;
    store(ctx, 6, u32::from_ne_bytes([s0, s1, s2, s3])).ok_or(Reason::DropTruncatedL3)
}
