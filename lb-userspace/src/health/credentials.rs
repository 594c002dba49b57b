//! The check user's credentials for database checks (`mysql*`, `pgsql`): a small TOML file
//! that only root may read, never a command-line argument (which every user sees in `ps`).
//!
//! ```toml
//! user = "lbcheck"
//! password = "s3cret"
//! database = "postgres"   # optional, pgsql only (PostgreSQL's default: the user's name)
//! ```

use std::{fmt, fs, io::Read as _, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    #[serde(default)]
    pub database: Option<String>,
}

/// Never prints the password (checks log their errors).
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .field("database", &self.database)
            .finish()
    }
}

impl Credentials {
    /// Reads `path`, refusing a file that anyone but root could read. Checks read it at each
    /// probe, so a changed password takes effect without restarting the agent.
    pub fn load(path: &Path) -> Result<Credentials> {
        let shown = path.display();
        let text = read_root_only(path, "credentials")?;
        let creds: Credentials = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start].matches('\n').count() + 1)
                .unwrap_or(1);
            // The parser's message may quote the line, so only its first line is kept, and
            // never a value (the password) from the file.
            let what = e.message().lines().next().unwrap_or("invalid").to_string();
            anyhow::anyhow!("credentials {shown}: line {line}: {what}")
        })?;
        if creds.user.is_empty() {
            bail!("credentials {shown}: empty user");
        }
        Ok(creds)
    }
}

/// Reads a secret (`what`, for errors: the check user's credentials, the fleet key),
/// refusing a file that anyone but root could read.
pub fn read_root_only(path: &Path, what: &str) -> Result<String> {
    let shown = path.display();
    let mut file = fs::File::open(path).with_context(|| format!("{what} {shown}"))?;
    // The opened file's own metadata: no window between checking and reading.
    let meta = file.metadata().with_context(|| format!("{what} {shown}"))?;
    let mode = meta.mode() & 0o777;
    if meta.uid() != 0 {
        bail!(
            "{what} {shown}: owned by uid {}, not root (chown root and chmod 600 it)",
            meta.uid()
        );
    }
    if mode & 0o077 != 0 {
        bail!("{what} {shown}: mode {mode:03o} lets group or others read it (chmod 600 it)");
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("{what} {shown}"))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn loads_a_root_only_file_and_refuses_a_readable_one() {
        // SAFETY: plain syscall.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root: credentials files must be owned by root"
        );
        let dir = tempfile::tempdir().unwrap();
        let text = "user = \"lbcheck\"\npassword = \"pw\"\n";
        let good = write(dir.path(), "good", text, 0o600);
        let creds = Credentials::load(&good).unwrap();
        assert_eq!(creds.user, "lbcheck");
        assert_eq!(creds.password, "pw");
        assert_eq!(creds.database, None);
        assert!(!format!("{creds:?}").contains("pw\""), "{creds:?}");

        for mode in [0o640, 0o604, 0o644] {
            let open = write(dir.path(), &format!("open{mode:o}"), text, mode);
            let err = format!("{:#}", Credentials::load(&open).unwrap_err());
            assert!(err.contains("chmod 600"), "{err}");
            assert!(err.contains(&open.display().to_string()), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }

        let bad = write(
            dir.path(),
            "bad",
            "user = \"u\"\npassword = \"secretvalue\"\nport = 1\n",
            0o600,
        );
        let err = format!("{:#}", Credentials::load(&bad).unwrap_err());
        assert!(err.contains("line 3"), "{err}");
        assert!(!err.contains("secretvalue"), "{err}");
        assert!(Credentials::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn database_checks_need_a_credentials_file() {
        use crate::health::{CheckKind, CheckSpec};
        for check in ["mysql", "mysql-primary", "mysql-replica", "pgsql"] {
            let spec = CheckSpec {
                check: check.parse().unwrap(),
                ..Default::default()
            };
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains("--credentials"), "{check}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let open = write(
            dir.path(),
            "open",
            "user = \"u\"\npassword = \"p\"\n",
            0o644,
        );
        let spec = CheckSpec {
            check: CheckKind::Pgsql,
            credentials: Some(open),
            ..Default::default()
        };
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
    }
}
