//! The only code that touches frame memory: one bounds-checked load and one bounds-checked
//! store. Everything else in the program is safe Rust over the values these return.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// Plain data that may be read from or written to any bytes of a frame: every bit pattern
/// is a valid value and there is no padding.
///
/// # Safety
/// Implement only for integers and arrays of them.
pub unsafe trait FrameData: Copy {}
unsafe impl FrameData for u8 {}
unsafe impl FrameData for u16 {}
unsafe impl FrameData for u32 {}
unsafe impl<const N: usize> FrameData for [u8; N] {}
unsafe impl<const N: usize> FrameData for [u16; N] {}

/// The `T` at `offset` bytes into the frame, or `None` when the frame is shorter.
#[inline(always)]
pub fn load<T: FrameData>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let at = ctx.data() + offset;
    if at + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: `at .. at + size_of::<T>()` lies inside the frame (checked above; the verifier
    // refuses the program unless it can see the same check), the kernel keeps the frame
    // mapped for the whole run, any bytes are a valid `T` (`FrameData`), and headers sit at
    // any offset, hence the unaligned read.
    Some(unsafe { (at as *const T).read_unaligned() })
}

/// Writes `value` at `offset` bytes into the frame; `None` (and nothing written) when the
/// frame is shorter.
#[inline(always)]
pub fn store<T: FrameData>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let at = ctx.data() + offset;
    if at + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: as for `load`; XDP frames are writable, and no reference into the frame is
    // alive across this write (all reads copy out through `load`).
    unsafe { (at as *mut T).write_unaligned(value) };
    Some(())
}
