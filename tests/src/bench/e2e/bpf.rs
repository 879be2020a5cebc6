//! The bench's two XDP instruments, `e2e_gen` and `e2e_sink` of the bench object
//! (lb-ebpf/src/bench.rs), loaded and driven with aya.
//!
//! - The generator ([`Generator`]): run with `BPF_PROG_TEST_RUN` in live-frames mode
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`, kernel ≥ 5.18, the mechanism behind xdp-tools'
//!   xdp-trafficgen) it transmits a template frame out of a veth with `XDP_TX`, writing a random
//!   UDP source port from a fixed range into each copy, so the load is many flows.
//! - The sink ([`Sink`]): attached to each backend's veth, it counts and drops UDP datagrams to
//!   the service port and passes everything else (the TCP servers need it). It also gives the
//!   veth the XDP program that XDP-redirected frames need to be received at all.

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader, GlobalData,
    maps::{MapData, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use lb_common::bench::{
    E2E_GEN_HEADERS, E2E_SINK_COUNT, E2E_SINK_PORT, E2eHeaders, PROG_E2E_GEN, PROG_E2E_SINK,
};

/// Frames per batch of a live-frames test run (the kernel's default and maximum).
const LIVE_FRAMES_BATCH: u32 = 256;

/// Loads `prog` of the bench object with its global `name` set to `value`.
fn load<'a>(prog: &str, name: &'a str, value: impl Into<GlobalData<'a>>) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .override_global(name, value, true)
        .load(lb_userspace::BENCH_OBJECT)
        .context("load the bench object")?;
    let p: &mut Xdp = ebpf
        .program_mut(prog)
        .with_context(|| format!("{prog} missing from the bench object"))?
        .try_into()?;
    p.load().with_context(|| format!("verifier rejected {prog}"))?;
    Ok(ebpf)
}

/// Attaches `prog` of `ebpf` (driver mode) to `dev` in the calling thread's namespace, for as
/// long as `ebpf` lives (or the interface).
fn attach(ebpf: &mut Ebpf, prog: &str, dev: &str) -> Result<()> {
    let p: &mut Xdp = ebpf.program_mut(prog).context(prog.to_string())?.try_into()?;
    p.attach(dev, XdpMode::Driver)
        .with_context(|| format!("attach {prog} to {dev}"))?;
    Ok(())
}

/// The UDP generator: the template frame goes out of a veth, one copy per repetition.
pub struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
}

impl Generator {
    pub fn new(frame: Vec<u8>) -> Result<Self> {
        let headers = E2eHeaders::new(&frame)
            .with_context(|| format!("generator frame too short ({} bytes)", frame.len()))?;
        let ebpf = load(PROG_E2E_GEN, E2E_GEN_HEADERS, &headers)?;
        Ok(Self { ebpf, frame })
    }

    /// Attaches the program to `idle_dev`, an interface without traffic in the calling thread's
    /// namespace, for as long as the generator lives. A test run adds its program to the
    /// kernel's XDP dispatcher and removes it afterwards, each time waiting for an RCU grace
    /// period, unless an attachment already holds it there; unparked, the generator idles about
    /// half the time.
    pub fn park(&mut self, idle_dev: &str) -> Result<()> {
        attach(&mut self.ebpf, PROG_E2E_GEN, idle_dev)
    }

    /// Transmits `count` frames out of `ifindex`, which must be in the calling thread's network
    /// namespace. Frames the peer cannot take (its ring is full) are dropped by the kernel, as a
    /// NIC drops what its receiver cannot take.
    pub fn send(&self, ifindex: u32, count: u32) -> Result<()> {
        let prog: &Xdp = self
            .ebpf
            .program(PROG_E2E_GEN)
            .context(PROG_E2E_GEN)?
            .try_into()?;
        let ctx = xdp_md(self.frame.len() as u32, ifindex);
        prog.test_run(TestRunOptions {
            data_in: Some(&self.frame),
            ctx_in: Some(&ctx),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(LIVE_FRAMES_BATCH),
            ..Default::default()
        })
        .map_err(|e| {
            if refused(&e) {
                anyhow::Error::new(LiveFramesRefused(e.to_string()))
            } else {
                anyhow::Error::new(e).context("BPF_PROG_TEST_RUN (live frames)")
            }
        })?;
        Ok(())
    }
}

/// The kernel refused a live-frames test run for want of privilege (seen on hosts whose root
/// lacks CAP_SYS_RESOURCE): the UDP load cannot be made here, which says nothing of the rest.
#[derive(Debug)]
pub struct LiveFramesRefused(pub String);

impl std::fmt::Display for LiveFramesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the kernel refuses BPF_PROG_TEST_RUN in live-frames mode here: {}",
            self.0
        )
    }
}

impl std::error::Error for LiveFramesRefused {}

fn refused(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)))
}

/// `struct xdp_md` (uapi linux/bpf.h) as test runs take it: `data_end` is the frame's length,
/// `ingress_ifindex` the interface the frames are received on, hence transmitted from by XDP_TX.
fn xdp_md(len: u32, ingress_ifindex: u32) -> [u8; 24] {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let fields = [0, len, 0, ingress_ifindex, 0, 0u32];
    let mut ctx = [0u8; 24];
    for (out, field) in ctx.chunks_exact_mut(4).zip(fields) {
        out.copy_from_slice(&field.to_ne_bytes());
    }
    ctx
}

/// The backends' receive program and its per-CPU counter of UDP datagrams to the service port.
pub struct Sink {
    count: PerCpuArray<MapData, u64>,
    ebpf: Ebpf,
}

impl Sink {
    pub fn new(port: u16) -> Result<Self> {
        let mut ebpf = load(PROG_E2E_SINK, E2E_SINK_PORT, &port.to_be())?;
        let count = ebpf
            .take_map(E2E_SINK_COUNT)
            .context(E2E_SINK_COUNT)?
            .try_into()
            .context("the sink's counter map")?;
        Ok(Self { count, ebpf })
    }

    /// Attaches the sink to `dev` in the calling thread's namespace (see [`crate::in_ns`]).
    pub fn attach(&mut self, dev: &str) -> Result<()> {
        attach(&mut self.ebpf, PROG_E2E_SINK, dev)
    }

    /// Datagrams counted so far, summed over CPUs.
    pub fn count(&self) -> Result<u64> {
        let values = self.count.get(&0, 0).context("read the sink's counter")?;
        Ok(values.iter().sum())
    }
}
