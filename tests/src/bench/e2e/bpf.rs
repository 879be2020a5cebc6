//! Two tiny XDP programs written as raw instructions (they are bench instruments, not part of the
//! balancer, so they stay out of the eBPF crate) and the few `bpf(2)` commands they need.
//!
//! - The generator ([`Generator`]): run with `BPF_PROG_TEST_RUN` in live-frames mode
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`, kernel ≥ 5.18, the mechanism behind xdp-tools'
//!   xdp-trafficgen) it transmits a template frame out of a veth with `XDP_TX`, writing a random
//!   UDP source port from a fixed range into each copy, so the load is many flows.
//! - The sink ([`Sink`]): attached to each backend's veth, it counts and drops UDP datagrams to
//!   the service port and passes everything else (the TCP servers need it). It also gives the
//!   veth the XDP program that XDP-redirected frames need to be received at all.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_LINK_CREATE: i64 = 28;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_PRANDOM_U32: i32 = 7;

/// One instruction, as `struct bpf_insn` (dst register in the low nibble of `regs`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}
const fn mov_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
const fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
const fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
const fn and_imm(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}
/// `dst = htobe16(dst)`.
const fn to_be16(dst: u8) -> Insn {
    insn(0xdc, dst, 0, 0, 16)
}
const fn load_u8(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x71, dst, src, off, 0)
}
const fn load_u16(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x69, dst, src, off, 0)
}
const fn load_u32(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
const fn load_u64(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x79, dst, src, off, 0)
}
const fn store_u16(dst: u8, off: i16, src: u8) -> Insn {
    insn(0x6b, dst, src, off, 0)
}
const fn store_u64(dst: u8, off: i16, src: u8) -> Insn {
    insn(0x7b, dst, src, off, 0)
}
const fn store_imm_u16(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x6a, dst, 0, off, imm)
}
const fn store_imm_u32(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm)
}
/// Jumps are relative to the next instruction.
const fn jgt_reg(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x2d, dst, src, off, 0)
}
const fn jne_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x55, dst, 0, off, imm)
}
const fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm)
}
const fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
const fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// `dst = v` (two instructions).
fn load_imm64(dst: u8, v: u64) -> [Insn; 2] {
    [
        insn(0x18, dst, 0, 0, v as u32 as i32),
        insn(0, 0, 0, 0, (v >> 32) as u32 as i32),
    ]
}
/// `dst = map` (two instructions; src register 1 = BPF_PSEUDO_MAP_FD).
fn load_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
}

fn sys_bpf<T>(cmd: i64, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a properly laid out bpf_attr prefix for cmd; the kernel zero-extends it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sys_bpf_fd<T>(cmd: i64, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: these commands return a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
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
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn load_xdp(name: &str, insns: &[Insn]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    prog_name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    sys_bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]).replace('\n', " | ");
        anyhow::anyhow!("load XDP program {name}: {e}; verifier: {text}")
    })
}

/// Attaches `prog` (driver mode) to `ifindex` in the calling thread's namespace; closing the
/// returned link detaches it (so does removing the interface).
pub fn attach(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    sys_bpf_fd(BPF_LINK_CREATE, &mut attr).with_context(|| format!("attach XDP to ifindex {ifindex}"))
}

/// The UDP generator: the template frame goes out of a veth, one copy per repetition.
pub struct Generator {
    prog: OwnedFd,
    frame: Vec<u8>,
    parked: Option<OwnedFd>,
}

/// The random source port is `SPORT_BASE + (random & SPORT_MASK)`: 1024 flows.
pub const SPORT_BASE: i32 = 10_000;
pub const SPORT_MASK: i32 = 1023;
/// Where the UDP source port sits in an untagged IPv4 frame without IP options.
const UDP_SPORT_OFFSET: i16 = 14 + 20;
/// Ethernet, IPv4 and UDP headers.
const HEADERS_LEN: usize = 14 + 20 + 8;

impl Generator {
    pub fn new(frame: Vec<u8>) -> Result<Self> {
        if frame.len() < HEADERS_LEN {
            bail!("generator frame too short ({} bytes)", frame.len());
        }
        // Live frames reuse pages without resetting their data, and the receiver's stack edits
        // frames in place (MACs, TTL, NAT), so every copy gets its headers written anew.
        let mut headers = Vec::new();
        for (i, chunk) in frame[..HEADERS_LEN].chunks(8).enumerate() {
            let off = (i * 8) as i16;
            if chunk.len() == 8 {
                let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                headers.extend(load_imm64(5, v));
                headers.push(store_u64(2, off, 5));
            } else {
                let v = u16::from_le_bytes(chunk.try_into().context("headers end on a 2-byte chunk")?);
                headers.push(store_imm_u16(2, off, i32::from(v)));
            }
        }
        let mut insns = vec![
            mov_reg(6, 1),
            call(HELPER_GET_PRANDOM_U32),
            and_imm(0, SPORT_MASK),
            add_imm(0, SPORT_BASE),
            to_be16(0),
            load_u32(2, 6, 0), // data
            load_u32(3, 6, 4), // data_end
            mov_reg(4, 2),
            add_imm(4, HEADERS_LEN as i32),
            jgt_reg(4, 3, headers.len() as i16 + 1), // -> tx
        ];
        insns.extend(headers);
        insns.extend([
            store_u16(2, UDP_SPORT_OFFSET, 0),
            mov_imm(0, XDP_TX), // tx
            exit(),
        ]);
        Ok(Self {
            prog: load_xdp("e2e_gen", &insns)?,
            frame,
            parked: None,
        })
    }

    /// Keeps `link`, an attachment of the program (see [`Generator::prog_fd`]) to an idle
    /// interface, for as long as the generator lives. A test run adds its program to the
    /// kernel's XDP dispatcher and removes it afterwards, each time waiting for an RCU grace
    /// period, unless an attachment already holds it there; unparked, the generator idles about
    /// half the time.
    pub fn park(&mut self, link: OwnedFd) {
        self.parked = Some(link);
    }

    pub fn prog_fd(&self) -> Result<OwnedFd> {
        self.prog.try_clone().context("dup the generator program fd")
    }

    /// Transmits `count` frames out of `ifindex`, which must be in the calling thread's network
    /// namespace. Frames the peer cannot take (its ring is full) are dropped by the kernel, as a
    /// NIC drops what its receiver cannot take.
    pub fn send(&self, ifindex: u32, count: u32) -> Result<()> {
        #[repr(C)]
        struct XdpMd {
            data: u32,
            data_end: u32,
            data_meta: u32,
            ingress_ifindex: u32,
            rx_queue_index: u32,
            egress_ifindex: u32,
        }
        #[repr(C)]
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
            pad: u32,
        }
        let ctx = XdpMd {
            data: 0,
            data_end: self.frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        let mut attr = TestRunAttr {
            prog_fd: self.prog.as_raw_fd() as u32,
            retval: 0,
            data_size_in: self.frame.len() as u32,
            data_size_out: 0,
            data_in: self.frame.as_ptr() as u64,
            data_out: 0,
            repeat: count,
            duration: 0,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_size_out: 0,
            ctx_in: &ctx as *const XdpMd as u64,
            ctx_out: 0,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            cpu: 0,
            batch_size: 256,
            pad: 0,
        };
        sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN (live frames)")?;
        Ok(())
    }
}

/// The backends' receive program and its per-CPU counter of UDP datagrams to `port`.
pub struct Sink {
    map: OwnedFd,
    prog: OwnedFd,
    cpus: usize,
}

impl Sink {
    pub fn new(port: u16) -> Result<Self> {
        #[repr(C)]
        struct MapCreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: 1,
            map_flags: 0,
        };
        let map = sys_bpf_fd(BPF_MAP_CREATE, &mut attr).context("create the sink's counter map")?;
        // A port as the u16 a little-endian load of its network-order bytes gives.
        let port_le = i32::from(u16::from_le_bytes(port.to_be_bytes()));
        let mut insns = vec![
            mov_reg(6, 1),
            load_u32(2, 6, 0),
            load_u32(3, 6, 4),
            mov_reg(4, 2),
            add_imm(4, 14 + 20 + 4),
            jgt_reg(4, 3, 20), // -> pass
            load_u16(4, 2, 12),
            jne_imm(4, 0x0008, 18), // not IPv4 -> pass
            load_u8(4, 2, 23),
            jne_imm(4, 17, 16), // not UDP -> pass
            load_u8(4, 2, 14),
            jne_imm(4, 0x45, 14), // IP options -> pass
            load_u16(4, 2, 36),
            jne_imm(4, port_le, 12), // other port -> pass
            store_imm_u32(10, -4, 0),
            mov_reg(2, 10),
            add_imm(2, -4),
        ];
        insns.extend(load_map_fd(1, map.as_raw_fd()));
        insns.extend([
            call(HELPER_MAP_LOOKUP_ELEM),
            jeq_imm(0, 0, 3), // -> drop
            load_u64(1, 0, 0),
            add_imm(1, 1),
            store_u64(0, 0, 1),
            mov_imm(0, XDP_DROP),
            exit(),
            mov_imm(0, XDP_PASS), // pass
            exit(),
        ]);
        let prog = load_xdp("e2e_sink", &insns)?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("count possible CPUs")?;
        Ok(Self { map, prog, cpus })
    }

    /// The program, for [`attach`] on a thread in another namespace.
    pub fn prog_fd(&self) -> Result<OwnedFd> {
        self.prog.try_clone().context("dup the sink program fd")
    }

    /// Datagrams counted so far, summed over CPUs.
    pub fn count(&self) -> Result<u64> {
        #[repr(C)]
        struct LookupAttr {
            map_fd: u32,
            pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let key = 0u32;
        let mut values = vec![0u64; self.cpus];
        let mut attr = LookupAttr {
            map_fd: self.map.as_raw_fd() as u32,
            pad: 0,
            key: &key as *const u32 as u64,
            value: values.as_mut_ptr() as u64,
            flags: 0,
        };
        sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("read the sink's counter")?;
        Ok(values.iter().sum())
    }
}
