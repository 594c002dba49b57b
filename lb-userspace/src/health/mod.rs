//! Health checks: the probes (TCP connect, HTTP GET, TLS handshake; MySQL, PostgreSQL and
//! external scripts in the submodules), the rise/fall state machine with HAProxy's meaning,
//! and the per-backend checker task.
//!
//! Checkers run as their own tasks and only report results over a channel, so a slow or
//! hanging backend never blocks the agent; each starts at a random point of its interval
//! and keeps a little jitter, so many backends are not all probed in the same instant.

pub mod credentials;
pub mod exec;
pub mod fds;
pub mod mysql;
pub mod pgsql;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
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

/// What a check does. Written `none`, `tcp`, `http:/PATH`, `tls`, `mysql`, `mysql-primary`,
/// `mysql-replica`, `pgsql` or `exec:/PATH` in the CLI and config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum CheckKind {
    #[default]
    None,
    Tcp,
    Http {
        path: String,
    },
    Tls,
    Mysql(mysql::Role),
    Pgsql,
    Exec(PathBuf),
}

impl FromStr for CheckKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => CheckKind::None,
            "tcp" => CheckKind::Tcp,
            "tls" => CheckKind::Tls,
            "http" => CheckKind::Http { path: "/".into() },
            "mysql" | "mysql-primary" | "mysql-replica" => CheckKind::Mysql(s.parse()?),
            "pgsql" => CheckKind::Pgsql,
            _ if s.starts_with("exec:") => CheckKind::Exec(exec::parse_script(&s[5..])?),
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
                None => bail!(
                    "unknown check {s:?}: use none, tcp, http:/PATH, tls, mysql, mysql-primary, mysql-replica, pgsql or exec:/PATH"
                ),
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
            CheckKind::Mysql(role) => f.write_str(role.name()),
            CheckKind::Pgsql => f.write_str("pgsql"),
            CheckKind::Exec(script) => write!(f, "exec:{}", script.display()),
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

/// Declares [`CheckSpec`] and [`CheckPatch`] from one list of a check's settings, so each
/// is described once: first those every check has (`name: Type`; a patch gives an
/// `Option` of it), then, after a `;`, those a check may go without (`name: Option<Type>`;
/// a patch gives one or leaves it as it was).
macro_rules! check_settings {
    (
        $( $(#[$doc:meta])* $field:ident: $ty:ty, )*
        ;
        $( $(#[$odoc:meta])* $opt:ident: Option<$oty:ty>, )*
    ) => {
        /// A check and its timing, per VIP (and overridable per backend). A setting the
        /// file leaves out is [`CheckSpec::default`]'s.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct CheckSpec {
            $( $(#[$doc])* pub $field: $ty, )*
            $(
                $(#[$odoc])*
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $opt: Option<$oty>,
            )*
        }

        /// The check settings a command gives; the rest stay as they were.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct CheckPatch {
            $(
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
            $(
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $opt: Option<$oty>,
            )*
        }

        impl CheckPatch {
            /// Puts every setting this patch gives over `spec`.
            fn overlay(&self, spec: &mut CheckSpec) {
                $( if let Some(v) = &self.$field { spec.$field = v.clone(); } )*
                $( if let Some(v) = &self.$opt { spec.$opt = Some(v.clone()); } )*
            }
        }
    };
}

check_settings! {
    check: CheckKind,
    interval_ms: u64,
    timeout_ms: u64,
    /// Consecutive good checks that bring a down backend up.
    rise: u32,
    /// Consecutive failed checks that take an up backend down.
    fall: u32,
    /// HTTP status codes that count as healthy, inclusive.
    expect: [u16; 2],
    ;
    /// Verify the backend's TLS certificate against this CA (PEM); unverified otherwise.
    tls_ca: Option<PathBuf>,
    /// The name a `tls` check sends (SNI) and verifies the certificate for; the backend's
    /// IP address otherwise.
    tls_name: Option<String>,
    /// The check user's credentials for `mysql*` and `pgsql` checks (see `credentials`).
    credentials: Option<PathBuf>,
    /// `mysql-replica`: the most replication lag, in seconds, that still counts as up.
    max_lag_s: Option<u64>,
}

impl Default for CheckSpec {
    fn default() -> Self {
        // HAProxy's defaults: inter 2s, rise 2, fall 3; a timeout below the interval.
        Self {
            check: CheckKind::None,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            expect: [200, 399],
            tls_ca: None,
            tls_name: None,
            credentials: None,
            max_lag_s: None,
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
        if let Some(name) = &self.tls_name {
            server_name(name)?;
        }
        match &self.credentials {
            Some(path) => drop(credentials::Credentials::load(path)?),
            None if matches!(self.check, CheckKind::Mysql(_) | CheckKind::Pgsql) => bail!(
                "a {} check needs a credentials file (--credentials FILE, readable by root only)",
                self.check
            ),
            None => {}
        }
        Ok(())
    }
}

impl CheckPatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `base` with this patch applied, validated.
    pub fn apply(&self, base: &CheckSpec) -> Result<CheckSpec> {
        let mut spec = base.clone();
        // A timeout left as it was follows a shorter interval down.
        if let (Some(interval), None) = (self.interval_ms, self.timeout_ms) {
            spec.timeout_ms = spec.timeout_ms.min(interval);
        }
        self.overlay(&mut spec);
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
    /// Counting afresh (a new or changed check), up or down as given.
    pub fn restarted(up: bool) -> Self {
        Self {
            up,
            ..Self::default()
        }
    }

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
        // These make their own connections (or none): a bare TCP connect to a database
        // counts as a connection error there and can get the balancer's address blocked.
        let credentials = spec.credentials.as_deref().unwrap_or(Path::new(""));
        let mut stream = match &spec.check {
            CheckKind::Mysql(role) => {
                return mysql::check(target, *role, credentials, spec.max_lag_s).await;
            }
            CheckKind::Pgsql => return pgsql::check(target, credentials).await,
            CheckKind::Exec(script) => return exec::check(script, target).await,
            _ => TcpStream::connect(target).await.context("connect")?,
        };
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
                let name = match &spec.tls_name {
                    Some(name) => server_name(name)?,
                    None => rustls::pki_types::ServerName::IpAddress(target.ip().into()),
                };
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
            CheckKind::Mysql(_) | CheckKind::Pgsql | CheckKind::Exec(_) => {
                unreachable!("probed above without a bare connection")
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

/// `--tls-name`: a DNS name (or an IP address written out).
fn server_name(name: &str) -> Result<rustls::pki_types::ServerName<'static>> {
    rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|_| anyhow!("bad TLS name {name:?}: give the DNS name the certificate is for"))
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
        // Read once; the CA was readable when the check was configured (`validate`).
        // Should it have gone since, every result says why.
        let tls = match spec.check {
            CheckKind::Tls => match tls_config(spec.tls_ca.as_ref()) {
                Ok(c) => Ok(Some(c)),
                Err(e) => {
                    log::warn!("TLS check of {target}: {e:#}");
                    Err(format!("TLS client configuration: {e:#}"))
                }
            },
            _ => Ok(None),
        };
        // Spread checks over the interval instead of probing every backend at once.
        tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
        loop {
            let start = Instant::now();
            let result = match &tls {
                Ok(tls) => probe(&spec, target, tls.as_ref()).await,
                Err(e) => Err(anyhow!("{e}")),
            };
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

    /// What the one list of settings declares: a patch changes what it gives (a shorter
    /// interval takes the timeout down with it unless the patch gives one), and a spec
    /// read from a file or a request takes the defaults for what it leaves out.
    #[test]
    fn a_patch_changes_only_what_it_gives_and_a_spec_defaults_the_rest() {
        let base = CheckSpec {
            check: CheckKind::Tcp,
            tls_name: Some("backend.example".into()),
            ..Default::default()
        };
        // (interval, timeout, max_lag_s) given -> (interval, timeout, max_lag_s) after.
        for (given, after) in [
            ((Some(500), None, None), (500, 500, None)),
            ((Some(500), Some(200), Some(5)), (500, 200, Some(5))),
            ((None, Some(200), None), (2000, 200, None)),
        ] {
            let patch = CheckPatch {
                interval_ms: given.0,
                timeout_ms: given.1,
                max_lag_s: given.2,
                ..Default::default()
            };
            let expected = CheckSpec {
                interval_ms: after.0,
                timeout_ms: after.1,
                max_lag_s: after.2,
                ..base.clone()
            };
            assert_eq!(patch.apply(&base).unwrap(), expected, "{patch:?}");
        }
        let read: CheckSpec = serde_json::from_str(r#"{"check": "tcp", "rise": 5}"#).unwrap();
        assert_eq!(
            read,
            CheckSpec {
                check: CheckKind::Tcp,
                rise: 5,
                ..Default::default()
            }
        );
        assert!(serde_json::from_str::<CheckSpec>(r#"{"rize": 5}"#).is_err());
        assert_eq!(
            serde_json::to_string(&CheckPatch {
                rise: Some(5),
                ..Default::default()
            })
            .unwrap(),
            r#"{"rise":5}"#
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

    fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("running openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA and a certificate it signed for `backend.example` only (no IP address), made
    /// now with openssl in `dir`: (CA, certificate, key).
    fn dns_only_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ca = [
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=test CA"],
        ]
        .concat();
        openssl(
            dir,
            &[&ca[..], &["-keyout", "ca.key", "-out", "ca.pem"]].concat(),
        );
        let req = [&["req"][..], &ec, &["-subj", "/CN=backend.example"]].concat();
        openssl(
            dir,
            &[&req[..], &["-keyout", "tls.key", "-out", "tls.csr"]].concat(),
        );
        let ext = "subjectAltName=DNS:backend.example\nbasicConstraints=CA:FALSE\n";
        std::fs::write(dir.join("tls.ext"), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "tls.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "tls.ext",
                "-out",
                "tls.pem",
            ],
        );
        (dir.join("ca.pem"), dir.join("tls.pem"), dir.join("tls.key"))
    }

    /// A TLS server on loopback with `cert`; sends the SNI of each handshake it completes.
    async fn tls_server(cert: &Path, key: &Path) -> (SocketAddr, mpsc::Receiver<Option<String>>) {
        let certs: Vec<_> = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                if let Ok(tls) = acceptor.accept(s).await {
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    let _ = tx.send(sni).await;
                }
            }
        });
        (addr, rx)
    }

    /// A certificate with only a DNS name verifies under `tls_name`, which is also the SNI
    /// sent; without it (the IP address) or under another name it does not.
    #[tokio::test]
    async fn tls_checks_verify_the_tls_name() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = dns_only_certificate(dir.path());
        let (addr, mut sni) = tls_server(&cert, &key).await;
        let patch = |name: Option<&str>| CheckPatch {
            check: Some(CheckKind::Tls),
            tls_ca: Some(ca.clone()),
            tls_name: name.map(str::to_string),
            ..Default::default()
        };
        let tls = tls_config(Some(&ca)).unwrap();
        let by_ip = patch(None).apply(&CheckSpec::default()).unwrap();
        assert!(probe(&by_ip, addr, Some(&tls)).await.is_err());
        let by_name = patch(Some("backend.example"))
            .apply(&CheckSpec::default())
            .unwrap();
        let ok = probe(&by_name, addr, Some(&tls)).await;
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(
            sni.recv().await.unwrap().as_deref(),
            Some("backend.example")
        );
        let other = patch(Some("other.example"))
            .apply(&CheckSpec::default())
            .unwrap();
        assert!(probe(&other, addr, Some(&tls)).await.is_err());
        assert!(
            patch(Some("not a name"))
                .apply(&CheckSpec::default())
                .is_err()
        );
    }

    /// A CA that cannot be read is refused when the check is set, whatever the reason.
    #[test]
    fn an_unreadable_tls_ca_is_refused_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        for ca in [
            dir.path().join("missing.pem"),
            not_pem,
            dir.path().to_path_buf(),
        ] {
            let patch = CheckPatch {
                check: Some(CheckKind::Tls),
                tls_ca: Some(ca.clone()),
                ..Default::default()
            };
            let err = patch.apply(&CheckSpec::default()).unwrap_err();
            assert!(
                format!("{err:#}").contains(&ca.display().to_string()),
                "{err:#}"
            );
        }
    }
}
