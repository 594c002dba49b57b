//! The agent and CLI of the XDP load balancer.

pub mod agent;
pub mod config;
pub mod control;
pub mod datapath;
pub mod health;
pub mod manual;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod netif;
pub mod service;
pub mod status;
pub mod table;
pub mod watch;

/// The compiled XDP program, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
