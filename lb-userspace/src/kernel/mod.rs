//! Everything that talks to the kernel: the XDP program and its maps, rtnetlink, batched
//! map access, and the pinned maps' layout across versions.

pub mod batch;
pub mod datapath;
pub mod flows;
pub mod layout;
pub mod netif;
