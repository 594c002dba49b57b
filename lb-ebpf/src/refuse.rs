//! A fast refusal: a TCP SYN to a VIP with no backend in rotation is answered with a RST
//! from XDP (as a closed port would answer), so the client's connect fails at once instead
//! of waiting out its timeout. Anything else to such a VIP is dropped (`drop_no_backend`).
//!
//! The SYN is turned into the RST in place: MACs, addresses and ports swapped, the frame
//! cut to a bare 20-byte TCP header (the SYN's options and any payload go), both checksums
//! computed afresh over fixed-size headers.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use lb_common::{FAMILY_V4, PROTO_TCP, Reason, xdp};

use crate::{
    frame::{load, store},
    icmp::swap_macs,
    parse::Packet,
};

const TCP_HLEN: usize = 20;
const IPV4_HLEN: usize = 20;
/// Data offset 5 words; flags RST and ACK (RFC 9293: a segment without ACK is answered
/// with sequence number 0 and ACK of everything it occupied).
const OFF_FLAGS_RST_ACK: u16 = (5 << 12) | 0x14;
const REPLY_TTL: u8 = 64;

/// Answers the SYN in `pkt` with a RST back out of the interface it came in on.
#[inline(always)]
pub fn reset(ctx: &XdpContext, pkt: &Packet) -> Result<(u32, Reason), Reason> {
    let l4 = pkt.l4;
    let seq: u32 = load(ctx, l4 + 4).ok_or(Reason::DropNoBackend)?;
    let off: u8 = load(ctx, l4 + 12).ok_or(Reason::DropNoBackend)?;
    let header = ((off >> 4) as usize) * 4;
    if header < TCP_HLEN || l4 + header > pkt.ip_end {
        return Err(Reason::DropNoBackend);
    }
    // The SYN occupies one sequence number, its payload (if any) the rest.
    let seg_len = (pkt.ip_end - l4 - header) as u32 + 1;
    let ack = u32::from_be(seq).wrapping_add(seg_len).to_be();
    let (src, dst, sport, dport) = (pkt.flow.dst, pkt.flow.src, pkt.flow.dport, pkt.flow.sport);
    let frame_len = ctx.data_end() - ctx.data();
    let delta = (l4 + TCP_HLEN) as i32 - frame_len as i32;
    // SAFETY: the helper only moves the frame's end within what the driver allows; every
    // later access is bounds-checked against the new end.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Reason::DropNoBackend);
    }
    let v4 = pkt.flow.family == FAMILY_V4;
    let mut sum = 0u32;
    let addr_words = if v4 { 1 } else { 4 };
    let mut i = 0;
    while i < 4 {
        if i < addr_words {
            sum = add_word(add_word(sum, src[i]), dst[i]);
        }
        i += 1;
    }
    let l3 = pkt.l3;
    // Raw words, as they sit in the frame (`from_ne_bytes` of the bytes on the wire).
    if v4 {
        let ver_len = u32::from_ne_bytes([0x45, 0, 0, (IPV4_HLEN + TCP_HLEN) as u8]);
        // Identification 0, don't fragment (as the kernel's own RSTs).
        let id_frag = u32::from_ne_bytes([0, 0, 0x40, 0]);
        let ttl_proto = u32::from_ne_bytes([REPLY_TTL, PROTO_TCP, 0, 0]);
        let header = add_word(add_word(add_word(sum, ver_len), id_frag), ttl_proto);
        let [c0, c1] = fold(header).to_ne_bytes();
        let w = |at: usize, v: u32| store(ctx, l3 + at, v).ok_or(Reason::DropTruncatedL3);
        w(0, ver_len)?;
        w(4, id_frag)?;
        w(8, u32::from_ne_bytes([REPLY_TTL, PROTO_TCP, c0, c1]))?;
        w(12, src[0])?;
        w(16, dst[0])?;
    } else {
        let w = |at: usize, v: u32| store(ctx, l3 + at, v).ok_or(Reason::DropTruncatedL3);
        w(
            4,
            u32::from_ne_bytes([0, TCP_HLEN as u8, PROTO_TCP, REPLY_TTL]),
        )?;
        let mut i = 0;
        while i < 4 {
            w(8 + 4 * i, src[i])?;
            w(24 + 4 * i, dst[i])?;
            i += 1;
        }
    }
    // The TCP pseudo-header: addresses (summed above), protocol and TCP length.
    sum = add_word(sum, u32::from_ne_bytes([0, PROTO_TCP, 0, TCP_HLEN as u8]));
    let ports = u32::from_ne_bytes(concat(sport.to_ne_bytes(), dport.to_ne_bytes()));
    // Data offset and flags, then a zero window.
    let flags = u32::from_ne_bytes(concat(OFF_FLAGS_RST_ACK.to_be_bytes(), [0, 0]));
    sum = add_word(add_word(add_word(sum, ports), ack), flags);
    let [c0, c1] = fold(sum).to_ne_bytes();
    let w = |at: usize, v: u32| store(ctx, l4 + at, v).ok_or(Reason::DropTruncatedL4);
    w(0, ports)?;
    w(4, 0)?;
    w(8, ack)?;
    w(12, flags)?;
    w(16, u32::from_ne_bytes([c0, c1, 0, 0]))?;
    swap_macs(ctx).ok_or(Reason::DropTruncatedL3)?;
    Ok((xdp::TX, Reason::ResetNoBackend))
}

/// Adds a word of raw (network-order) bytes to a ones' complement sum of 16-bit halves; the
/// byte order of the halves does not matter as long as the result is stored the same way.
#[inline(always)]
pub(crate) fn add_word(sum: u32, word: u32) -> u32 {
    let s = sum as u64 + (word & 0xffff) as u64 + (word >> 16) as u64;
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

/// The checksum of a sum: folded to 16 bits and inverted.
#[inline(always)]
pub(crate) fn fold(sum: u32) -> u16 {
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn concat(a: [u8; 2], b: [u8; 2]) -> [u8; 4] {
    [a[0], a[1], b[0], b[1]]
}
