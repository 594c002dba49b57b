//! Full NAT's data-plane set-up shared by its fixtures (tests/nat_dataplane.rs) and the
//! benchmark: the reply path asks the kernel's FIB for the client's next hop, so the
//! namespace of `fixtures::with_veth_in_netns` gets routes to the clients through a router
//! on the veth, and forwarding (XDP may only ask the FIB on an interface that forwards:
//! loopback, for test runs).

use std::process::Command;

/// The router the clients (192.0.2.0/24, 2001:db8::/64) are behind.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0x70, 0x00, 0x00, 0x00, 0x01];
/// The veth's own MAC: the source of replies sent to the clients.
pub const LB_VETH_MAC: [u8; 6] = [0x02, 0xee, 0x00, 0x00, 0x00, 0x10];

/// Routes to the clients via the router, a route to 198.51.100.0/24 via a router with no
/// neighbour entry, and forwarding on. Call inside `with_veth_in_netns`.
pub fn client_routes() {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let script = format!(
        "ip link set lo up && ip link set lbt0 address {} && ip link set lbt0 up && \
         ip link set lbt1 up && \
         echo 1 > /proc/sys/net/ipv4/conf/all/forwarding && \
         echo 1 > /proc/sys/net/ipv6/conf/all/forwarding && \
         ip addr add 10.9.0.1/24 dev lbt0 && \
         ip -6 addr add fd09::1/64 dev lbt0 nodad && \
         ip neigh add 10.9.0.254 lladdr {r} dev lbt0 nud permanent && \
         ip -6 neigh add fd09::fe lladdr {r} dev lbt0 nud permanent && \
         ip route add 192.0.2.0/24 via 10.9.0.254 && \
         ip -6 route add 2001:db8::/64 via fd09::fe && \
         ip route add 198.51.100.0/24 via 10.9.0.253",
        mac(LB_VETH_MAC),
        r = mac(ROUTER_MAC),
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("running sh (iproute2 needed)");
    assert!(status.success(), "setting up the clients' routes: {status}");
}
