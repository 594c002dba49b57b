//! The VRRP side of "can this balancer serve": a file keepalived tracks (`track_file`),
//! holding `1` while every VIP address in the configuration can be served ([`serving`]:
//! the same rule as the BGP announcements) and `0` otherwise. keepalived multiplies the
//! value by the track's weight and adds it to the instance's priority, so a master that
//! cannot serve drops below its backup, which takes the VIPs over
//! (`packaging/keepalived/keepalived.conf`).
//!
//! The file is replaced whole (written beside it, then renamed), so keepalived never reads
//! half a value. A clean stop writes `0`; a `kill -9` leaves the last value, as it leaves
//! the BGP routes: the pinned program keeps forwarding.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::WhyNot;

/// Every VIP address of the configuration can be served (and there is one).
pub fn serving(decision: &BTreeMap<IpAddr, WhyNot>) -> bool {
    !decision.is_empty() && decision.values().all(Option::is_none)
}

/// The tracked file and the value last written to it.
pub struct TrackFile {
    path: PathBuf,
    written: Option<bool>,
}

impl TrackFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            written: None,
        }
    }

    /// Writes `serving` unless the file already says so (as far as this process knows).
    /// Returns whether it wrote.
    pub fn set(&mut self, serving: bool) -> Result<bool> {
        if self.written == Some(serving) {
            return Ok(false);
        }
        // Unknown until written again: a failed write may have left either value.
        self.written = None;
        write(&self.path, serving)?;
        self.written = Some(serving);
        Ok(true)
    }

    /// What the file says, as far as this process knows (None: not written yet, or the
    /// last write failed).
    pub fn written(&self) -> Option<bool> {
        self.written
    }
}

/// Replaces `path` with `1\n` or `0\n`.
pub fn write(path: &Path, serving: bool) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("fleet track_file {} names no file", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, if serving { "1\n" } else { "0\n" })
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn serving_needs_every_address_and_at_least_one() {
        let mut d = BTreeMap::new();
        assert!(!serving(&d), "nothing to serve is not serving");
        d.insert(ip("10.0.0.1"), None);
        assert!(serving(&d));
        d.insert(ip("10.0.0.2"), Some("no backend in rotation".into()));
        assert!(!serving(&d));
    }

    #[test]
    fn the_file_is_written_on_change_only_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serving");
        let mut track = TrackFile::new(path.clone());
        assert_eq!(track.written(), None);
        assert!(track.set(false).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n");
        assert!(track.set(true).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        // Changed behind its back: not rewritten while the value stays (keepalived reads
        // the file on change only; the agent is its only writer).
        std::fs::write(&path, "7\n").unwrap();
        assert!(!track.set(true).unwrap());
        assert!(track.set(false).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["serving"], "no temporary file is left behind");
    }

    #[test]
    fn a_write_into_a_missing_directory_fails_naming_it() {
        let mut track = TrackFile::new("/nonexistent-lb-dir/serving".into());
        let e = format!("{:#}", track.set(true).unwrap_err());
        assert!(e.contains("/nonexistent-lb-dir/serving.tmp"), "{e}");
        assert_eq!(track.written(), None);
    }
}
