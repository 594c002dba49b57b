//! The traffic ends of the test bed, run by the `xtask` binary inside a namespace:
//! `serve` (a backend), `client` (many short connections) and `keepalive` (one long one).
//!
//! Every network operation has a timeout, and every loop is bounded in count or time, so
//! nothing here can hang a test or flood anything.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// Most connections one `client` run makes, whatever it is asked for.
pub const MAX_CONNECTIONS: u32 = 10_000;
/// Longest a `keepalive` run lasts, whatever it is asked for.
pub const MAX_KEEPALIVE: Duration = Duration::from_secs(300);

/// Serves HTTP on `[::]:port` (dual-stack: IPv4 clients arrive as v4-mapped addresses),
/// answering every request, whatever its method or path, with `name` and a newline.
/// Runs until killed.
pub fn serve(name: &str, port: u16) -> Result<()> {
    let server = tiny_http::Server::http(("::", port))
        .map_err(|e| anyhow!("listening on [::]:{port}: {e}"))?;
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
        let response = tiny_http::Response::from_string(body.clone()).with_header(header.clone());
        if let Err(e) = request.respond(response) {
            eprintln!("{name}: responding: {e}");
        }
    }
    Ok(())
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

/// Makes `count` new TCP connections to `to`, one `GET /` each, and counts who answered.
pub fn client(to: SocketAddr, count: u32, timeout: Duration) -> Tally {
    let mut tally = Tally::default();
    for i in 0..count.min(MAX_CONNECTIONS) {
        match one_request(to, timeout) {
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
    let mut stream = connect(to, timeout)?;
    write_request(&mut stream, to, true)?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader)
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
        let tally = client(to, 5, Duration::from_secs(2));
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
    }
}
