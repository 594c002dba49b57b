//! Running under systemd: readiness, watchdog and reload notifications (`Type=notify`,
//! sd_notify(3) through the `sd-notify` crate) and log lines the journal files under the
//! right priority.
//!
//! Everything here is a no-op when the agent does not run under systemd (no
//! `NOTIFY_SOCKET`, no `WATCHDOG_USEC`, stderr not the journal), so `lb run` in a terminal
//! behaves as before.

use std::{
    future::Future, io::Write as _, os::unix::fs::MetadataExt as _, sync::LazyLock, time::Duration,
};

use anyhow::Result;
use sd_notify::NotifyState;
use tokio::task::JoinHandle;

/// `lb --version`: the crate version, and the commit when the build was given one
/// (`LB_COMMIT`, set by `cargo xtask package`).
pub static VERSION: LazyLock<String> = LazyLock::new(|| match option_env!("LB_COMMIT") {
    Some(commit) if !commit.is_empty() => {
        format!("{} (commit {commit})", env!("CARGO_PKG_VERSION"))
    }
    _ => env!("CARGO_PKG_VERSION").to_string(),
});

/// True when stderr is the journal: systemd sets `JOURNAL_STREAM` to the device and inode
/// of the stream it connected, and a child whose stderr was redirected keeps the variable
/// but not the stream, hence the comparison (as sd_journal_stream_fd(3) advises).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

/// The syslog priority (sd-daemon(3) `<N>` prefix) the journal files a log level under.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Sets up logging (`RUST_LOG`, default `info`). Under the journal each line starts with
/// its priority as `<N>` and carries no timestamp (the journal adds its own), so
/// `journalctl -u lb@eth0 -p warning` shows warnings and errors only.
pub fn init_logging() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if stderr_is_journal() {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "<{}>{}: {}",
                priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    builder.init();
}

/// Prefix for a line printed straight to stderr that reports a fatal error: `<3>` under the
/// journal (priority "err"), nothing in a terminal.
pub fn error_prefix() -> &'static str {
    if stderr_is_journal() { "<3>" } else { "" }
}

fn notify(what: &str, states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("telling systemd {what}: {e}");
    }
}

/// Tells systemd the agent is ready (the program attached, the control socket and the
/// metrics listener open), with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    notify("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the agent is stopping (it detaches, or leaves the pinned program
/// forwarding, next).
pub fn stopping() {
    notify(
        "STOPPING",
        &[NotifyState::Stopping, NotifyState::Status("stopping")],
    );
}

/// Runs a reload (on SIGHUP) between RELOADING=1 and READY=1, so systemd shows the unit
/// "reloading" meanwhile. `apply` says what it did in one line, which is logged and becomes
/// the status line; a failed reload is logged as an error and shown in the status line, and
/// the agent keeps running with what it had.
pub async fn reload(apply: impl Future<Output = Result<String>>) {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ];
    // systemd >= 253 wants the time of the reload with RELOADING=1; older ones ignore it.
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify("RELOADING", &states);
    match apply.await {
        Ok(done) => {
            log::info!("reload: {done}");
            ready(&done);
        }
        Err(e) => {
            log::error!("reload failed, keeping the running configuration: {e:#}");
            ready(&format!("reload failed: {e:#}").replace('\n', " "));
        }
    }
}

/// How often to ping a watchdog of `timeout`: at half of it, as sd_watchdog_enabled(3)
/// advises, so one late tick does not trip it.
fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_millis(10))
}

/// When systemd runs a watchdog for this process (`WatchdogSec=`), pings it from a task
/// that first takes `liveness` (the agent's lock): an agent whose lock is stuck, or whose
/// runtime no longer runs tasks, stops pinging and systemd restarts it, which is hitless
/// since the pinned program keeps forwarding. Returns the task, or `None` without a
/// watchdog.
pub fn spawn_watchdog<F, Fut>(alive: F) -> Option<JoinHandle<()>>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let timeout = sd_notify::watchdog_enabled()?;
    log::debug!("systemd watchdog every {timeout:?}");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(ping_interval(timeout));
        loop {
            tick.tick().await;
            alive().await;
            notify("WATCHDOG", &[NotifyState::Watchdog]);
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    #[test]
    fn journal_priorities_follow_syslog() {
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Warn), 4);
        assert_eq!(priority(log::Level::Info), 6);
        assert_eq!(priority(log::Level::Debug), 7);
    }

    #[test]
    fn watchdog_pings_at_half_its_timeout() {
        assert_eq!(
            ping_interval(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
    }

    /// The datagrams systemd would get, through a socket standing in for its own. One test
    /// touches `NOTIFY_SOCKET`, so no other test races on the variable.
    #[tokio::test]
    async fn reload_is_bracketed_by_reloading_and_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // SAFETY: the only test in this binary that reads or writes the environment.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let mut buf = [0u8; 512];
        let mut next = || {
            let n = sock.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };

        reload(async { Ok("configuration applied".to_string()) }).await;
        let first = next();
        assert!(first.starts_with("RELOADING=1\n"), "{first:?}");
        assert!(first.contains("MONOTONIC_USEC="), "{first:?}");
        let second = next();
        assert!(second.starts_with("READY=1\n"), "{second:?}");
        assert!(
            second.contains("STATUS=configuration applied"),
            "{second:?}"
        );

        reload(async { Err(anyhow::anyhow!("lb.toml: line 3: bad")) }).await;
        assert!(next().starts_with("RELOADING=1\n"));
        let after = next();
        assert!(after.starts_with("READY=1\n"), "{after:?}");
        assert!(
            after.contains("STATUS=reload failed: lb.toml: line 3: bad"),
            "{after:?}"
        );

        stopping();
        assert!(next().starts_with("STOPPING=1\n"));
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    }
}
