//! The agent and CLI of the XDP load balancer.

/// The compiled XDP program, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
