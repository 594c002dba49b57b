//! The traffic ends of the test bed, run by the `xtask` binary inside a namespace:
//! `serve` (a backend, HTTP over TCP and a name over UDP), `client` (many short connections,
//! one after another), `load` (new connections or UDP exchanges at a steady rate, each
//! recorded with its time) and `keepalive` (one long connection).
//!
//! Every network operation has a timeout, and every loop is bounded in count or time, so
//! nothing here can hang a test or flood anything.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// Most connections one `client` run makes, whatever it is asked for.
pub const MAX_CONNECTIONS: u32 = 10_000;
/// Longest a `keepalive` run lasts, whatever it is asked for.
pub const MAX_KEEPALIVE: Duration = Duration::from_secs(300);

/// The path `serve` answers with 503 Service Unavailable (every other path gets 200), so a
/// health check can be pointed at a failing URL.
pub const FAIL_PATH: &str = "/fail";

/// Serves HTTP on `[::]:port` (dual-stack: IPv4 clients arrive as v4-mapped addresses),
/// answering every request, whatever its method, with `name` and a newline: status 200,
/// or 503 for [`FAIL_PATH`]; and UDP on the same port, answering every datagram with `name`.
/// Runs until killed.
pub fn serve(name: &str, port: u16) -> Result<()> {
    let server = tiny_http::Server::http(("::", port))
        .map_err(|e| anyhow!("listening on [::]:{port}: {e}"))?;
    let udp = UdpSocket::bind(("::", port)).with_context(|| format!("binding udp [::]:{port}"))?;
    let udp_name = name.to_string();
    std::thread::spawn(move || serve_udp(&udp, &udp_name));
    // The test bed waits for this line before it sends traffic.
    println!("{name} listening on [::]:{port}");
    std::io::stdout().flush()?;
    let body = format!("{name}\n");
    let header = tiny_http::Header::from_bytes(&b"X-Backend"[..], name.as_bytes())
        .map_err(|()| anyhow!("backend name {name:?} is not a valid header value"))?;
    for mut request in server.incoming_requests() {
        // Drain any request body so the next request on a kept-alive connection parses.
        let mut sink = Vec::new();
        let _ = request.as_reader().take(1 << 20).read_to_end(&mut sink);
        let status = if request.url() == FAIL_PATH { 503 } else { 200 };
        let response = tiny_http::Response::from_string(body.clone())
            .with_header(header.clone())
            .with_status_code(status);
        if let Err(e) = request.respond(response) {
            eprintln!("{name}: responding: {e}");
        }
    }
    Ok(())
}

/// Answers every datagram on `socket` with `name`, until the process ends. The answer
/// leaves from the address the datagram was sent to (IPV6_PKTINFO; on this dual-stack
/// socket IPv4 arrives v4-mapped and the kernel takes a v4-mapped source back): a backend
/// under direct server return is asked on the VIP, which it holds on loopback, and a
/// client only takes an answer from the address it asked.
fn serve_udp(socket: &UdpSocket, name: &str) {
    use nix::sys::socket::{
        ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, sendmsg, setsockopt,
        sockopt::Ipv6RecvPacketInfo,
    };
    if let Err(e) = setsockopt(socket, Ipv6RecvPacketInfo, &true) {
        eprintln!("{name}: IPV6_RECVPKTINFO: {e}");
        return;
    }
    let fd = socket.as_raw_fd();
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let (peer, pktinfo) =
            match recvmsg::<SockaddrIn6>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()) {
                Ok(msg) => {
                    let info = msg.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|m| match m {
                            ControlMessageOwned::Ipv6PacketInfo(info) => Some(info),
                            _ => None,
                        })
                    });
                    (msg.address, info)
                }
                Err(e) => {
                    eprintln!("{name}: udp receive: {e}");
                    continue;
                }
            };
        let (Some(peer), Some(mut info)) = (peer, pktinfo) else {
            eprintln!("{name}: udp datagram without its addresses");
            continue;
        };
        // Any interface: the route to the client decides.
        info.ipi6_ifindex = 0;
        let answer = [std::io::IoSlice::new(name.as_bytes())];
        let cmsgs = [ControlMessage::Ipv6PacketInfo(&info)];
        if let Err(e) = sendmsg(fd, &answer, &cmsgs, MsgFlags::empty(), Some(&peer)) {
            eprintln!("{name}: udp answer to {peer}: {e}");
        }
    }
}

/// What `client` prints (as JSON) and the test bed parses.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tally {
    /// Answers per backend name.
    pub counts: BTreeMap<String, u32>,
    /// The backend that answered each successful connection, in order.
    pub sequence: Vec<String>,
    /// One message per failed connection.
    pub errors: Vec<String>,
}

impl Tally {
    pub fn count(&self, backend: &str) -> u32 {
        self.counts.get(backend).copied().unwrap_or(0)
    }
}

/// Makes `count` new TCP connections to `to`, one `GET /` each, one after another, and
/// counts who answered. With `source_port` P, connection i comes from port P + i (see
/// [`connect_from`]), so the same run repeated makes the same flows (5-tuples).
pub fn client(to: SocketAddr, count: u32, timeout: Duration, source_port: Option<u16>) -> Tally {
    let mut tally = Tally::default();
    let count = match source_port {
        Some(p) => count.min(MAX_CONNECTIONS).min(u32::from(u16::MAX - p) + 1),
        None => count.min(MAX_CONNECTIONS),
    };
    for i in 0..count {
        let answer = match source_port {
            Some(p) => one_request_from(to, p + i as u16, timeout),
            None => one_request(to, timeout),
        };
        match answer {
            Ok(name) => {
                *tally.counts.entry(name.clone()).or_default() += 1;
                tally.sequence.push(name);
            }
            Err(e) => tally.errors.push(format!("connection {}: {e:#}", i + 1)),
        }
    }
    tally
}

fn one_request(to: SocketAddr, timeout: Duration) -> Result<String> {
    exchange(connect(to, timeout)?, to)
}

/// One datagram to `to` from a socket of its own (a new flow, from a port the kernel picks),
/// and the answering backend's name. A lost datagram or answer is an error after `timeout`.
fn one_udp_request(to: SocketAddr, timeout: Duration) -> Result<String> {
    let local: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local).context("binding a udp socket")?;
    socket.set_read_timeout(Some(timeout))?;
    socket
        .connect(to)
        .with_context(|| format!("connecting udp to {to}"))?;
    socket.send(b"name?").context("sending the datagram")?;
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .context("waiting for the udp answer")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn one_request_from(to: SocketAddr, port: u16, timeout: Duration) -> Result<String> {
    exchange(connect_from(to, port, timeout)?, to)
}

/// One `GET /` with `Connection: close` on `stream`; the answering backend's name.
fn exchange(mut stream: TcpStream, to: SocketAddr) -> Result<String> {
    write_request(&mut stream, to, true)?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader)
}

/// Connects to `to` from source port `port` (any local address). The socket closes with a
/// reset (SO_LINGER 0) instead of a FIN, so neither end keeps the 4-tuple in TIME_WAIT and
/// the same source port can connect to `to` again at once, making the same flow again.
pub fn connect_from(to: SocketAddr, port: u16, timeout: Duration) -> Result<TcpStream> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("creating a socket");
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    setsockopt(&fd, libc::SO_REUSEADDR, &one).context("SO_REUSEADDR")?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&fd, libc::SO_LINGER, &linger).context("SO_LINGER")?;
    // On Linux the send timeout bounds a blocking connect.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(&fd, libc::SO_SNDTIMEO, &tv).context("SO_SNDTIMEO")?;
    let local = match to {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
    };
    let (addr, len) = sockaddr(&local);
    // SAFETY: `addr` is a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding source port {port}"));
    }
    let (addr, len) = sockaddr(&to);
    // SAFETY: as above.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("connecting to {to} from port {port}"));
    }
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn setsockopt<T>(fd: &OwnedFd, option: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` points at a live T of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `addr` as a `sockaddr_storage` and its length.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Microseconds on CLOCK_MONOTONIC: one clock for every process on the host (namespaces do
/// not change it), so `load`'s timestamps compare with a test's own.
pub fn monotonic_us() -> u64 {
    // SAFETY: all-zero is a valid timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall writing into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Steady load: a new connection to `to` (one `GET /`) every `interval` for `duration`
/// (at most [`MAX_CONNECTIONS`]), each in its own thread so a slow or failing attempt does
/// not delay the next. With `source_port` P, attempt n comes from port P + n (see
/// [`connect_from`]), so every attempt is a flow never seen before. Prints one [`Attempt`]
/// line per attempt as it completes (flushed at once). SIGINT/SIGTERM stop it from starting
/// more; attempts under way finish and are printed (each is bounded by `timeout`) before it
/// exits. It asks for a higher CPU priority (nice -10, when allowed), so that its pacing
/// holds on a busy machine: a test measures time with it.
pub fn load(plan: LoadPlan) -> Result<()> {
    // SAFETY: plain syscall on this process; failure (not root) just leaves the priority.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .context("installing the stop handler")?;
    let mut out = std::io::stdout().lock();
    let mut result = Ok(());
    steady_load(&plan, &stop, |attempt| {
        if result.is_ok() {
            result = writeln!(out, "{attempt}").and_then(|()| out.flush());
        }
    });
    Ok(result?)
}

/// What steady load sends: an attempt at `to` every `interval` for `duration`, each given
/// up after `timeout`; from port `source_port` + n for attempt n when given; UDP datagrams
/// instead of TCP connections with `udp` (`source_port` does not apply then).
#[derive(Clone, Copy, Debug)]
pub struct LoadPlan {
    pub to: SocketAddr,
    pub interval: Duration,
    pub duration: Duration,
    pub timeout: Duration,
    pub source_port: Option<u16>,
    pub udp: bool,
}

/// [`load`]'s engine: hands each attempt to `sink` as it completes, stops starting new
/// ones when `stop` is set, and returns once every attempt it started has completed.
pub fn steady_load(plan: &LoadPlan, stop: &AtomicBool, mut sink: impl FnMut(Attempt)) {
    let LoadPlan {
        to,
        interval,
        duration,
        timeout,
        source_port,
        udp,
    } = *plan;
    let interval = interval.max(Duration::from_millis(1));
    let ports = source_port.map_or(u128::MAX, |p| u128::from(u16::MAX - p) + 1);
    let count = (duration.as_micros() / interval.as_micros())
        .min(u128::from(MAX_CONNECTIONS))
        .min(ports);
    let (tx, rx) = mpsc::channel::<Attempt>();
    let start = Instant::now();
    let mut running = Vec::new();
    for seq in 0..count as u64 {
        let due = start + interval * seq as u32;
        while !stop.load(Ordering::Relaxed) && Instant::now() < due {
            std::thread::sleep((due - Instant::now()).min(Duration::from_millis(5)));
            rx.try_iter().for_each(&mut sink);
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let tx = tx.clone();
        running.push(std::thread::spawn(move || {
            let start_us = monotonic_us();
            let answer = match source_port {
                _ if udp => one_udp_request(to, timeout),
                Some(p) => one_request_from(to, p + seq as u16, timeout),
                None => one_request(to, timeout),
            };
            let outcome = answer.map_err(|e| format!("{e:#}"));
            let _ = tx.send(Attempt {
                seq,
                start_us,
                latency_us: monotonic_us() - start_us,
                outcome,
            });
        }));
        running.retain(|t| !t.is_finished());
    }
    drop(tx);
    // Every sender is gone once the last attempt is done.
    rx.into_iter().for_each(&mut sink);
    for t in running {
        let _ = t.join();
    }
}

/// One connection attempt of `load`, printed as
/// `SEQ START_US LATENCY_US ok BACKEND` or `SEQ START_US LATENCY_US err MESSAGE`
/// (START_US on [`monotonic_us`]'s clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// 0-based; attempt n was due `n * interval` after the first.
    pub seq: u64,
    pub start_us: u64,
    pub latency_us: u64,
    /// The answering backend, or what went wrong.
    pub outcome: Result<String, String>,
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, text) = match &self.outcome {
            Ok(b) => ("ok", b),
            Err(e) => ("err", e),
        };
        write!(
            f,
            "{} {} {} {kind} {}",
            self.seq,
            self.start_us,
            self.latency_us,
            text.replace('\n', " ")
        )
    }
}

impl Attempt {
    pub fn parse(line: &str) -> Option<Attempt> {
        let mut parts = line.splitn(5, ' ');
        let seq = parts.next()?.parse().ok()?;
        let start_us = parts.next()?.parse().ok()?;
        let latency_us = parts.next()?.parse().ok()?;
        let kind = parts.next()?;
        let text = parts.next().unwrap_or("").to_string();
        let outcome = match kind {
            "ok" => Ok(text),
            "err" => Err(text),
            _ => return None,
        };
        Some(Attempt {
            seq,
            start_us,
            latency_us,
            outcome,
        })
    }

    pub fn backend(&self) -> Option<&str> {
        self.outcome.as_deref().ok()
    }

    pub fn is_err(&self) -> bool {
        self.outcome.is_err()
    }
}

fn connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn write_request(stream: &mut TcpStream, to: SocketAddr, close: bool) -> Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    // One write, so the request leaves in one segment.
    let request = format!("GET / HTTP/1.1\r\nHost: {to}\r\nConnection: {connection}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .context("sending the request")?;
    stream.flush().context("sending the request")
}

/// Reads one response (status line, headers, `Content-Length` body) and returns the body
/// without its trailing newline: the name of the backend.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<String> {
    let mut status = String::new();
    if reader
        .read_line(&mut status)
        .context("reading the status line")?
        == 0
    {
        bail!("connection closed before any answer");
    }
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        bail!("unexpected status line {:?}", status.trim_end());
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).context("reading headers")? == 0 {
            bail!("connection closed inside the headers");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = Some(v.trim().parse::<usize>().context("bad Content-Length")?);
        }
    }
    let length = length.ok_or_else(|| anyhow!("answer without Content-Length"))?;
    if length > 4096 {
        bail!("answer body of {length} bytes is not a backend name");
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).context("reading the body")?;
    let body = String::from_utf8(body).context("body is not UTF-8")?;
    Ok(body.trim_end().to_string())
}

/// One keep-alive connection to `to`, a request every `interval`, for at most `duration`.
/// Prints `ok SEQ BACKEND` per answer and `err SEQ MESSAGE` on the first failure, after which
/// it stops (a broken connection is what the caller wants to hear about). Every line is
/// flushed at once so a reader sees answers as they come.
pub fn keepalive(to: SocketAddr, interval: Duration, duration: Duration) -> Result<()> {
    let timeout = Duration::from_secs(2);
    let deadline = Instant::now() + duration.min(MAX_KEEPALIVE);
    let mut out = std::io::stdout().lock();
    let stream = match connect(to, timeout) {
        Ok(s) => s,
        Err(e) => {
            writeln!(out, "err 0 {e:#}")?;
            out.flush()?;
            bail!("{e:#}");
        }
    };
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let answer =
            write_request(&mut writer, to, false).and_then(|()| read_response(&mut reader));
        match answer {
            Ok(name) => writeln!(out, "ok {seq} {name}")?,
            Err(e) => {
                writeln!(out, "err {seq} {e:#}")?;
                out.flush()?;
                bail!("request {seq}: {e:#}");
            }
        }
        out.flush()?;
        std::thread::sleep(interval);
    }
    Ok(())
}

/// One line of `keepalive` output, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok { seq: u64, backend: String },
    Err { seq: u64, message: String },
}

impl Answer {
    pub fn parse(line: &str) -> Option<Answer> {
        let mut parts = line.splitn(3, ' ');
        let kind = parts.next()?;
        let seq = parts.next()?.parse().ok()?;
        let rest = parts.next().unwrap_or("").to_string();
        match kind {
            "ok" => Some(Answer::Ok { seq, backend: rest }),
            "err" => Some(Answer::Err { seq, message: rest }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        assert_eq!(
            Answer::parse("ok 3 backend-2"),
            Some(Answer::Ok {
                seq: 3,
                backend: "backend-2".into()
            })
        );
        assert_eq!(
            Answer::parse("err 4 reading the status line: reset"),
            Some(Answer::Err {
                seq: 4,
                message: "reading the status line: reset".into()
            })
        );
        assert_eq!(Answer::parse("garbage"), None);
    }

    /// The server and both clients agree over loopback: framing and keep-alive work.
    #[test]
    fn serve_and_client_agree_on_loopback() {
        let port = {
            let l = std::net::TcpListener::bind("[::1]:0").unwrap();
            l.local_addr().unwrap().port()
        };
        std::thread::spawn(move || serve("backend-x", port));
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let tally = client(to, 5, Duration::from_secs(2), None);
        assert_eq!(tally.errors, Vec::<String>::new());
        assert_eq!(tally.count("backend-x"), 5);

        // Several requests on one connection.
        let stream = connect(to, Duration::from_secs(2)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        for _ in 0..5 {
            write_request(&mut writer, to, false).unwrap();
            assert_eq!(read_response(&mut reader).unwrap(), "backend-x");
        }

        // Fixed source ports can be used again at once (the same flows, twice).
        let first = 20_000 + (std::process::id() % 10_000) as u16;
        for _ in 0..2 {
            let tally = client(to, 3, Duration::from_secs(2), Some(first));
            assert_eq!(tally.errors, Vec::<String>::new());
            assert_eq!(tally.count("backend-x"), 3);
        }

        // The failing path answers 503, everything else 200.
        for (path, status) in [(FAIL_PATH, "503"), ("/health", "200")] {
            let mut stream = connect(to, Duration::from_secs(2)).unwrap();
            write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).unwrap();
            assert!(line.contains(status), "{path}: {line:?}");
        }

        // Steady load: every attempt recorded with its time, all answered.
        let stop = AtomicBool::new(false);
        let start = monotonic_us();
        let mut attempts = Vec::new();
        let plan = LoadPlan {
            to,
            interval: Duration::from_millis(20),
            duration: Duration::from_millis(200),
            timeout: Duration::from_secs(2),
            source_port: None,
            udp: false,
        };
        steady_load(&plan, &stop, |a| attempts.push(a));
        attempts.sort_by_key(|a| a.seq);
        assert_eq!(
            attempts.iter().map(|a| a.seq).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        // Paced, not bunched: the ten took about nine intervals (thread start-up jitter
        // aside).
        let span = attempts[9].start_us.saturating_sub(attempts[0].start_us);
        assert!(
            (120_000..2_000_000).contains(&span),
            "{span} us for ten attempts"
        );
        for a in &attempts {
            assert!(a.start_us >= start, "{a}");
            assert_eq!(a.backend(), Some("backend-x"));
            assert_eq!(Attempt::parse(&a.to_string()).as_ref(), Some(a));
        }

        // UDP on the same port: every datagram answered with the name.
        let mut udp = Vec::new();
        let udp_plan = LoadPlan {
            interval: Duration::from_millis(5),
            duration: Duration::from_millis(50),
            udp: true,
            ..plan
        };
        steady_load(&udp_plan, &stop, |a| udp.push(a));
        assert_eq!(udp.len(), 10);
        for a in &udp {
            assert_eq!(a.backend(), Some("backend-x"), "{a}");
        }
        // Asked on another of its addresses (as a backend is asked on the VIP), the server
        // answers from that address, or the client would not take the answer.
        let other: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        assert_eq!(
            one_udp_request(other, Duration::from_secs(2)).unwrap(),
            "backend-x"
        );
    }

    #[test]
    fn attempts_parse() {
        let ok = Attempt {
            seq: 7,
            start_us: 123,
            latency_us: 45,
            outcome: Ok("backend-2".into()),
        };
        assert_eq!(ok.to_string(), "7 123 45 ok backend-2");
        assert_eq!(Attempt::parse(&ok.to_string()), Some(ok));
        let err = Attempt {
            seq: 8,
            start_us: 124,
            latency_us: 1,
            outcome: Err("connecting to 10.99.1.1:80: refused".into()),
        };
        assert_eq!(Attempt::parse(&err.to_string()), Some(err.clone()));
        assert!(err.is_err() && err.backend().is_none());
        assert_eq!(Attempt::parse("7 x 45 ok b"), None);
        assert_eq!(Attempt::parse("7 1 45 maybe b"), None);
    }
}
