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

/// Looks up `key` (a whole number of 32-bit words, written to the stack as the program's
/// own key would be) in the hash map `map` and returns XDP_PASS if it is there, XDP_DROP if
/// not: one flow-table lookup and nothing else, the floor under lb's established path.
pub fn lookup_pass(map: BorrowedFd<'_>, key: &[u8]) -> Vec<u64> {
    const ST_MEM_W: u8 = ST_W;
    const LD_IMM64: u8 = 0x18;
    const PSEUDO_MAP_FD: u8 = 1;
    const JEQ_K: u8 = 0x15;
    const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
    assert!(
        key.len().is_multiple_of(4) && key.len() <= 64,
        "a key of whole words"
    );
    let base = -(key.len() as i16);
    let mut p: Vec<u64> = key
        .chunks(4)
        .enumerate()
        .map(|(i, w)| {
            let word = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            insn(ST_MEM_W, 10, 0, base + 4 * i as i16, word)
        })
        .collect();
    p.extend([
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(MOV_X, 2, 10, 0, 0),
        insn(ADD_K, 2, 0, 0, i32::from(base)),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        insn(JEQ_K, 0, 0, 2, 0),
    ]);
    p.extend(ret(XDP_PASS));
    p.extend(ret(XDP_DROP));
    p
}

// ---- syscalls ------------------------------------------------------------------------------

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// An LRU hash map like the flow table (`lb_common::maps::FLOWS`: common LRU lists,
/// preallocated), with keys of `key_size` bytes and 8-byte values.
pub fn lru_hash(key_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size,
        value_size: 8,
        max_entries,
        map_flags: 0,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: a new fd the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Inserts or replaces `key` with `value` in `map`.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: u64) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: &value as *const u64 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

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

impl ProgSize {
    /// The note the data-plane table carries (and a profile repeats).
    pub fn note(&self) -> String {
        format!(
            "program: {} instructions after the verifier's rewrite, {} bytes JITed, {} \
             instructions processed by the verifier",
            self.insns, self.jited_bytes, self.verified_insns
        )
    }
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

const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

// Offsets into `struct bpf_prog_info` (fixed UAPI layout, as in prog_size above).
const INFO_JITED_KSYMS: usize = 104; // nr_jited_ksyms, nr_jited_func_lens, then the two pointers
const INFO_BTF_ID: usize = 128;
const INFO_NR_LINE_INFO: usize = 148; // then line_info, jited_line_info, nr_jited_line_info...

/// One `struct bpf_line_info`: where an instruction came from, as offsets into the program's
/// BTF string section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineInfo {
    pub insn_off: u32,
    pub file_name_off: u32,
    pub line_off: u32,
    /// Line number in the upper 22 bits, column in the lower 10.
    pub line_col: u32,
}

/// A loaded program's JIT image as the kernel describes it: where each function's machine
/// code starts and how long it is, and the address each line record begins at.
#[derive(Clone, Debug, Default)]
pub struct JitLines {
    pub btf_id: u32,
    /// (start address, length in bytes), one per function (the main program, then its
    /// subprograms).
    pub functions: Vec<(u64, u32)>,
    /// Line records paired with the JIT address each starts at.
    pub lines: Vec<(u64, LineInfo)>,
}

fn prog_info(prog: BorrowedFd<'_>, info: &mut [u8; 232]) -> Result<()> {
    let mut attr = GetInfoAttr {
        fd: prog.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

/// Reads a program's JIT function addresses and line info (BPF_OBJ_GET_INFO_BY_FD twice:
/// once for the counts, once with buffers). Needs root: the kernel zeroes addresses for
/// anyone else.
pub fn jit_lines(prog: BorrowedFd<'_>) -> Result<JitLines> {
    let word =
        |b: &[u8; 232], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let mut info = [0u8; 232];
    prog_info(prog, &mut info)?;
    let nr_ksyms = word(&info, INFO_JITED_KSYMS);
    let nr_lens = word(&info, INFO_JITED_KSYMS + 4);
    let btf_id = word(&info, INFO_BTF_ID);
    let nr_lines = word(&info, INFO_NR_LINE_INFO);
    let nr_jited_lines = word(&info, INFO_NR_LINE_INFO + 20);
    let line_rec = word(&info, INFO_NR_LINE_INFO + 24);
    let jited_line_rec = word(&info, INFO_NR_LINE_INFO + 28);
    if nr_ksyms == 0 || nr_lens != nr_ksyms {
        bail!("the program has no JIT symbols ({nr_ksyms}; is the BPF JIT on?)");
    }
    if nr_lines == 0 || nr_jited_lines != nr_lines {
        bail!(
            "the program has no JIT line info ({nr_lines} line records, {nr_jited_lines} JIT addresses; was it loaded with BTF?)"
        );
    }
    if line_rec as usize != size_of::<LineInfo>() || jited_line_rec != 8 {
        bail!("unexpected line record sizes {line_rec} and {jited_line_rec}");
    }
    let mut ksyms = vec![0u64; nr_ksyms as usize];
    let mut lens = vec![0u32; nr_lens as usize];
    let mut lines = vec![LineInfo::default(); nr_lines as usize];
    let mut jited = vec![0u64; nr_jited_lines as usize];
    let mut req = [0u8; 232];
    let put32 =
        |b: &mut [u8; 232], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    put32(&mut req, INFO_JITED_KSYMS, nr_ksyms);
    put32(&mut req, INFO_JITED_KSYMS + 4, nr_lens);
    let put64 =
        |b: &mut [u8; 232], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    put64(&mut req, INFO_JITED_KSYMS + 8, ksyms.as_mut_ptr() as u64);
    put64(&mut req, INFO_JITED_KSYMS + 16, lens.as_mut_ptr() as u64);
    put32(&mut req, INFO_NR_LINE_INFO, nr_lines);
    put64(&mut req, INFO_NR_LINE_INFO + 4, lines.as_mut_ptr() as u64);
    put64(&mut req, INFO_NR_LINE_INFO + 12, jited.as_mut_ptr() as u64);
    put32(&mut req, INFO_NR_LINE_INFO + 20, nr_jited_lines);
    put32(&mut req, INFO_NR_LINE_INFO + 24, line_rec);
    put32(&mut req, INFO_NR_LINE_INFO + 28, jited_line_rec);
    // The kernel writes at most the counts given above into the buffers, which outlive the call.
    prog_info(prog, &mut req)?;
    if ksyms.iter().all(|&a| a == 0) {
        bail!("the kernel hid the JIT addresses (run as root; kernel.kptr_restrict?)");
    }
    Ok(JitLines {
        btf_id,
        functions: ksyms.into_iter().zip(lens).collect(),
        lines: jited.into_iter().zip(lines).collect(),
    })
}

#[repr(C)]
#[derive(Default)]
struct BtfInfo {
    btf: u64,
    btf_size: u32,
    id: u32,
    name: u64,
    name_len: u32,
    kernel_btf: u32,
}

/// The raw BTF blob (header, types, strings) the kernel holds under `id`, e.g. a program's.
pub fn btf_by_id(id: u32) -> Result<Vec<u8>> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    let fd =
        bpf(BPF_BTF_GET_FD_BY_ID, &mut attr).with_context(|| format!("opening BTF id {id}"))?;
    // SAFETY: the kernel just gave us this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let get = |info: &mut BtfInfo| {
        let mut attr = GetInfoAttr {
            fd: fd.as_raw_fd() as u32,
            info_len: size_of::<BtfInfo>() as u32,
            info: info as *mut BtfInfo as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).with_context(|| format!("reading BTF id {id}"))
    };
    let mut info = BtfInfo::default();
    get(&mut info)?;
    let mut blob = vec![0u8; info.btf_size as usize];
    let mut info = BtfInfo {
        btf: blob.as_mut_ptr() as u64,
        btf_size: blob.len() as u32,
        ..Default::default()
    };
    // The kernel copies at most btf_size bytes into `blob`, which outlives the call.
    get(&mut info)?;
    blob.truncate(info.btf_size as usize);
    Ok(blob)
}
