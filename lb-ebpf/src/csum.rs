//! Incremental Internet checksum updates (RFC 1624): a translation changes a few words of
//! a packet, and the checksums that cover them move by the difference alone, never by a
//! pass over the payload.
//!
//! Words are taken exactly as `frame::load` returns them (raw frame bytes in a native
//! integer), checksum fields too: the one's complement sum is the same whatever the byte
//! order, as long as every word and the checksum are read the same way, so nothing here
//! swaps bytes.

use crate::frame::{load, store};
use aya_ebpf::programs::XdpContext;

/// The sum of the differences of the words changed so far: what to add to each checksum
/// that covers them.
#[derive(Clone, Copy, Default)]
pub struct Delta(u64);

impl Delta {
    /// A 32-bit word changed from `old` to `new`.
    #[inline(always)]
    pub fn word(self, old: u32, new: u32) -> Self {
        // !old is -old in one's complement (mod 0xffff), for both 16-bit halves at once.
        Delta(self.0 + u64::from(!old) + u64::from(new))
    }

    /// A 16-bit field changed from `old` to `new`.
    #[inline(always)]
    pub fn half(self, old: u16, new: u16) -> Self {
        Delta(self.0 + u64::from(!old) + u64::from(new))
    }

    /// Two deltas over disjoint words of the same checksummed range.
    #[inline(always)]
    pub fn and(self, other: Delta) -> Self {
        Delta(self.0 + other.0)
    }

    /// The checksum `check` updated by this delta.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u64::from(!check) + self.0)
    }
}

/// The 64-bit sum folded to 16 bits with end-around carries. Bounded: every fold at least
/// halves what is above 16 bits.
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Updates the checksum at `offset` by `delta`; returns the old and new values (a
/// checksum inside a checksummed range moves that range's checksum too).
#[inline(always)]
pub fn update(ctx: &XdpContext, offset: usize, delta: Delta) -> Option<(u16, u16)> {
    let old: u16 = load(ctx, offset)?;
    let new = delta.apply(old);
    store(ctx, offset, new)?;
    Some((old, new))
}

/// Like `update` for a UDP checksum: zero (IPv4's "no checksum") stays zero, and a sum
/// that comes out as zero is sent as all ones (RFC 768).
#[inline(always)]
pub fn update_udp(ctx: &XdpContext, offset: usize, delta: Delta) -> Option<(u16, u16)> {
    let old: u16 = load(ctx, offset)?;
    if old == 0 {
        return Some((0, 0));
    }
    let mut new = delta.apply(old);
    if new == 0 {
        new = 0xffff;
    }
    store(ctx, offset, new)?;
    Some((old, new))
}
