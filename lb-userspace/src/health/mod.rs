//! Health checks: the probes (TCP connect, HTTP GET, TLS handshake), the rise/fall state
//! machine with HAProxy's meaning, and the per-backend checker task.
//!
//! Checkers run as their own tasks and only report results over a channel, so a slow or
//! hanging backend never blocks the agent; each starts at a random point of its interval
//! and keeps a little jitter, so many backends are not all probed in the same instant.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

/// What a check does. Written `none`, `tcp`, `http:/PATH` or `tls` in the CLI and config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum CheckKind {
    #[default]
    None,
    Tcp,
    Http {
        path: String,
    },
    Tls,
}

impl FromStr for CheckKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => CheckKind::None,
            "tcp" => CheckKind::Tcp,
            "tls" => CheckKind::Tls,
            "http" => CheckKind::Http { path: "/".into() },
            _ => match s.strip_prefix("http:") {
                Some(path)
                    if path.starts_with('/')
                        && !path.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                {
                    CheckKind::Http { path: path.into() }
                }
                Some(path) => {
                    bail!("bad HTTP check path {path:?}: it must start with / and have no spaces")
                }
                None => bail!("unknown check {s:?}: use none, tcp, http:/PATH or tls"),
            },
        })
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::None => f.write_str("none"),
            CheckKind::Tcp => f.write_str("tcp"),
            CheckKind::Http { path } => write!(f, "http:{path}"),
            CheckKind::Tls => f.write_str("tls"),
        }
    }
}

impl Serialize for CheckKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CheckKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A check and its timing, per VIP (and overridable per backend).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    #[serde(default)]
    pub check: CheckKind,
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive good checks that bring a down backend up.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    /// Consecutive failed checks that take an up backend down.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    /// HTTP status codes that count as healthy, inclusive.
    #[serde(default = "defaults::expect")]
    pub expect: [u16; 2],
    /// Verify the backend's TLS certificate against this CA (PEM); unverified otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
}

mod defaults {
    // HAProxy's defaults: inter 2s, rise 2, fall 3; a timeout below the interval.
    pub fn interval_ms() -> u64 {
        2000
    }
    pub fn timeout_ms() -> u64 {
        1000
    }
    pub fn rise() -> u32 {
        2
    }
    pub fn fall() -> u32 {
        3
    }
    pub fn expect() -> [u16; 2] {
        [200, 399]
    }
}

impl Default for CheckSpec {
    fn default() -> Self {
        Self {
            check: CheckKind::None,
            interval_ms: defaults::interval_ms(),
            timeout_ms: defaults::timeout_ms(),
            rise: defaults::rise(),
            fall: defaults::fall(),
            expect: defaults::expect(),
            tls_ca: None,
        }
    }
}

impl CheckSpec {
    pub fn validate(&self) -> Result<()> {
        if !(50..=3_600_000).contains(&self.interval_ms) {
            bail!(
                "check interval {} ms out of range 50..3600000",
                self.interval_ms
            );
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms.max(1000) * 10 {
            bail!("check timeout {} ms out of range", self.timeout_ms);
        }
        if !(1..=1000).contains(&self.rise) || !(1..=1000).contains(&self.fall) {
            bail!("rise and fall must be between 1 and 1000");
        }
        if self.expect[0] > self.expect[1]
            || !(100..=599).contains(&self.expect[0])
            || self.expect[1] > 599
        {
            bail!(
                "expected status range {}-{} is not a range of HTTP statuses",
                self.expect[0],
                self.expect[1]
            );
        }
        if let Some(ca) = &self.tls_ca {
            tls_config(Some(ca)).with_context(|| format!("TLS CA {}", ca.display()))?;
        }
        Ok(())
    }
}

/// The check settings a command gives; the rest stay as they were.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<[u16; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
}

impl CheckPatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `base` with this patch applied, validated.
    pub fn apply(&self, base: &CheckSpec) -> Result<CheckSpec> {
        let mut spec = base.clone();
        if let Some(c) = &self.check {
            spec.check = c.clone();
        }
        if let Some(v) = self.interval_ms {
            spec.interval_ms = v;
            // A timeout left at its default follows a shorter interval down.
            if self.timeout_ms.is_none() && spec.timeout_ms > v {
                spec.timeout_ms = v;
            }
        }
        if let Some(v) = self.timeout_ms {
            spec.timeout_ms = v;
        }
        if let Some(v) = self.rise {
            spec.rise = v;
        }
        if let Some(v) = self.fall {
            spec.fall = v;
        }
        if let Some(v) = self.expect {
            spec.expect = v;
        }
        if let Some(v) = &self.tls_ca {
            spec.tls_ca = Some(v.clone());
        }
        spec.validate()?;
        Ok(spec)
    }
}

/// `200-399` as a status range.
pub fn parse_expect(s: &str) -> Result<[u16; 2]> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let parse = |x: &str| {
        x.trim()
            .parse::<u16>()
            .map_err(|_| anyhow!("bad status range {s:?}: write LO-HI, e.g. 200-399"))
    };
    Ok([parse(lo)?, parse(hi)?])
}

/// Where a backend stands, by HAProxy's rules: it goes down after `fall` consecutive failed
/// checks and comes back after `rise` consecutive good ones; it starts up (as HAProxy's
/// servers do), so adding a backend never waits for checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    streak: u32,
    pub last: Option<Outcome>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub latency_us: u64,
    pub detail: String,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            up: true,
            streak: 0,
            last: None,
        }
    }
}

impl Health {
    /// Records one result; returns true when the backend changed between up and down.
    pub fn record(&mut self, outcome: Outcome, rise: u32, fall: u32) -> bool {
        let agrees = outcome.ok == self.up;
        self.last = Some(outcome);
        if agrees {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed {
            self.up = !self.up;
            self.streak = 0;
            return true;
        }
        false
    }
}

/// One probe of `target`; Ok carries a short description of the success.
pub async fn probe(
    spec: &CheckSpec,
    target: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<String> {
    let timeout = Duration::from_millis(spec.timeout_ms);
    let work = async {
        let mut stream = TcpStream::connect(target).await.context("connect")?;
        match &spec.check {
            CheckKind::None | CheckKind::Tcp => Ok("connected".to_string()),
            CheckKind::Http { path } => {
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n",
                    target.ip()
                );
                stream.write_all(request.as_bytes()).await.context("send")?;
                let status = read_status(&mut stream).await?;
                if (spec.expect[0]..=spec.expect[1]).contains(&status) {
                    Ok(format!("HTTP {status}"))
                } else {
                    bail!(
                        "HTTP {status}, expected {}-{}",
                        spec.expect[0],
                        spec.expect[1]
                    )
                }
            }
            CheckKind::Tls => {
                let config = tls
                    .ok_or_else(|| anyhow!("no TLS client configuration"))?
                    .clone();
                let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
                let connector = tokio_rustls::TlsConnector::from(config);
                let tls_stream = connector
                    .connect(name, stream)
                    .await
                    .context("TLS handshake")?;
                let (_, session) = tls_stream.get_ref();
                let version = session
                    .protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default();
                Ok(format!("TLS handshake ({version})"))
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result.map_err(|e| anyhow!("{e:#}")),
        Err(_) => bail!("timed out after {} ms", spec.timeout_ms),
    }
}

async fn read_status(stream: &mut TcpStream) -> Result<u16> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await.context("receive")?;
        if n == 0 {
            bail!("connection closed before a complete status line");
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf[..len]) {
            Ok(_) if response.code.is_some() => return Ok(response.code.unwrap_or_default()),
            Ok(_) if len < buf.len() => continue,
            Err(httparse::Error::TooManyHeaders) => {
                return response
                    .code
                    .ok_or_else(|| anyhow!("unreadable HTTP response"));
            }
            _ => bail!("not an HTTP response"),
        }
    }
}

/// TLS client settings: verify against `ca` when given, otherwise accept any certificate
/// (a check asks "does it complete a handshake", like HAProxy's `check-ssl verify none`).
pub fn tls_config(ca: Option<&PathBuf>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("{e}"))?;
    let config = match ca {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.context("parsing PEM")?)
                    .map_err(|e| anyhow!("{e}"))?;
            }
            if roots.is_empty() {
                bail!("no certificate in {}", path.display());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Checks the handshake's signatures but not who signed the certificate.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A result, tagged with the backend it is for (id and generation, so results of a
/// removed backend are recognised and ignored).
#[derive(Debug)]
pub struct Report {
    pub backend_id: u32,
    pub generation: u32,
    pub outcome: Outcome,
}

/// Probes `target` every interval until aborted, reporting each result.
pub fn spawn_checker(
    backend_id: u32,
    generation: u32,
    addr: IpAddr,
    port: u16,
    spec: CheckSpec,
    reports: mpsc::Sender<Report>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let target = SocketAddr::new(addr, port);
        let interval = Duration::from_millis(spec.interval_ms);
        let tls = match spec.check {
            CheckKind::Tls => match tls_config(spec.tls_ca.as_ref()) {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!("TLS check of {target}: {e:#}");
                    None
                }
            },
            _ => None,
        };
        // Spread checks over the interval instead of probing every backend at once.
        tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
        loop {
            let start = Instant::now();
            let result = probe(&spec, target, tls.as_ref()).await;
            let latency_us = start.elapsed().as_micros() as u64;
            let outcome = match result {
                Ok(detail) => Outcome {
                    ok: true,
                    latency_us,
                    detail,
                },
                Err(e) => Outcome {
                    ok: false,
                    latency_us,
                    detail: format!("{e:#}"),
                },
            };
            if reports
                .send(Report {
                    backend_id,
                    generation,
                    outcome,
                })
                .await
                .is_err()
            {
                return;
            }
            // +-10% jitter keeps checkers that started together from staying together.
            tokio::time::sleep(interval.mul_f64(0.9 + 0.2 * fastrand::f64())).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ok: bool) -> Outcome {
        Outcome {
            ok,
            latency_us: 1,
            detail: String::new(),
        }
    }

    #[test]
    fn rise_and_fall_count_consecutive_results() {
        let mut h = Health::default();
        assert!(h.up);
        assert!(!h.record(ok(false), 2, 3));
        assert!(!h.record(ok(false), 2, 3));
        assert!(
            !h.record(ok(true), 2, 3),
            "a success breaks the failure streak"
        );
        assert!(!h.record(ok(false), 2, 3));
        assert!(!h.record(ok(false), 2, 3));
        assert!(
            h.record(ok(false), 2, 3),
            "third consecutive failure takes it down"
        );
        assert!(!h.up);
        assert!(!h.record(ok(true), 2, 3));
        assert!(
            h.record(ok(true), 2, 3),
            "second consecutive success brings it up"
        );
        assert!(h.up);
    }

    #[test]
    fn check_kinds_parse_and_print() {
        for s in ["none", "tcp", "tls", "http:/health", "http:/a/b?c=d"] {
            assert_eq!(s.parse::<CheckKind>().unwrap().to_string(), s);
        }
        assert_eq!(
            "http".parse::<CheckKind>().unwrap(),
            CheckKind::Http { path: "/".into() }
        );
        for bad in ["udp", "http:health", "http:/a b", ""] {
            assert!(bad.parse::<CheckKind>().is_err(), "{bad}");
        }
        assert_eq!(parse_expect("200-299").unwrap(), [200, 299]);
        assert_eq!(parse_expect("204").unwrap(), [204, 204]);
        assert!(parse_expect("2xx").is_err());
    }

    #[test]
    fn spec_validation() {
        assert!(CheckSpec::default().validate().is_ok());
        assert!(
            CheckSpec {
                interval_ms: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            CheckSpec {
                rise: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            CheckSpec {
                expect: [300, 200],
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }

    #[tokio::test]
    async fn probes_against_local_servers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in [200, 503] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                s.write_all(body.as_bytes()).await.unwrap();
            }
        });
        let http = CheckSpec {
            check: "http:/health".parse().unwrap(),
            ..Default::default()
        };
        assert_eq!(probe(&http, addr, None).await.unwrap(), "HTTP 200");
        let err = probe(&http, addr, None).await.unwrap_err().to_string();
        assert!(err.contains("503"), "{err}");
        // Nothing listens there any more.
        let tcp = CheckSpec {
            check: CheckKind::Tcp,
            timeout_ms: 500,
            ..Default::default()
        };
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(probe(&tcp, closed, None).await.is_err());
    }
}
