//! The users' own database stack for the tests (`tests/stack.rs`): a MariaDB primary and a
//! replica with real replication, and PostgreSQL, each started in a backend namespace of
//! the test bed on its own data dir under a temp dir and stopped by PID; check credentials
//! files; and health probes run from inside the balancer's namespace.
//!
//! Every helper returns errors with what failed and the server's log, for the test to
//! panic with.

use std::{
    fs,
    net::SocketAddr,
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb::health::{self, CheckSpec};
use xtask::testbed::{Host, Proc, Testbed, run_ok, wait_until};

pub const MYSQL_PORT: u16 = 3306;
pub const PGSQL_PORT: u16 = 5432;
/// The check user, on MariaDB and PostgreSQL alike.
pub const CHECK_USER: &str = "lbcheck";
pub const CHECK_PASSWORD: &str = "check-pw";
/// The application's user and database on MariaDB.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-pw";

/// How long a server may take to start before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One MariaDB server in a backend namespace.
pub struct Mariadb {
    pub proc: Proc,
    pub host: Host,
    pub server_id: u32,
    socket: PathBuf,
}

impl Mariadb {
    /// Where the balancer's checks and the clients reach it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host.ipv4.into(), MYSQL_PORT)
    }

    /// Runs `sql` as root over the server's Unix socket; returns the rows, tab-separated.
    pub fn sql(&self, sql: &str) -> Result<String> {
        run_ok(
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg("--socket")
                .arg(&self.socket)
                .args(["-uroot", "-N", "-B", "-e", sql]),
        )
        .with_context(|| format!("server {} log:\n{}", self.server_id, self.proc.log()))
    }

    /// Starts `sql` as root in the background (e.g. a session holding a lock); killing the
    /// returned process ends the session.
    pub fn sql_background(&self, bed: &Testbed, sql: &str) -> Result<Proc> {
        let socket = self.socket.to_string_lossy().into_owned();
        bed.spawn_in(
            &self.host.ns,
            "mariadb",
            ["--no-defaults", "--socket", &socket, "-uroot", "-e", sql],
        )
    }

    /// Kills the server (SIGKILL, as a crash) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// A fresh data dir for each name under `dir`: one `mariadb-install-db`, then copies (the
/// servers start identical, so a replica replicates everything from the first event).
pub fn install_mariadb(dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>> {
    let template = dir.join("mariadb-template");
    run_ok(
        Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", template.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]),
    )
    .context("mariadb-install-db (is mariadb-server installed? ./x.sh installs it)")?;
    names
        .iter()
        .map(|name| {
            let data = dir.join(name);
            run_ok(Command::new("cp").arg("-a").arg(&template).arg(&data))?;
            Ok(data)
        })
        .collect()
}

/// Starts `mariadbd` on `host` (all its addresses, IPv4 and IPv6, port 3306) with data dir `data`, and
/// waits until it answers.
pub fn start_mariadb(
    bed: &Testbed,
    host: &Host,
    data: &Path,
    server_id: u32,
    read_only: bool,
) -> Result<Mariadb> {
    let socket = data.join("mysqld.sock");
    let mut args = vec![
        "--no-defaults".to_string(),
        format!("--datadir={}", data.display()),
        format!("--socket={}", socket.display()),
        format!("--pid-file={}", data.join("mysqld.pid").display()),
        format!("--port={MYSQL_PORT}"),
        // Every address of both families (MariaDB sets IPV6_V6ONLY on an explicit `::`).
        "--bind-address=*".into(),
        "--user=root".into(),
        format!("--server-id={server_id}"),
        format!("--log-bin={}", data.join("binlog").display()),
        // Small: several servers share a small machine with other test beds.
        "--innodb-buffer-pool-size=32M".into(),
        "--skip-name-resolve".into(),
        // A checker's refused logins must not get the balancer's address blocked.
        "--max-connect-errors=1000000".into(),
    ];
    if read_only {
        args.push("--read-only".into());
    }
    let proc = bed.spawn_in(&host.ns, "mariadbd", &args)?;
    let mut server = Mariadb {
        proc,
        host: host.clone(),
        server_id,
        socket,
    };
    wait_until(START_TIMEOUT, || {
        if let Some(status) = server.proc.try_wait() {
            bail!("mariadbd exited with {status}:\n{}", server.proc.log());
        }
        Ok(server.socket.exists() && server.sql("SELECT 1").is_ok())
    })
    .with_context(|| format!("waiting for mariadbd {server_id} to start"))?;
    Ok(server)
}

/// A MariaDB primary on backend 1 and, if `replica`, a read-only replica on backend 2
/// replicating from it (GTID, from the first event), with the check user (who may read
/// the replica status) and the application's user and database `app` with table `t`.
pub fn mariadb_pair(bed: &Testbed, replica: bool) -> Result<(Mariadb, Option<Mariadb>)> {
    let names: &[&str] = if replica {
        &["primary", "replica"]
    } else {
        &["primary"]
    };
    let dirs = install_mariadb(bed.dir(), names)?;
    let primary = start_mariadb(bed, &bed.backends[0], &dirs[0], 1, false)?;
    primary.sql(&format!(
        "CREATE USER '{CHECK_USER}'@'%' IDENTIFIED BY '{CHECK_PASSWORD}';
         GRANT REPLICA MONITOR ON *.* TO '{CHECK_USER}'@'%';
         CREATE USER 'repl'@'%' IDENTIFIED BY 'repl-pw';
         GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';
         CREATE DATABASE app;
         CREATE TABLE app.t (id INT PRIMARY KEY, v VARCHAR(64));
         CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';
         GRANT ALL ON app.* TO '{APP_USER}'@'%';"
    ))?;
    if !replica {
        return Ok((primary, None));
    }
    let replica = start_mariadb(bed, &bed.backends[1], &dirs[1], 2, true)?;
    replica.sql(&format!(
        "CHANGE MASTER TO MASTER_HOST='{}', MASTER_PORT={MYSQL_PORT}, MASTER_USER='repl',
             MASTER_PASSWORD='repl-pw', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;
         START REPLICA;",
        primary.host.ipv4
    ))?;
    wait_replicated(&primary, &replica)?;
    Ok((primary, Some(replica)))
}

/// Waits until `replica` has applied everything `primary` has written so far.
pub fn wait_replicated(primary: &Mariadb, replica: &Mariadb) -> Result<()> {
    let target = primary.sql("SELECT @@global.gtid_binlog_pos")?;
    let target = target.trim();
    wait_until(START_TIMEOUT, || {
        Ok(replica.sql("SELECT @@global.gtid_slave_pos")?.trim() == target)
    })
    .with_context(|| {
        format!(
            "waiting for the replica to reach {target}; replica status:\n{}",
            replica.sql("SHOW REPLICA STATUS\\G").unwrap_or_default()
        )
    })
}

/// PostgreSQL in a backend namespace, run as the `postgres` user (it refuses root) on a
/// data dir in its own temp dir.
pub struct Postgres {
    pub proc: Proc,
    pub host: Host,
    // Dropped after `proc` (fields drop in order): the server is gone before its files.
    _dir: tempfile::TempDir,
}

impl Postgres {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host.ipv4.into(), PGSQL_PORT)
    }

    /// A fast shutdown (SIGINT to the postmaster, which stops its own children), waited for.
    pub fn stop(&mut self) -> Result<()> {
        self.proc.signal(libc::SIGINT)?;
        if self.proc.wait_timeout(START_TIMEOUT).is_none() {
            self.proc.kill();
            bail!("postgres did not stop within {START_TIMEOUT:?}; killed");
        }
        Ok(())
    }
}

/// A test that panics still shuts PostgreSQL down cleanly: a SIGKILL (what dropping the
/// `Proc` sends) would leave the postmaster's children running until they notice.
impl Drop for Postgres {
    fn drop(&mut self) {
        if self.proc.try_wait().is_none() {
            let _ = self.stop();
        }
    }
}

/// The newest installed PostgreSQL's program `name` (Debian keeps them per major version).
fn pg_bin(name: &str) -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql (is postgresql installed? ./x.sh installs it)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin").join(name)))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("no /usr/lib/postgresql/*/bin/{name}"))
}

/// `setpriv` arguments that run a program as `postgres`, dying with the test (a user
/// change clears the test bed's own parent-death signal, so setpriv sets it again).
const AS_POSTGRES: [&str; 5] = [
    "--reuid=postgres",
    "--regid=postgres",
    "--init-groups",
    "--pdeathsig=KILL",
    "--",
];

/// Starts PostgreSQL on `host`'s addresses (both families), port 5432, with the check user `lbcheck`
/// (password login, scram-sha-256, from the test bed's segment), and waits until it
/// accepts connections.
pub fn start_postgres(bed: &Testbed, host: &Host) -> Result<Postgres> {
    let dir = tempfile::Builder::new()
        .prefix("lbt-pg-")
        .tempdir()
        .context("creating a temp dir")?;
    let owned = dir.path().join("pg");
    fs::create_dir(&owned)?;
    run_ok(Command::new("chown").arg("postgres:postgres").arg(&owned))?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
    let data = owned.join("data");
    run_ok(
        Command::new("setpriv")
            .args(AS_POSTGRES)
            .arg(pg_bin("initdb")?)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-N",
            ]),
    )
    .context("initdb")?;
    let mut hba = fs::OpenOptions::new()
        .append(true)
        .open(data.join("pg_hba.conf"))?;
    std::io::Write::write_all(
        &mut hba,
        b"host all all 10.99.0.0/24 scram-sha-256\nhost all all fd00:99::/64 scram-sha-256\n",
    )?;
    drop(hba);
    let sock = owned.to_string_lossy().into_owned();
    let mut args: Vec<String> = AS_POSTGRES.iter().map(|s| s.to_string()).collect();
    args.extend([
        pg_bin("postgres")?.to_string_lossy().into_owned(),
        "-D".into(),
        data.to_string_lossy().into_owned(),
        "-c".into(),
        format!("listen_addresses={},{}", host.ipv4, host.ipv6),
        "-c".into(),
        format!("port={PGSQL_PORT}"),
        "-c".into(),
        format!("unix_socket_directories={sock}"),
        "-c".into(),
        "shared_buffers=16MB".into(),
    ]);
    let mut proc = bed.spawn_in(&host.ns, "setpriv", &args)?;
    wait_until(START_TIMEOUT, || {
        if let Some(status) = proc.try_wait() {
            bail!("postgres exited with {status}:\n{}", proc.log());
        }
        Ok(proc
            .log()
            .contains("database system is ready to accept connections"))
    })
    .context("waiting for postgres to start")?;
    run_ok(
        Command::new("psql")
            .args(["-X", "-q", "-h", &sock, "-p"])
            .arg(PGSQL_PORT.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!(
                "CREATE ROLE {CHECK_USER} LOGIN PASSWORD '{CHECK_PASSWORD}'"
            )),
    )
    .with_context(|| format!("creating the check user; postgres log:\n{}", proc.log()))?;
    Ok(Postgres {
        proc,
        host: host.clone(),
        _dir: dir,
    })
}

/// Writes a credentials file `name` in the test bed's dir with the given mode.
pub fn credentials_file(
    bed: &Testbed,
    name: &str,
    user: &str,
    password: &str,
    database: Option<&str>,
    mode: u32,
) -> Result<PathBuf> {
    let path = bed.dir().join(name);
    let mut text = format!("user = \"{user}\"\npassword = \"{password}\"\n");
    if let Some(db) = database {
        text.push_str(&format!("database = \"{db}\"\n"));
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(path)
}

/// One health probe of `target` as the agent would make it, from inside the balancer's
/// namespace: a thread of ours joins that namespace and runs the probe on its own runtime.
pub fn probe_from_balancer(bed: &Testbed, spec: &CheckSpec, target: SocketAddr) -> Result<String> {
    spec.validate()?;
    let netns = Path::new("/run/netns").join(&bed.lb.ns);
    let spec = spec.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            let ns =
                fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
            // SAFETY: a plain syscall on an fd we hold; it moves only this thread, which
            // nothing else uses, into the namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "setns {}: {}",
                    netns.display(),
                    std::io::Error::last_os_error()
                );
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(health::probe(&spec, target, None))
        })
        .join()
        .map_err(|_| anyhow!("the probe thread panicked"))?
    })
}

/// Probes until the result is `up` (Ok) or not, every 200 ms for at most `timeout`;
/// returns the last result's detail.
pub fn wait_probe(
    bed: &Testbed,
    spec: &CheckSpec,
    target: SocketAddr,
    up: bool,
    timeout: Duration,
) -> Result<String> {
    let mut last = String::new();
    let result = wait_until(timeout, || {
        let r = probe_from_balancer(bed, spec, target);
        let ok = r.is_ok();
        last = match r {
            Ok(s) => s,
            Err(e) => format!("{e:#}"),
        };
        if ok != up {
            std::thread::sleep(Duration::from_millis(150));
        }
        Ok(ok == up)
    });
    result.with_context(|| {
        format!(
            "{} check of {target} not {} within {timeout:?}; last: {last}",
            spec.check,
            if up { "up" } else { "down" }
        )
    })?;
    Ok(last)
}

/// Makes `vip` a second VIP address of the test bed (beside `VIP4`): held on every
/// backend's loopback (direct server return) and routed by the client via the balancer.
pub fn add_vip_address(bed: &Testbed, vip: std::net::Ipv4Addr) -> Result<()> {
    for b in &bed.backends {
        bed.ip(&b.ns, &["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
    }
    bed.ip(
        &bed.client.ns,
        &[
            "route",
            "replace",
            &format!("{vip}/32"),
            "via",
            &bed.lb.ipv4.to_string(),
        ],
    )
}

/// Runs `sql` as the application's user through `to` from the client's namespace (the
/// `mariadb` client, a 3 s connect timeout); its rows, tab-separated, or its error.
pub fn client_sql(bed: &Testbed, to: SocketAddr, sql: &str) -> Result<String> {
    let out = bed.run_in(
        &bed.client.ns,
        "mariadb",
        [
            "--no-defaults",
            "-h",
            &to.ip().to_string(),
            "-P",
            &to.port().to_string(),
            &format!("-u{APP_USER}"),
            &format!("-p{APP_PASSWORD}"),
            "--connect-timeout=3",
            "-N",
            "-B",
            "-e",
            sql,
        ],
    )?;
    if !out.status.success() {
        bail!(
            "`{sql}` through {to}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---- the web tier: nginx serving HTTPS -------------------------------------------------------

pub const HTTPS_PORT: u16 = 443;
/// The site's name: in its certificate, and resolved to the VIP by the clients.
pub const SITE: &str = "shop.test";

/// A CA and the site's certificate it signed, made at test time with `openssl`.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA and a certificate for `SITE` (also valid for `vip`) under `dir`.
pub fn make_tls(dir: &Path, vip: std::net::IpAddr) -> Result<Tls> {
    let p = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args)).context("openssl (./x.sh installs it)")
    };
    let s = |path: PathBuf| path.display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=lb test CA",
        "-keyout",
        &s(p("ca.key")),
        "-out",
        &s(p("ca.pem")),
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={SITE}"),
        "-keyout",
        &s(p("site.key")),
        "-out",
        &s(p("site.csr")),
    ])?;
    fs::write(
        p("site.ext"),
        format!("subjectAltName = DNS:{SITE}, IP:{vip}\nextendedKeyUsage = serverAuth\n"),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(p("site.csr")),
        "-CA",
        &s(p("ca.pem")),
        "-CAkey",
        &s(p("ca.key")),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(p("site.ext")),
        "-out",
        &s(p("site.pem")),
    ])?;
    Ok(Tls {
        ca: p("ca.pem"),
        cert: p("site.pem"),
        key: p("site.key"),
    })
}

/// Starts nginx on `host` serving HTTPS on port 443 with `tls`, answering every request
/// with `backend NAME` (so a client sees which server answered), and waits until it
/// listens.
pub fn start_nginx(bed: &Testbed, host: &Host, name: &str, tls: &Tls) -> Result<Proc> {
    let dir = bed.dir().join(format!("nginx-{name}"));
    fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log {dir}/access.log;\n  client_body_temp_path {dir};\n\
             proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n\
             scgi_temp_path {dir};\n  server {{\n    listen {HTTPS_PORT} ssl;\n\
             listen [::]:{HTTPS_PORT} ssl;\n    server_name {SITE};\n\
             ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
             location / {{ default_type text/plain; return 200 \"backend {name}\\n\"; }}\n  }}\n}}\n",
            dir = dir.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
        ),
    )?;
    let conf = conf.display().to_string();
    let mut proc = bed.spawn_in(
        &host.ns,
        "nginx",
        [
            "-p",
            &dir.display().to_string(),
            "-c",
            &conf,
            "-e",
            "stderr",
        ],
    )?;
    wait_until(START_TIMEOUT, || {
        if let Some(status) = proc.try_wait() {
            bail!("nginx exited with {status}:\n{}", proc.log());
        }
        let listening = bed.run_in(&host.ns, "ss", ["-Hltn", &format!("sport = :{HTTPS_PORT}")]);
        Ok(listening.is_ok_and(|o| !o.stdout.is_empty()))
    })
    .with_context(|| format!("waiting for nginx {name} to listen"))?;
    Ok(proc)
}

/// One HTTPS request from the client's namespace to `SITE` resolved to `vip`, verifying
/// the certificate against `ca` (curl's `--cacert`, `--resolve`), from the client's address
/// `from` (one of its addresses); a new connection each time. The body, or the error.
pub fn https_get(
    bed: &Testbed,
    vip: SocketAddr,
    ca: &Path,
    from: std::net::IpAddr,
) -> Result<String> {
    let out = bed.run_in(
        &bed.client.ns,
        "curl",
        [
            "--silent",
            "--show-error",
            "--max-time",
            "5",
            "--cacert",
            &ca.display().to_string(),
            "--resolve",
            &format!("{SITE}:{}:{}", vip.port(), vip.ip()),
            "--interface",
            &from.to_string(),
            &format!("https://{SITE}:{}/", vip.port()),
        ],
    )?;
    if !out.status.success() {
        bail!(
            "curl https://{SITE}/ via {vip} from {from}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A long-lived application session through `to` from the client's namespace (the
/// `mariadb` client running `SELECT SLEEP(secs)`); killing the returned process closes the
/// connection from the client's side (its kernel sends the FIN).
pub fn client_session(bed: &Testbed, to: SocketAddr, secs: u32) -> Result<Proc> {
    bed.spawn_in(
        &bed.client.ns,
        "mariadb",
        [
            "--no-defaults".to_string(),
            "-h".into(),
            to.ip().to_string(),
            "-P".into(),
            to.port().to_string(),
            format!("-u{APP_USER}"),
            format!("-p{APP_PASSWORD}"),
            "-e".into(),
            format!("SELECT SLEEP({secs})"),
        ],
    )
}

impl Mariadb {
    /// The application's sessions open on this server now.
    pub fn app_sessions(&self) -> Result<u32> {
        let n = self.sql(&format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '{APP_USER}'"
        ))?;
        n.trim()
            .parse()
            .with_context(|| format!("session count {n:?}"))
    }
}
