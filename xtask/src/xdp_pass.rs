//! Attaches a two-instruction XDP program (`return XDP_PASS`) to an interface of the
//! current network namespace, through the raw `bpf` syscall and rtnetlink.
//!
//! Why the test bed needs it: a veth that transmits with XDP_TX puts the frames in its
//! peer's XDP ring, and (on the kernels we run, 6.x) only schedules the peer's NAPI to take
//! them off the ring when the peer has an XDP program. GRO on the peer enables that NAPI
//! for XDP_REDIRECT (`ndo_xdp_xmit` flushes it), but XDP_TX frames then sit in the ring and
//! are never delivered. The balancer sends with XDP_TX whenever the backend is behind the
//! interface the packet came in on, which in the test bed is always, so the bridge end of
//! the balancer's veth gets this program.
//!
//! Attached the legacy way (netlink `IFLA_XDP`, driver mode), the program stays attached
//! after this process exits, until the interface is deleted with its namespace. No C
//! toolchain, ELF object or BPF loader library is needed for two instructions.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_FLAGS: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

/// The prefix of `union bpf_attr` that BPF_PROG_LOAD reads; the kernel takes a shorter
/// struct than its own and zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// Loads `insns` (raw BPF instructions) as an XDP program named `name` (at most 15 bytes)
/// and returns its fd; a refusal carries the verifier's log. Shared with lb-bench, which
/// loads its baseline programs the same way.
pub fn load_xdp(name: &str, insns: &[u64]) -> Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut log = vec![0u8; 64 * 1024];
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    // SAFETY: attr, insns, license and log outlive the call; the size is that of attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        return Err(e).with_context(|| {
            format!(
                "loading XDP program {name}; verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        });
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `r0 = XDP_PASS; exit`.
fn load_pass_program() -> Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 2 (XDP_PASS); then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0x00, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0x00, 0, 0, 0, 0, 0, 0]),
    ];
    load_xdp("xdp_pass", &insns)
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Attaches XDP_PASS to `iface` in driver mode.
pub fn attach(iface: &str) -> Result<()> {
    let c = CString::new(iface).map_err(|_| anyhow!("bad interface name {iface:?}"))?;
    // SAFETY: valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface named {iface}");
    }
    let prog = load_pass_program()?;

    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut body = Vec::new();
    body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    body.extend_from_slice(&0u16.to_ne_bytes());
    body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    let mut xdp = Vec::new();
    push_attr(&mut xdp, IFLA_XDP_FD, &prog.as_raw_fd().to_ne_bytes());
    push_attr(&mut xdp, IFLA_XDP_FLAGS, &XDP_FLAGS_DRV_MODE.to_ne_bytes());
    push_attr(&mut body, IFLA_XDP | NLA_F_NESTED, &xdp);

    let mut msg = Vec::new();
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    msg.extend_from_slice(&body);

    // SAFETY: plain syscalls on a socket this function owns; buffers outlive the calls.
    unsafe {
        let sock = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if sock < 0 {
            return Err(io::Error::last_os_error()).context("opening an rtnetlink socket");
        }
        let r = (|| -> Result<()> {
            if libc::send(sock, msg.as_ptr().cast(), msg.len(), 0) < 0 {
                return Err(io::Error::last_os_error()).context("sending RTM_SETLINK");
            }
            let mut reply = [0u8; 4096];
            let n = libc::recv(sock, reply.as_mut_ptr().cast(), reply.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error()).context("reading the RTM_SETLINK answer");
            }
            // nlmsghdr (16 bytes), then for NLMSG_ERROR an i32 error (0 = ack).
            let n = n as usize;
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            if n < 20 || kind != libc::NLMSG_ERROR as u16 {
                bail!("unexpected rtnetlink answer (type {kind}, {n} bytes)");
            }
            let err = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            if err != 0 {
                return Err(io::Error::from_raw_os_error(-err))
                    .with_context(|| format!("attaching XDP_PASS to {iface}"));
            }
            Ok(())
        })();
        // The attachment holds its own reference: `prog` closes when dropped.
        libc::close(sock);
        r
    }
}
