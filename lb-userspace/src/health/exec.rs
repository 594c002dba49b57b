//! External checks (HAProxy's `external-check`): `exec:/path/to/script` runs the script with
//! the backend's address and port as arguments (`SCRIPT ADDR PORT`) and in its environment
//! (`LB_BACKEND_ADDR`, `LB_BACKEND_PORT`); exit status 0 means up. The script runs in its
//! own process group with an empty environment but for those and a standard PATH; when the
//! check times out the whole group is killed, so a hung script leaves nothing behind.

use std::{
    net::SocketAddr,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    process::{Child, Command},
};

/// How much of the script's stderr is kept for the check's detail.
const STDERR_KEPT: u64 = 512;

/// The script of `exec:PATH`: an absolute path, so what runs does not depend on the
/// agent's working directory.
pub fn parse_script(s: &str) -> Result<PathBuf> {
    if !s.starts_with('/') || s.chars().any(|c| c.is_control()) {
        bail!("bad external check {s:?}: write exec:/absolute/path/to/script");
    }
    Ok(PathBuf::from(s))
}

/// Runs `script ADDR PORT` for `target` and waits for it; Ok when it exits 0. The caller
/// bounds the time (dropping this future kills the script's process group).
pub async fn check(script: &Path, target: SocketAddr) -> Result<String> {
    let (addr, port) = (target.ip().to_string(), target.port().to_string());
    let mut cmd = Command::new(script);
    cmd.args([&addr, &port])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LB_BACKEND_ADDR", &addr)
        .env("LB_BACKEND_PORT", &port)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", script.display()))?;
    let mut running = Running(Some(child));
    let child = running.0.as_mut().expect("just set");
    let stderr = child.stderr.take();
    let (status, message) = tokio::join!(child.wait(), first_line(stderr));
    let status = status.with_context(|| format!("waiting for {}", script.display()))?;
    // Reaped: the PID may be reused from now on, so the group must not be signalled.
    running.0 = None;
    let said = if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    };
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(format!("exit 0{said}")),
        (Some(code), _) => bail!("exit {code}{said}"),
        (None, signal) => bail!("killed by signal {}{said}", signal.unwrap_or(0)),
    }
}

/// A started script not yet reaped; dropping it (a timed-out check) kills its group.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = self.0.as_ref().and_then(Child::id) {
            // SAFETY: a plain syscall. The script leads its own process group (pgid = its
            // PID) and is not reaped yet, so that group ID still names our script's group.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        }
    }
}

/// The first line of what the script writes to stderr (at most [`STDERR_KEPT`] bytes are
/// kept); the rest is read and discarded so the script never blocks on a full pipe.
async fn first_line(stderr: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stderr) = stderr else {
        return String::new();
    };
    let mut kept = Vec::new();
    let _ = (&mut stderr).take(STDERR_KEPT).read_to_end(&mut kept).await;
    let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&kept)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _, time::Duration};

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        path
    }

    fn alive(pid: &str) -> bool {
        // A zombie (Z) has exited; only its parent has not reaped it yet.
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[test]
    fn scripts_must_be_absolute() {
        assert_eq!(parse_script("/a/b").unwrap(), PathBuf::from("/a/b"));
        assert!(parse_script("a/b").is_err());
        assert!(parse_script("").is_err());
    }

    #[tokio::test]
    async fn exit_status_decides_and_the_backend_is_passed() {
        let dir = tempfile::tempdir().unwrap();
        let target: SocketAddr = "192.0.2.7:3306".parse().unwrap();
        let args = script(
            dir.path(),
            "args",
            r#"[ "$1 $2" = "192.0.2.7 3306" ] || { echo "args: $*" >&2; exit 1; }
[ "$LB_BACKEND_ADDR:$LB_BACKEND_PORT" = "192.0.2.7:3306" ] || { echo "env: $LB_BACKEND_ADDR" >&2; exit 1; }
[ -z "$HOME" ] || { echo "environment not cleared" >&2; exit 1; }
exit 0"#,
        );
        assert_eq!(check(&args, target).await.unwrap(), "exit 0");
        let down = script(dir.path(), "down", "echo 'replica lagging' >&2; exit 3");
        let err = check(&down, target).await.unwrap_err().to_string();
        assert_eq!(err, "exit 3: replica lagging");
        let killed = script(dir.path(), "killed", "kill -9 $$");
        let err = check(&killed, target).await.unwrap_err().to_string();
        assert_eq!(err, "killed by signal 9");
        let missing = dir.path().join("missing");
        assert!(check(&missing, target).await.is_err());
    }

    #[tokio::test]
    async fn a_timed_out_script_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let hang = script(
            dir.path(),
            "hang",
            &format!("sleep 30 & echo $! > {}\nwait", pid_file.display()),
        );
        let target: SocketAddr = "127.0.0.1:1".parse().unwrap();
        // Through the agent's probe, whose timeout drops the check mid-run.
        let spec = crate::health::CheckSpec {
            check: format!("exec:{}", hang.display()).parse().unwrap(),
            timeout_ms: 500,
            ..Default::default()
        };
        let err = crate::health::probe(&spec, target, None).await.unwrap_err();
        assert_eq!(err.to_string(), "timed out after 500 ms");
        let child = fs::read_to_string(&pid_file).unwrap();
        let child = child.trim();
        assert!(!child.is_empty());
        // SIGKILL is delivered at once, but the child's exit is asynchronous: poll briefly.
        for _ in 0..100 {
            if !alive(child) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the script's child {child} survived the check's timeout");
    }
}
