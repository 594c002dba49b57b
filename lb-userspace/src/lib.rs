//! The agent and CLI of the XDP load balancer. The folders follow the architecture:
//!
//! - [`state`]: VIPs, backends, rings, health and adoption, and every change to them;
//!   kernel-free, writing the data plane through the small [`state::Dataplane`] trait.
//! - [`kernel`]: the BPF maps and program ([`kernel::datapath`], which implements that
//!   trait), rtnetlink ([`kernel::netif`]) and the flow-table walker.
//! - [`api`]: the control protocol, the socket server and the views it answers with.
//! - [`health`]: health checks. [`monitor`]: metrics, the status page and its HTTP server.
//! - [`cli`]: the `lb` command line, its tables and `stats --watch`.
//! - [`fleet`]: announcing VIP addresses to routers (BGP + ECMP), leave and join.
//! - [`flowsync`]: sharing flow pins with peer balancers.
//! - [`tunnel`]: the balancer's end of tunnel and gue VIPs; [`decap`]: `lb decap`, the
//!   backends' end.
//! - [`nat`]: full NAT's SNAT addresses and the sweeper of its translations.
//! - [`config`] the configuration file, [`model`] the domain's small types, [`run`] the
//!   agent's run loop.

pub mod api;
pub mod cli;
pub mod config;
pub mod decap;
pub mod fleet;
pub mod flowsync;
pub mod health;
pub mod kernel;
pub mod manual;
pub mod model;
pub mod monitor;
pub mod nat;
pub mod run;
pub mod service;
pub mod state;
pub mod tunnel;

// The paths tools and tests know.
pub use api::protocol as control;
pub use kernel::{datapath, netif};

/// The compiled XDP program, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
