//! Per-CPU counters: no CPU ever writes another's cache line.

use aya_ebpf::maps::PerCpuArray;
use lb_common::Counters;

/// One packet of `bytes` bytes under `index`.
#[inline(always)]
pub fn packet(map: &PerCpuArray<Counters>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU array element is this CPU's alone while the program runs.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// One new flow under `index`.
#[inline(always)]
pub fn new_flow(map: &PerCpuArray<Counters>, index: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: as in `packet`.
        unsafe { (*c).new_flows += 1 };
    }
}
