//! The flow-sharing message: one UDP datagram holding a batch of pins, authenticated with
//! the fleet's shared key (HMAC-SHA256).
//!
//! ```text
//! "LBF1"  seq (u64, big endian)  count (u16)  count x pin  MAC (32 bytes)
//! pin:    family (4|6)  proto  sport  dport  client  vip  backend
//!         (ports as on the wire; addresses 4 or 16 bytes by family)
//! ```
//!
//! `seq` is the sender's clock in Unix nanoseconds, made strictly increasing per sender: the
//! receiver drops a batch not newer than the last it took from that sender (a replay) or
//! too far from its own clock (stale). The MAC covers the sender's address as the receiver
//! sees it and then every byte before the MAC, so a batch replayed from another source
//! address fails it. The MAC is checked before anything of the body is believed.

use std::net::{IpAddr, SocketAddr};

use hmac::{KeyInit as _, Mac as _};
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, addr_from_map, addr_to_map};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

const MAGIC: &[u8; 4] = b"LBF1";
const HEADER: usize = 4 + 8 + 2;
const MAC_LEN: usize = 32;
/// The largest datagram sent: fits a 1,500-byte MTU with IPv6 and UDP headers.
pub const MAX_DATAGRAM: usize = 1400;
/// Shortest shared key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// A flow pinned to a backend, in the words of any balancer: addresses, not ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The 5-tuple as the data plane keys it (destination = the VIP).
    pub flow: FlowKey,
    pub backend: IpAddr,
}

/// A decoded, authenticated batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub seq: u64,
    pub pins: Vec<Pin>,
}

/// Why a datagram was refused, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too short, wrong magic, lengths that do not add up, impossible fields.
    Malformed,
    /// The MAC does not match: another key, or altered in transit.
    BadMac,
}

/// The shared key, never printed.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<hidden>)")
    }
}

impl Key {
    pub fn new(bytes: &[u8]) -> anyhow::Result<Self> {
        if bytes.len() < MIN_KEY_LEN {
            anyhow::bail!(
                "the key is {} bytes, at least {MIN_KEY_LEN} are needed",
                bytes.len()
            );
        }
        Ok(Self(bytes.to_vec()))
    }

    fn mac(&self, sender: SocketAddr) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(sender_bytes(sender).as_slice());
        mac
    }
}

/// The sender's address as the MAC covers it: family, address, port.
fn sender_bytes(sender: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(19);
    match sender.ip() {
        IpAddr::V4(a) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&sender.port().to_be_bytes());
    out
}

fn pin_len(family: u8) -> usize {
    6 + 3 * if family == FAMILY_V4 { 4 } else { 16 }
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Packs `pins` into datagrams of at most `MAX_DATAGRAM` bytes, each with its own `seq`
/// (taken from `next_seq`), authenticated as sent from `sender`.
pub fn encode(
    key: &Key,
    sender: SocketAddr,
    pins: &[Pin],
    next_seq: &mut dyn FnMut() -> u64,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = pins;
    while !rest.is_empty() {
        let mut room = MAX_DATAGRAM - HEADER - MAC_LEN;
        let mut n = 0;
        while n < rest.len() && n < u16::MAX as usize && pin_len(rest[n].flow.family) <= room {
            room -= pin_len(rest[n].flow.family);
            n += 1;
        }
        out.push(encode_one(key, sender, next_seq(), &rest[..n]));
        rest = &rest[n..];
    }
    out
}

/// One datagram holding all of `pins` (the caller keeps it under `MAX_DATAGRAM`).
pub fn encode_one(key: &Key, sender: SocketAddr, seq: u64, pins: &[Pin]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(MAX_DATAGRAM);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(&(pins.len() as u16).to_be_bytes());
    for pin in pins {
        let f = &pin.flow;
        buf.extend_from_slice(&[f.family, f.proto]);
        buf.extend_from_slice(&f.sport.to_ne_bytes());
        buf.extend_from_slice(&f.dport.to_ne_bytes());
        buf.extend_from_slice(&addr_bytes(addr_from_map(f.src, f.family)));
        buf.extend_from_slice(&addr_bytes(addr_from_map(f.dst, f.family)));
        buf.extend_from_slice(&addr_bytes(pin.backend));
    }
    let mut mac = key.mac(sender);
    mac.update(&buf);
    buf.extend_from_slice(&mac.finalize().into_bytes());
    buf
}

/// Checks and reads a datagram from `sender`. Nothing of it is trusted before the MAC
/// matches; after that a body that does not parse is still refused whole.
pub fn decode(key: &Key, sender: SocketAddr, datagram: &[u8]) -> Result<Batch, Refused> {
    if datagram.len() < HEADER + MAC_LEN || &datagram[..4] != MAGIC {
        return Err(Refused::Malformed);
    }
    let (body, tag) = datagram.split_at(datagram.len() - MAC_LEN);
    let mut mac = key.mac(sender);
    mac.update(body);
    mac.verify_slice(tag).map_err(|_| Refused::BadMac)?;

    let seq = u64::from_be_bytes(body[4..12].try_into().expect("8 bytes"));
    let count = u16::from_be_bytes([body[12], body[13]]) as usize;
    let mut rest = &body[HEADER..];
    let mut pins = Vec::with_capacity(count.min(MAX_DATAGRAM / pin_len(FAMILY_V4)));
    for _ in 0..count {
        let (&[family, proto], _) = rest.split_first_chunk::<2>().ok_or(Refused::Malformed)?;
        let width = match family {
            FAMILY_V4 => 4,
            FAMILY_V6 => 16,
            _ => return Err(Refused::Malformed),
        };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Err(Refused::Malformed);
        }
        if rest.len() < pin_len(family) {
            return Err(Refused::Malformed);
        }
        let addr = |at: usize| -> IpAddr {
            let b = &rest[at..at + width];
            if width == 4 {
                IpAddr::from(<[u8; 4]>::try_from(b).expect("4 bytes"))
            } else {
                IpAddr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))
            }
        };
        let (src, dst, backend) = (addr(6), addr(6 + width), addr(6 + 2 * width));
        let flow = FlowKey {
            src: addr_to_map(src).0,
            dst: addr_to_map(dst).0,
            sport: u16::from_ne_bytes([rest[2], rest[3]]),
            dport: u16::from_ne_bytes([rest[4], rest[5]]),
            proto,
            family,
            _pad: [0; 2],
        };
        pins.push(Pin { flow, backend });
        rest = &rest[pin_len(family)..];
    }
    if !rest.is_empty() {
        return Err(Refused::Malformed);
    }
    Ok(Batch { seq, pins })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(byte: u8) -> Key {
        Key::new(&[byte; 32]).unwrap()
    }

    fn sender() -> SocketAddr {
        "10.99.0.2:7946".parse().unwrap()
    }

    fn pin(client: IpAddr, sport: u16, vip: IpAddr, backend: IpAddr, proto: u8) -> Pin {
        let (src, family) = addr_to_map(client);
        Pin {
            flow: FlowKey {
                src,
                dst: addr_to_map(vip).0,
                sport: sport.to_be(),
                dport: 80u16.to_be(),
                proto,
                family,
                _pad: [0; 2],
            },
            backend,
        }
    }

    fn v4(i: u16) -> Pin {
        pin(
            IpAddr::from([10, 99, 0, 1]),
            40_000 + i,
            IpAddr::from([10, 99, 1, 1]),
            IpAddr::from([10, 99, 0, 11]),
            PROTO_TCP,
        )
    }

    fn v6(i: u16) -> Pin {
        pin(
            "fd00:99::1".parse().unwrap(),
            50_000 + i,
            "fd00:99:1::1".parse().unwrap(),
            "fd00:99::11".parse().unwrap(),
            PROTO_UDP,
        )
    }

    #[test]
    fn a_batch_comes_back_as_it_was_sent() {
        let pins = vec![v4(1), v6(2), v4(3)];
        let datagram = encode_one(&key(1), sender(), 42, &pins);
        let batch = decode(&key(1), sender(), &datagram).unwrap();
        assert_eq!(batch, Batch { seq: 42, pins });
    }

    #[test]
    fn many_pins_split_into_datagrams_that_fit() {
        let pins: Vec<Pin> = (0..500)
            .map(|i| if i % 3 == 0 { v6(i) } else { v4(i) })
            .collect();
        let mut seq = 0;
        let datagrams = encode(&key(1), sender(), &pins, &mut || {
            seq += 1;
            seq
        });
        assert!(datagrams.len() > 1);
        let mut back = Vec::new();
        for (i, d) in datagrams.iter().enumerate() {
            assert!(d.len() <= MAX_DATAGRAM, "{} bytes", d.len());
            let batch = decode(&key(1), sender(), d).unwrap();
            assert_eq!(batch.seq, i as u64 + 1);
            back.extend(batch.pins);
        }
        assert_eq!(back, pins);
    }

    #[test]
    fn another_key_or_another_sender_fails_the_mac() {
        let datagram = encode_one(&key(1), sender(), 1, &[v4(1)]);
        assert_eq!(decode(&key(2), sender(), &datagram), Err(Refused::BadMac));
        let elsewhere: SocketAddr = "10.99.0.3:7946".parse().unwrap();
        assert_eq!(decode(&key(1), elsewhere, &datagram), Err(Refused::BadMac));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Key::new(b"short").is_err());
        assert!(!format!("{:?}", key(7)).contains('7'));
    }

    proptest! {
        /// Random bytes: never a panic, never accepted (a MAC cannot be guessed).
        #[test]
        fn random_datagrams_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            prop_assert!(decode(&key(1), sender(), &bytes).is_err());
        }

        /// Random bytes under the right magic: refused as well.
        #[test]
        fn random_bodies_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut d = MAGIC.to_vec();
            d.extend(bytes);
            prop_assert!(decode(&key(1), sender(), &d).is_err());
        }

        /// A valid datagram with bytes flipped, cut or appended: never a panic; accepted
        /// only if it is byte for byte the datagram that was sent.
        #[test]
        fn mutated_datagrams_are_refused(
            n in 0u16..40,
            flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 0..4),
            cut in proptest::option::of(any::<usize>()),
            extra in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let pins: Vec<Pin> = (0..n).map(|i| if i % 2 == 0 { v4(i) } else { v6(i) }).collect();
            let sent = encode_one(&key(1), sender(), 7, &pins);
            let mut d = sent.clone();
            for (at, x) in flips {
                let at = at % d.len();
                d[at] ^= x;
            }
            if let Some(cut) = cut {
                d.truncate(cut % (d.len() + 1));
            }
            d.extend(extra);
            match decode(&key(1), sender(), &d) {
                Ok(batch) => {
                    prop_assert_eq!(&d, &sent);
                    prop_assert_eq!(batch.pins, pins);
                }
                Err(_) => prop_assert_ne!(&d, &sent),
            }
        }

        /// Whatever a key holder signs (any seq, any count field, any body) decodes without
        /// panicking, and only when the body is well formed.
        #[test]
        fn signed_garbage_never_panics(
            seq in any::<u64>(),
            count in any::<u16>(),
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut d = MAGIC.to_vec();
            d.extend_from_slice(&seq.to_be_bytes());
            d.extend_from_slice(&count.to_be_bytes());
            d.extend(body);
            let mut mac = key(1).mac(sender());
            mac.update(&d);
            d.extend_from_slice(&mac.finalize().into_bytes());
            if let Ok(batch) = decode(&key(1), sender(), &d) {
                prop_assert_eq!(batch.pins.len(), count as usize);
                prop_assert_eq!(encode_one(&key(1), sender(), seq, &batch.pins), d);
            }
        }
    }
}
