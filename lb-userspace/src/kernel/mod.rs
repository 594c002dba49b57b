//! Everything that talks to the kernel: the XDP program and its maps, rtnetlink, and
//! batched map access.

pub mod batch;
pub mod datapath;
pub mod flows;
pub mod netif;
