//! The TOML configuration file: loaded at start, written back after every change made from
//! the CLI, so a restarted agent comes back with exactly what it had.
//!
//! ```toml
//! [[vip]]
//! address = "10.99.1.1:80"
//! proto = "tcp"
//!
//! algo = "rr"               # or "maglev"
//!
//! [vip.check]                # optional; fields default to HAProxy's
//! check = "http:/health"     # none | tcp | http:/PATH | tls
//! interval_ms = 2000
//! rise = 2
//! fall = 3
//!
//! [[vip.backend]]
//! address = "10.99.0.11"
//! weight = 3                 # default 1
//! backup = false
//! drain = false
//! ```

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::{
    health::CheckSpec,
    model::{Algo, Proto},
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "vip", skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<VipConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    pub address: SocketAddr,
    #[serde(default)]
    pub proto: Proto,
    #[serde(default)]
    pub algo: Algo,
    #[serde(default, skip_serializing_if = "is_default")]
    pub check: CheckSpec,
    #[serde(default, rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    #[serde(default = "default_weight", skip_serializing_if = "is_default_weight")]
    pub weight: u32,
    /// Takes new flows only while no primary backend can.
    #[serde(default, skip_serializing_if = "is_false")]
    pub backup: bool,
    /// In maintenance: keeps its flows, gets no new ones.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drain: bool,
    /// Replaces the VIP's check for this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
}

fn default_weight() -> u32 {
    1
}

fn is_default_weight(w: &u32) -> bool {
    *w == default_weight()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl Config {
    /// Reads `path`; a missing file is an empty configuration (first start).
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(anyhow!("{}: {e}", path.display())),
        };
        Self::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// Parses configuration text; errors are one line and name the line and field.
    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', " ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    anyhow!("line {line}: {message}")
                }
                None => anyhow!("{message}"),
            }
        })
    }

    /// Writes the configuration so that a crash at any moment leaves either the old file or
    /// the new one, never a torn one: temp file in the same directory, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).context("serializing the configuration")?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp: PathBuf = dir.join(format!(
            ".{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("lb.toml")
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(b"# Written by the lb agent; edits made while it runs are overwritten.\n")?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let text = r#"
[[vip]]
address = "10.0.0.1:80"
proto = "tcp"
[[vip.backend]]
address = "10.0.0.11"
[[vip.backend]]
address = "10.0.0.12"
weight = 3
backup = true

[[vip]]
address = "[fd00::1]:53"
proto = "udp"
"#;
        let config = Config::parse(text).unwrap();
        assert_eq!(config.vips.len(), 2);
        assert_eq!(config.vips[0].backends.len(), 2);
        assert_eq!(config.vips[1].proto, Proto::Udp);
        assert_eq!(config.vips[0].backends[0].weight, 1);
        assert!(config.vips[0].backends[1].backup);
        let again = Config::parse(&toml::to_string_pretty(&config).unwrap()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let text = "[[vip]]\naddress = \"10.0.0.1:80\"\nprotocol = \"tcp\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.starts_with("line 3:"), "{err}");
        assert!(err.contains("protocol"), "{err}");
        assert!(!err.contains('\n'), "{err}");

        let err = Config::parse("[[vip]]\naddress = \"10.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("line 2:"), "{err}");
    }

    #[test]
    fn save_is_atomic_and_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        let config = Config::parse("[[vip]]\naddress = \"10.0.0.1:80\"\n").unwrap();
        config.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), config);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left behind: {names:?}");
    }
}
