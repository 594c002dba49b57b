//! The PostgreSQL check through `tokio-postgres`: a login as the check user and `SELECT 1`.
//! HAProxy's `pgsql-check` stops at the server's authentication request; going one step
//! further also catches a server that greets but cannot serve (starting up, shutting down,
//! out of connection slots, or refusing the check user).

use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, Result};
use tokio_postgres::{Config, NoTls};

use super::credentials::Credentials;

/// Logs in to `target` with the credentials in `credentials` (database: theirs, or the
/// user's name as PostgreSQL's default) and runs one query; Ok says the server's version.
pub async fn check(target: SocketAddr, credentials: &Path) -> Result<String> {
    let creds = Credentials::load(credentials)?;
    let mut config = Config::new();
    config
        .hostaddr(target.ip())
        .port(target.port())
        .user(&creds.user)
        .password(&creds.password)
        .application_name("lb-health-check");
    if let Some(db) = &creds.database {
        config.dbname(db);
    }
    let (client, connection) = config.connect(NoTls).await.context("login")?;
    // The connection is driven here rather than in a spawned task, so a check that times
    // out leaves nothing running: dropping this future closes the socket.
    let query = async move {
        let rows = client.simple_query("SHOW server_version").await;
        drop(client); // lets `connection` send Terminate and finish
        rows
    };
    let (rows, closed) = tokio::join!(query, connection);
    let rows = rows.context("query")?;
    closed.context("closing")?;
    let version = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default();
    Ok(format!("login ok (PostgreSQL {version})"))
}
