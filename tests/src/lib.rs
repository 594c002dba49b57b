pub mod e2e;
pub mod fixtures;
pub mod fleet;
pub mod flowsync;
pub mod nat;
pub mod stack;
pub mod vrrp;
