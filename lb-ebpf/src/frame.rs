//! The only code that touches frame memory: one bounds-checked load and one bounds-checked
//! store, of one machine word each. Everything else in the program is safe Rust over the
//! values these return.

use core::{arch::asm, mem::size_of};

use aya_ebpf::programs::XdpContext;

/// An integer the program moves between a frame and a register with one instruction.
pub trait Word: Copy + sealed::Sealed {
    /// # Safety
    /// `at .. at + size_of::<Self>()` must be readable frame memory.
    unsafe fn read(at: usize) -> Self;
    /// # Safety
    /// `at .. at + size_of::<Self>()` must be writable frame memory.
    unsafe fn write(at: usize, value: Self);
}

mod sealed {
    pub trait Sealed {}
}

// Headers sit at any offset, so most of these accesses are unaligned. Rust only offers that
// as `read_unaligned`, which the BPF backend splits into byte loads, shifts and ORs; the BPF
// load and store instructions themselves take any address on the architectures this runs on
// (x86-64, arm64: the verifier enforces alignment only where the CPU needs it), so each
// access is written as its one instruction.
macro_rules! word {
    ($t:ty, $size:literal) => {
        impl sealed::Sealed for $t {}
        impl Word for $t {
            #[inline(always)]
            unsafe fn read(at: usize) -> Self {
                let value: $t;
                // SAFETY: the caller's contract; the asm only reads those bytes.
                unsafe {
                    asm!(
                        concat!("{v} = *(", $size, " *)({p} + 0)"),
                        p = in(reg) at,
                        v = lateout(reg) value,
                        options(nostack, readonly, preserves_flags),
                    );
                }
                value
            }

            #[inline(always)]
            unsafe fn write(at: usize, value: Self) {
                // SAFETY: the caller's contract; the asm only writes those bytes.
                unsafe {
                    asm!(
                        concat!("*(", $size, " *)({p} + 0) = {v}"),
                        p = in(reg) at,
                        v = in(reg) value,
                        options(nostack, preserves_flags),
                    );
                }
            }
        }
    };
}

word!(u8, "u8");
word!(u16, "u16");
word!(u32, "u32");
word!(u64, "u64");

/// The `T` at `offset` bytes into the frame (raw bytes: network order for multi-byte
/// fields), or `None` when the frame is shorter.
#[inline(always)]
pub fn load<T: Word>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let at = ctx.data() + offset;
    if at + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: `at .. at + size_of::<T>()` lies inside the frame (checked just above; the
    // verifier refuses the program unless it sees the same check), and the kernel keeps the
    // frame mapped and writable for the whole run.
    Some(unsafe { T::read(at) })
}

/// Writes `value` at `offset` bytes into the frame; `None`, and nothing written, when the
/// frame is shorter.
#[inline(always)]
pub fn store<T: Word>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let at = ctx.data() + offset;
    if at + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: as for `load`; no Rust reference into the frame exists anywhere.
    unsafe { T::write(at, value) };
    Some(())
}
