//! The flow-sharing loop: this balancer's new flows from the ring buffer go to every peer,
//! and peers' batches are checked and installed in the flow table. One task; nothing here
//! takes the agent's lock except a directory refresh (`Source`).

use std::{
    future::Future,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use lb_common::{FlowEvent, FlowKey, FlowValue};
use tokio::{io::unix::AsyncFd, net::UdpSocket};

use super::{
    directory::{Directory, Recent, Skip},
    peers::{self, Peers, Sequence, Stale},
    wire::{self, Key, Refused},
};
use crate::kernel::batch;

/// Where the loop gets the backend ids of the moment.
pub trait Source: Send + Sync + 'static {
    /// The directory, if the state changed since `version`.
    fn directory(&self, version: u64) -> impl Future<Output = Option<Directory>> + Send;
}

/// A fixed directory (benchmarks, tools).
impl Source for Directory {
    async fn directory(&self, version: u64) -> Option<Directory> {
        (version != self.version).then(|| self.clone())
    }
}

/// Why a datagram was refused whole, in counter order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    UnknownPeer,
    Malformed,
    BadMac,
    Replayed,
    Stale,
}

impl Rejected {
    pub const ALL: [Rejected; 5] = [
        Rejected::UnknownPeer,
        Rejected::Malformed,
        Rejected::BadMac,
        Rejected::Replayed,
        Rejected::Stale,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rejected::UnknownPeer => "unknown_peer",
            Rejected::Malformed => "malformed",
            Rejected::BadMac => "bad_mac",
            Rejected::Replayed => "replayed",
            Rejected::Stale => "stale",
        }
    }
}

impl Skip {
    pub const ALL: [Skip; 3] = [Skip::NoVip, Skip::NoBackend, Skip::LocalNewer];

    pub fn name(self) -> &'static str {
        match self {
            Skip::NoVip => "no_vip",
            Skip::NoBackend => "no_backend",
            Skip::LocalNewer => "local_newer",
        }
    }
}

/// What the loop did, for metrics and `lb stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// New flows read from this balancer's ring buffer.
    pub events: AtomicU64,
    /// Of those, pins sent (once per peer).
    pub sent: AtomicU64,
    /// Events whose backend the directory did not know (removed meanwhile).
    pub unsent: AtomicU64,
    /// Datagrams that could not be sent (peer unreachable, buffer full).
    pub send_errors: AtomicU64,
    /// Pins in peers' accepted batches.
    pub received: AtomicU64,
    /// Of those, installed in this flow table.
    pub installed: AtomicU64,
    /// Not installed, by `Skip` (in `Skip::ALL` order).
    pub skipped: [AtomicU64; 3],
    /// Datagrams refused whole, by `Rejected` (in `Rejected::ALL` order).
    pub rejected: [AtomicU64; 5],
    /// New flows the data plane could not write into the full ring (read every second).
    pub ring_drops: AtomicU64,
    /// Peers listed.
    pub peers: AtomicU64,
}

impl Stats {
    fn reject(&self, why: Rejected) {
        self.rejected[why as usize].fetch_add(1, Relaxed);
    }
    fn skip(&self, why: Skip) {
        self.skipped[why as usize].fetch_add(1, Relaxed);
    }
}

/// The UDP side: our socket (bound to the address peers list us by), the peers, the key.
pub struct Link {
    pub socket: UdpSocket,
    pub local: SocketAddr,
    pub peers: Vec<SocketAddr>,
    pub key: Key,
}

/// Socket buffers of the sharing socket: a burst of new flows (a few thousand datagrams)
/// waits in the kernel instead of being lost while the loop installs.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// The sharing socket, bound to `addr`, non-blocking, with large buffers (forced past
/// `net.core.rmem_max` where the process may, as the agent with CAP_NET_ADMIN can).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd as _;
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let size: libc::c_int = SOCKET_BUFFER;
        let set = |opt| {
            // SAFETY: a valid socket and a pointer to a c_int of the size given.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            // Without the capability: as large as rmem_max/wmem_max allow.
            set(plain);
        }
    }
    Ok(socket)
}

/// A directory is refreshed on a miss at most this often, and unconditionally this often.
const REFRESH_ON_MISS: Duration = Duration::from_millis(20);
const REFRESH_EVERY: Duration = Duration::from_secs(1);

struct Loop<S> {
    source: S,
    directory: Directory,
    refreshed: Instant,
    link: Link,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    inbox: Inbox,
    seq: Sequence,
    recent: Recent,
    stats: Arc<Stats>,
}

/// The data plane's side: the ring of new flows, the flow table, the count of lost events.
pub struct Maps {
    pub ring: RingBuf<MapData>,
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    pub drops: PerCpuArray<MapData, u64>,
}

/// Runs until the task is aborted.
pub async fn run<S: Source>(
    maps: Maps,
    link: Link,
    source: S,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let Maps { ring, flows, drops } = maps;
    stats.peers.store(link.peers.len() as u64, Relaxed);
    // SAFETY: the ring owns its file descriptor, which stays open and the same until the
    // AsyncFd (which owns the ring) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the flow ring buffer: {e}"))?;
    let directory = source.directory(u64::MAX).await.unwrap_or_default();
    let mut me = Loop {
        source,
        directory,
        refreshed: Instant::now(),
        inbox: Inbox {
            peers: Peers::new(&link.peers, peers::unix_now_ns()),
            key: link.key.clone(),
            stats: stats.clone(),
        },
        link,
        flows,
        seq: Sequence::default(),
        recent: Recent::default(),
        stats,
    };
    let mut buf = vec![0u8; 65_536];
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    let mut events = Vec::new();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Ok(event) = bytemuck::try_pod_read_unaligned::<FlowEvent>(&item) {
                        events.push(event);
                    }
                }
                guard.clear_ready();
                me.share(&mut events).await;
            }
            received = me.link.socket.recv_from(&mut buf) => {
                // An error here is about one datagram (e.g. an ICMP error queued for
                // the socket), never fatal.
                match received {
                    Ok((len, from)) => me.take(from, &buf[..len]).await,
                    Err(e) => log::debug!("flow sync: receiving: {e}"),
                }
            }
            _ = tick.tick() => {
                if let Ok(per_cpu) = drops.get(&0, 0) {
                    me.stats.ring_drops.store(per_cpu.iter().sum(), Relaxed);
                }
                me.recent.expire(peers::unix_now_ns().saturating_sub(peers::FRESH_NS));
                me.refresh(false).await;
            }
        }
    }
}

/// The checks a peer's datagram passes before any of it is believed: a listed sender, the
/// shared key's MAC, well formed, fresh and not seen before. Every refusal is counted.
pub struct Inbox {
    pub peers: Peers,
    pub key: Key,
    pub stats: Arc<Stats>,
}

impl Inbox {
    pub fn check(&mut self, from: SocketAddr, datagram: &[u8], now_ns: u64) -> Option<wire::Batch> {
        let stats = self.stats.clone();
        let refused = move |why| {
            stats.reject(why);
            None
        };
        if !self.peers.is_listed(&from) {
            return refused(Rejected::UnknownPeer);
        }
        let batch = match wire::decode(&self.key, from, datagram) {
            Ok(b) => b,
            Err(Refused::Malformed) => return refused(Rejected::Malformed),
            Err(Refused::BadMac) => return refused(Rejected::BadMac),
        };
        match self.peers.take(&from, batch.seq, now_ns) {
            Ok(()) => {}
            Err(Stale::Replayed) => return refused(Rejected::Replayed),
            Err(Stale::Stale) => return refused(Rejected::Stale),
        }
        self.stats
            .received
            .fetch_add(batch.pins.len() as u64, Relaxed);
        Some(batch)
    }
}

impl<S: Source> Loop<S> {
    /// A new directory if the state changed; with `missed`, only if the last is not too
    /// recent (a burst of misses asks once).
    async fn refresh(&mut self, missed: bool) -> bool {
        if missed && self.refreshed.elapsed() < REFRESH_ON_MISS {
            return false;
        }
        self.refreshed = Instant::now();
        match self.source.directory(self.directory.version).await {
            Some(d) => {
                self.directory = d;
                true
            }
            None => false,
        }
    }

    /// Sends this balancer's new pins to every peer.
    async fn share(&mut self, events: &mut Vec<FlowEvent>) {
        if events.is_empty() {
            return;
        }
        let now = peers::unix_now_ns();
        self.stats.events.fetch_add(events.len() as u64, Relaxed);
        let mut pins = Vec::with_capacity(events.len());
        let mut missed = Vec::new();
        for event in events.drain(..) {
            self.recent.pinned_here(event.flow, now);
            match self.directory.outgoing(&event) {
                Some(pin) => pins.push(pin),
                None => missed.push(event),
            }
        }
        if !missed.is_empty() && self.refresh(true).await {
            missed.retain(|e| match self.directory.outgoing(e) {
                Some(pin) => {
                    pins.push(pin);
                    false
                }
                None => true,
            });
        }
        self.stats.unsent.fetch_add(missed.len() as u64, Relaxed);
        let seq = &mut self.seq;
        let datagrams = wire::encode(&self.link.key, self.link.local, &pins, &mut || {
            seq.next(peers::unix_now_ns())
        });
        for peer in &self.link.peers {
            for d in &datagrams {
                if let Err(e) = self.link.socket.send_to(d, peer).await {
                    self.stats.send_errors.fetch_add(1, Relaxed);
                    log::debug!("flow sync: sending to {peer}: {e}");
                }
            }
            self.stats.sent.fetch_add(pins.len() as u64, Relaxed);
        }
    }

    /// Checks a datagram and installs its pins; a refused one changes nothing.
    async fn take(&mut self, from: SocketAddr, datagram: &[u8]) {
        let Some(batch) = self.inbox.check(from, datagram, peers::unix_now_ns()) else {
            return;
        };
        let mut keys = Vec::with_capacity(batch.pins.len());
        let mut values = Vec::with_capacity(batch.pins.len());
        let mut refreshed = false;
        for pin in &batch.pins {
            let mut value = self.directory.incoming(pin);
            if matches!(value, Err(Skip::NoVip | Skip::NoBackend)) && !refreshed {
                refreshed = true;
                if self.refresh(true).await {
                    value = self.directory.incoming(pin);
                }
            }
            let value = value.and_then(|v| {
                if self.recent.newer_than(&pin.flow, batch.seq) {
                    Err(Skip::LocalNewer)
                } else {
                    Ok(v)
                }
            });
            match value {
                Ok(v) => {
                    keys.push(pin.flow);
                    values.push(v);
                }
                Err(why) => self.stats.skip(why),
            }
        }
        if let Err(e) = self.install(&keys, &values) {
            log::warn!("flow sync: installing {} pins: {e}", keys.len());
            return;
        }
        self.stats.installed.fetch_add(keys.len() as u64, Relaxed);
    }

    /// One batched update; one insert each where the kernel has no batch update.
    fn install(&mut self, keys: &[FlowKey], values: &[FlowValue]) -> anyhow::Result<()> {
        let fd = aya::maps::IterableMap::map(&self.flows).fd().as_fd();
        if batch::update(fd, keys, values).is_ok() {
            return Ok(());
        }
        for (k, v) in keys.iter().zip(values) {
            self.flows.insert(k, v, 0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{FlowKey, PROTO_TCP, addr_to_map};

    use super::*;
    use crate::flowsync::wire::Pin;

    fn pins() -> Vec<Pin> {
        let (src, family) = addr_to_map([10, 99, 0, 1].into());
        vec![Pin {
            flow: FlowKey {
                src,
                dst: addr_to_map([10, 99, 1, 1].into()).0,
                sport: 40_000u16.to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                family,
                _pad: [0; 2],
            },
            backend: [10, 99, 0, 11].into(),
        }]
    }

    fn count(stats: &Stats, why: Rejected) -> u64 {
        stats.rejected[why as usize].load(Relaxed)
    }

    /// A datagram under another key, from an unlisted sender, or replayed is dropped and
    /// counted under its reason; only the good one is taken, once.
    #[test]
    fn forged_strange_and_replayed_datagrams_are_dropped_and_counted() {
        let now = peers::unix_now_ns();
        let peer: SocketAddr = "10.99.0.3:7946".parse().unwrap();
        let stranger: SocketAddr = "10.99.0.9:7946".parse().unwrap();
        let key = Key::new(b"the fleet's shared key, 32 bytes").unwrap();
        let other = Key::new(b"somebody else's key, 32 bytes ..").unwrap();
        let stats = Arc::new(Stats::default());
        let mut inbox = Inbox {
            peers: Peers::new(&[peer], now - 1_000),
            key: key.clone(),
            stats: stats.clone(),
        };

        let forged = wire::encode_one(&other, peer, now, &pins());
        assert_eq!(inbox.check(peer, &forged, now), None);
        assert_eq!(count(&stats, Rejected::BadMac), 1);

        let good = wire::encode_one(&key, peer, now, &pins());
        assert_eq!(inbox.check(stranger, &good, now), None);
        assert_eq!(count(&stats, Rejected::UnknownPeer), 1);
        assert_eq!(inbox.check(peer, &good[..20], now), None);
        assert_eq!(count(&stats, Rejected::Malformed), 1);

        let batch = inbox.check(peer, &good, now).expect("the good datagram");
        assert_eq!(batch.pins, pins());
        assert_eq!(inbox.check(peer, &good, now), None);
        assert_eq!(count(&stats, Rejected::Replayed), 1);

        let old = wire::encode_one(&key, peer, now - 2 * peers::FRESH_NS, &pins());
        assert_eq!(inbox.check(peer, &old, now), None);
        assert_eq!(count(&stats, Rejected::Stale), 1);
        assert_eq!(stats.received.load(Relaxed), 1);
    }
}
