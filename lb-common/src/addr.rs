//! How an IP address is packed into the maps' `Addr`: raw network-order bytes in `u32`
//! words, IPv4 in the first word and the rest zero. The data plane builds the same words
//! straight from the frame; the agent and the tests pack and unpack through here, so the
//! layout is described once.

use core::net::IpAddr;

use crate::{Addr, FAMILY_V4, FAMILY_V6};

/// An address in its map form, with its family byte.
pub fn addr_to_map(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The inverse of [`addr_to_map`].
pub fn addr_from_map(addr: Addr, family: u8) -> IpAddr {
    let bytes = |w: u32| w.to_ne_bytes();
    if family == FAMILY_V4 {
        IpAddr::from(bytes(addr[0]))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&bytes(*w));
        }
        IpAddr::from(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_hold_network_order_bytes_and_round_trip() {
        let (a4, f4) = addr_to_map(IpAddr::from([10, 1, 2, 3]));
        assert_eq!(
            (a4[0].to_ne_bytes(), a4[1], f4),
            ([10, 1, 2, 3], 0, FAMILY_V4)
        );
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let (a6, f6) = addr_to_map(v6);
        assert_eq!(f6, FAMILY_V6);
        assert_eq!(a6[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(a6[3].to_ne_bytes(), [0, 0, 0, 1]);
        for ip in ["10.1.2.3", "fd00::1", "2001:db8:1:2:3:4:5:6"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (a, f) = addr_to_map(ip);
            assert_eq!(addr_from_map(a, f), ip);
        }
    }
}
