//! Benchmarks of the load balancer, run by `cargo xtask bench` (`./x.sh bench`); results
//! and how they were made are in BENCHMARKS.md. Timings are reported, never asserted:
//! every figure is a ratio against a baseline measured in the same run, because the
//! machine is shared and absolute numbers move.

pub mod bpf;
pub mod control;
pub mod dataplane;
pub mod e2e;
pub mod flowsync;
pub mod netns;
pub mod profile;
pub mod report;
pub mod stats;
