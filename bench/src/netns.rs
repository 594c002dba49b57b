//! Running code of this process inside a test bed namespace, and reading interface facts
//! there, without a helper process.

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

/// Runs `f` on a new thread that has joined network namespace `ns` (under /run/netns);
/// the rest of the process stays where it is.
pub fn run_in<R: Send>(ns: &str, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall on a valid fd; it changes only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns({path}): {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread in {ns} panicked"))?
    })
}

/// `ip -j -s -n NS link show DEV`, parsed.
fn link(ns: &str, dev: &str) -> Result<Value> {
    let out = Command::new("ip")
        .args(["-j", "-s", "-n", ns, "link", "show", "dev", dev])
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} link show {dev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v.get(0)
        .cloned()
        .ok_or_else(|| anyhow!("no link {dev} in {ns}"))
}

/// The interface's MAC address.
pub fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let v = link(ns, dev)?;
    let s = v["address"]
        .as_str()
        .ok_or_else(|| anyhow!("{dev} in {ns} has no address"))?;
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// The interface's index.
pub fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    let v = link(ns, dev)?;
    v["ifindex"]
        .as_u64()
        .map(|i| i as u32)
        .ok_or_else(|| anyhow!("{dev} in {ns}: no ifindex"))
}

/// Packets the interface received (the kernel's counter).
pub fn rx_packets(ns: &str, dev: &str) -> Result<u64> {
    let v = link(ns, dev)?;
    v["stats64"]["rx"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("{dev} in {ns}: no rx counter"))
}

/// The id of the XDP program attached to the interface.
pub fn xdp_prog_id(ns: &str, dev: &str) -> Result<u32> {
    let v = link(ns, dev)?;
    v["xdp"]["prog"]["id"]
        .as_u64()
        .map(|i| i as u32)
        .ok_or_else(|| anyhow!("no XDP program on {dev} in {ns}"))
}
