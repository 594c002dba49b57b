//! Development tasks for the load balancer, and the namespace test bed the end-to-end tests
//! and the demo run in.

pub mod fleet;
pub mod machine;
pub mod package;
pub mod testbed;
pub mod traffic;
pub mod xdp_pass;
