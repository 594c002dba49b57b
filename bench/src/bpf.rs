//! The raw `bpf()` syscalls the benchmarks need beside aya: loading tiny baseline programs
//! written as instructions (no C toolchain, no ELF), BPF_PROG_TEST_RUN on any program fd
//! (so the baselines and the real program are timed by exactly the same code), live-frames
//! test runs, and opening an attached program by its id.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
/// Run XDP on real frames from a page pool: XDP_TX and XDP_REDIRECT really transmit.
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

pub use lb_common::xdp::{
    DROP as XDP_DROP, PASS as XDP_PASS, REDIRECT as XDP_REDIRECT, TX as XDP_TX,
};

// ---- instructions ------------------------------------------------------------------------

/// One instruction: opcode, destination and source registers, offset, immediate.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([code, (src << 4) | (dst & 0x0f), o0, o1, i0, i1, i2, i3])
}

const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const LDX_H: u8 = 0x69; // dst = *(u16 *)(src + off)
const STX_W: u8 = 0x63; // *(u32 *)(dst + off) = src
const STX_H: u8 = 0x6b; // *(u16 *)(dst + off) = src
const ST_W: u8 = 0x62; // *(u32 *)(dst + off) = imm
const ST_H: u8 = 0x6a; // *(u16 *)(dst + off) = imm
const MOV_X: u8 = 0xbf; // dst = src (64 bit)
const MOV_K: u8 = 0xb7; // dst = imm (64 bit)
const ADD_K: u8 = 0x07; // dst += imm (64 bit)
const JGT_X: u8 = 0x2d; // if dst > src goto +off
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const HELPER_REDIRECT: i32 = 23; // long bpf_redirect(u32 ifindex, u64 flags)

fn ret(action: u32) -> [u64; 2] {
    [insn(MOV_K, 0, 0, 0, action as i32), insn(EXIT, 0, 0, 0, 0)]
}

/// `return action`.
pub fn return_action(action: u32) -> Vec<u64> {
    ret(action).to_vec()
}

/// r2 = data, r3 = data_end, and `if data + 14 > data_end goto +skip` (to the drop at the
/// end, `skip` instructions after this prologue).
fn eth_prologue(skip: i16) -> [u64; 5] {
    [
        insn(LDX_W, 2, 1, 0, 0),
        insn(LDX_W, 3, 1, 4, 0),
        insn(MOV_X, 4, 2, 0, 0),
        insn(ADD_K, 4, 0, 0, 14),
        insn(JGT_X, 4, 3, skip, 0),
    ]
}

/// Swaps the destination and source MAC addresses and returns XDP_TX: the least an L2
/// forwarder can do, the baseline of the data-plane figures.
pub fn mac_swap_tx() -> Vec<u64> {
    let body = [
        insn(LDX_W, 4, 2, 0, 0),
        insn(LDX_H, 5, 2, 4, 0),
        insn(LDX_W, 6, 2, 6, 0),
        insn(LDX_H, 7, 2, 10, 0),
        insn(STX_W, 2, 6, 0, 0),
        insn(STX_H, 2, 7, 4, 0),
        insn(STX_W, 2, 4, 6, 0),
        insn(STX_H, 2, 5, 10, 0),
    ];
    let mut p = eth_prologue(body.len() as i16 + 2).to_vec();
    p.extend(body);
    p.extend(ret(XDP_TX));
    p.extend(ret(XDP_DROP));
    p
}

fn set_macs(dst: [u8; 6], src: [u8; 6]) -> [u64; 4] {
    let w = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let h = |b: &[u8]| i32::from(u16::from_le_bytes([b[0], b[1]]));
    [
        insn(ST_W, 2, 0, 0, w(&dst[0..4])),
        insn(ST_H, 2, 0, 4, h(&dst[4..6])),
        insn(ST_W, 2, 0, 6, w(&src[0..4])),
        insn(ST_H, 2, 0, 10, h(&src[4..6])),
    ]
}

/// Writes fixed MACs and returns `bpf_redirect(ifindex, 0)`: a bare XDP_REDIRECT forwarder
/// with nothing to look up, for the live-frames comparison.
pub fn set_macs_redirect(dst: [u8; 6], src: [u8; 6], ifindex: u32) -> Vec<u64> {
    let body: Vec<u64> = set_macs(dst, src)
        .into_iter()
        .chain([
            insn(MOV_K, 1, 0, 0, ifindex as i32),
            insn(MOV_K, 2, 0, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_REDIRECT),
            insn(EXIT, 0, 0, 0, 0),
        ])
        .collect();
    let mut p = eth_prologue(body.len() as i16).to_vec();
    p.extend(body);
    p.extend(ret(XDP_DROP));
    p
}

/// Writes fixed MACs and returns XDP_TX.
pub fn set_macs_tx(dst: [u8; 6], src: [u8; 6]) -> Vec<u64> {
    let body = set_macs(dst, src);
    let mut p = eth_prologue(body.len() as i16 + 2).to_vec();
    p.extend(body);
    p.extend(ret(XDP_TX));
    p.extend(ret(XDP_DROP));
    p
}

// ---- syscalls ------------------------------------------------------------------------------

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a live, correctly sized prefix of union bpf_attr for `cmd`; any
    // pointers in it point to buffers the caller keeps alive across the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads raw instructions as an XDP program: the test bed's loader, shared.
pub use xtask::xdp_pass::load_xdp;

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What one BPF_PROG_TEST_RUN call reports.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub retval: u32,
    /// The kernel's measurement: time spent running the program divided by `repeat`, ns.
    pub duration_ns: u32,
    pub size_out: u32,
}

/// Runs the program `repeat` times on `data` (each time on the frame the previous run left;
/// use 1 for programs that rewrite), optionally copying the frame out.
pub fn test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out: Option<&mut [u8]>,
    repeat: u32,
) -> io::Result<Run> {
    let (data_out, size_out) = match out {
        Some(o) => (o.as_mut_ptr() as u64, o.len() as u32),
        None => (0, 0),
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out,
        data_size_out: size_out,
        repeat,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(Run {
        retval: attr.retval,
        duration_ns: attr.duration,
        size_out: attr.data_size_out,
    })
}

/// `struct xdp_md` as test-run context input.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Runs the program on `frames` live frames built from `data`, as if received on
/// `ingress_ifindex` of the calling thread's network namespace, `batch` at a time:
/// XDP_TX and XDP_REDIRECT frames are really transmitted. Blocks until done.
pub fn test_run_live(
    prog: BorrowedFd<'_>,
    data: &[u8],
    ingress_ifindex: u32,
    frames: u32,
    batch: u32,
) -> io::Result<Run> {
    let ctx = XdpMd {
        data_end: data.len() as u32,
        ingress_ifindex,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: &ctx as *const XdpMd as u64,
        repeat: frames,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: batch,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(Run {
        retval: attr.retval,
        duration_ns: attr.duration,
        size_out: 0,
    })
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Opens the loaded program with kernel id `id` (e.g. the one attached to an interface).
pub fn prog_fd_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
        .with_context(|| format!("opening BPF program id {id}"))?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Checks a program's action on a frame, as a sanity check before timing it.
pub fn expect_action(prog: BorrowedFd<'_>, frame: &[u8], want: u32, what: &str) -> Result<()> {
    let run = test_run(prog, frame, None, 1).with_context(|| format!("test-running {what}"))?;
    if run.retval != want {
        bail!(
            "{what}: XDP action {} where {want} was expected",
            run.retval
        );
    }
    Ok(())
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct GetInfoAttr {
    fd: u32,
    info_len: u32,
    info: u64,
}

/// What the kernel made of a loaded program: its size before and after JIT, and how many
/// instructions the verifier processed to prove it safe.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ProgSize {
    /// Instructions after the verifier's rewrite (`xlated_prog_len` / 8).
    pub insns: u32,
    pub jited_bytes: u32,
    /// Instructions the verifier walked over all paths (`verified_insns`).
    pub verified_insns: u32,
}

/// Reads `struct bpf_prog_info` (the offsets below are its fixed UAPI layout).
pub fn prog_size(prog: BorrowedFd<'_>) -> Result<ProgSize> {
    let mut info = [0u8; 232];
    let mut attr = GetInfoAttr {
        fd: prog.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    Ok(ProgSize {
        jited_bytes: word(16),
        insns: word(20) / 8,
        verified_insns: word(216),
    })
}
