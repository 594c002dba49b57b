//! MySQL/MariaDB checks through `mysql_async`: the server greeting and a login as the check
//! user (HAProxy's `mysql-check`), and, for the role checks, what the server says it is, so
//! a write VIP follows whichever server is writable.

use std::{fmt, net::SocketAddr, path::Path, str::FromStr};

use anyhow::{Context as _, Result, anyhow, bail};
use mysql_async::{Conn, OptsBuilder, Row, prelude::Queryable as _};

use super::credentials::Credentials;

/// What a MySQL backend must be to count as up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `mysql`: it greets and accepts the check user's login.
    Any,
    /// `mysql-primary`: also writable (`read_only = 0`).
    Primary,
    /// `mysql-replica`: also read-only, and replicating within the lag limit if one is set.
    Replica,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Any => "mysql",
            Role::Primary => "mysql-primary",
            Role::Replica => "mysql-replica",
        }
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        [Role::Any, Role::Primary, Role::Replica]
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| anyhow!("not a MySQL check: {s:?}"))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Logs in to `target` with the credentials in `credentials` and checks `role`; Ok says
/// what was found. `max_lag_s` applies to [`Role::Replica`] only.
pub async fn check(
    target: SocketAddr,
    role: Role,
    credentials: &Path,
    max_lag_s: Option<u64>,
) -> Result<String> {
    let creds = Credentials::load(credentials)?;
    let opts = OptsBuilder::default()
        .ip_or_hostname(target.ip().to_string())
        .tcp_port(target.port())
        .user(Some(creds.user))
        .pass(Some(creds.password))
        // Otherwise a server on a local address is asked for its Unix socket and reached
        // through that, which is not the path clients take.
        .prefer_socket(false)
        .stmt_cache_size(0);
    let mut conn = Conn::new(opts).await.context("login")?;
    let result = check_role(&mut conn, role, max_lag_s).await;
    // A clean COM_QUIT: a dropped connection counts as aborted on the server.
    let _ = conn.disconnect().await;
    result
}

async fn check_role(conn: &mut Conn, role: Role, max_lag_s: Option<u64>) -> Result<String> {
    let (major, minor, patch) = conn.server_version();
    let version = format!("{major}.{minor}.{patch}");
    if role == Role::Any {
        return Ok(format!("login ok (server {version})"));
    }
    let read_only: u8 = conn
        .query_first("SELECT @@global.read_only")
        .await
        .context("reading read_only")?
        .ok_or_else(|| anyhow!("no value for @@global.read_only"))?;
    match (role, read_only) {
        (Role::Primary, 0) => Ok("writable (read_only=0)".into()),
        (Role::Primary, _) => bail!("read-only (read_only={read_only}): not a primary"),
        (Role::Replica, 0) => bail!("writable (read_only=0): not a replica"),
        (_, _) => match max_lag_s {
            None => Ok(format!("read-only (read_only={read_only})")),
            Some(limit) => {
                let lag = replication_lag(conn).await?;
                if lag > limit {
                    bail!("replication lag {lag} s over the limit of {limit} s");
                }
                Ok(format!("read-only, replication lag {lag} s"))
            }
        },
    }
}

/// Seconds behind the primary, from the replica's status; an error when replication is not
/// configured or not running (the server then reports no lag at all).
async fn replication_lag(conn: &mut Conn) -> Result<u64> {
    // MariaDB >= 10.5 and MySQL >= 8.0.22 know SHOW REPLICA STATUS; MySQL 8.4 no longer
    // knows the older spelling.
    let rows: Vec<Row> = match conn.query("SHOW REPLICA STATUS").await {
        Ok(rows) => rows,
        Err(_) => conn
            .query("SHOW SLAVE STATUS")
            .await
            .context("reading the replica status (the check user needs REPLICA MONITOR or REPLICATION CLIENT)")?,
    };
    let row = rows
        .first()
        .ok_or_else(|| anyhow!("not replicating (no replica status)"))?;
    // MariaDB's name, then MySQL's since 8.0.22; NULL while a replication thread is stopped.
    let lag = row
        .get_opt::<Option<u64>, _>("Seconds_Behind_Master")
        .or_else(|| row.get_opt("Seconds_Behind_Source"));
    match lag {
        Some(Ok(Some(lag))) => Ok(lag),
        Some(Ok(None)) => bail!("replication not running (no lag reported)"),
        Some(Err(e)) => bail!("unreadable replication lag: {e}"),
        None => bail!("no replication lag column in the replica status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_print() {
        for r in [Role::Any, Role::Primary, Role::Replica] {
            assert_eq!(r.name().parse::<Role>().unwrap(), r);
        }
        assert!("mysql-master".parse::<Role>().is_err());
    }

    #[test]
    fn new_check_kinds_parse_and_print() {
        use crate::health::CheckKind;
        for s in [
            "mysql",
            "mysql-primary",
            "mysql-replica",
            "pgsql",
            "exec:/usr/lib/x y",
        ] {
            assert_eq!(s.parse::<CheckKind>().unwrap().to_string(), s);
        }
        for bad in ["mysql-master", "exec:", "exec:relative/script", "pgsql:x"] {
            assert!(bad.parse::<CheckKind>().is_err(), "{bad}");
        }
    }
}
