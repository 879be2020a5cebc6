//! The UDP load and CPU accounting.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_common::bench::E2E_SPORT_BASE;

use super::{
    bpf::Generator,
    net::{
        CLIENT_DEV, CLIENT_IP, CLIENT_MAC, FORWARDER_CPU, LB_MAC, LOAD_CPU, PORT, Topology, VIP, spawn_in_ns,
    },
};

/// Measurement windows: traffic runs for `warmup` before counting starts.
#[derive(Clone, Copy)]
pub struct Windows {
    pub warmup: Duration,
    pub measure: Duration,
}

/// A 60-byte frame (64 on the wire with the FCS): Ethernet, IPv4, UDP to VIP:PORT, 18 bytes of
/// payload. The UDP checksum is 0 (none, allowed for IPv4) because the generator rewrites the
/// source port of each copy.
pub fn udp_frame() -> Vec<u8> {
    let payload = 18usize;
    let udp_len = 8 + payload;
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&CLIENT_IP.octets());
    ip[16..20].copy_from_slice(&VIP.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&E2E_SPORT_BASE.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend(std::iter::repeat_n(0u8, payload));
    f
}

/// Per-CPU busy time, NET_RX softirqs and the CPU time of chosen threads, between two points.
pub struct CpuSnapshot {
    at: Instant,
    busy: [u64; 2],
    /// Time in processes and threads (user, nice, system) plus time stolen by the hypervisor:
    /// what competes with the forwarder's threads, unlike irq and softirq time, which is
    /// mostly the forwarder's own (timers of HAProxy's sockets, for example).
    tasks: [u64; 2],
    total: [u64; 2],
    net_rx: [u64; 2],
    threads: u64,
}

impl CpuSnapshot {
    pub fn take(threads: &[i32]) -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let (mut busy, mut tasks, mut total) = ([0u64; 2], [0u64; 2], [0u64; 2]);
        for line in stat.lines() {
            for cpu in 0..2 {
                if let Some(rest) = line.strip_prefix(&format!("cpu{cpu} ")) {
                    let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                    // user nice system idle iowait irq softirq steal
                    total[cpu] = v.iter().take(8).sum();
                    let at = |i: usize| v.get(i).copied().unwrap_or(0);
                    busy[cpu] = total[cpu] - at(3) - at(4);
                    tasks[cpu] = at(0) + at(1) + at(2) + at(7);
                }
            }
        }
        let softirqs = std::fs::read_to_string("/proc/softirqs").context("read /proc/softirqs")?;
        let mut net_rx = [0u64; 2];
        if let Some(line) = softirqs.lines().find(|l| l.trim_start().starts_with("NET_RX:")) {
            for (i, v) in line.split_whitespace().skip(1).take(2).enumerate() {
                net_rx[i] = v.parse().unwrap_or(0);
            }
        }
        let mut ticks = 0;
        for &tid in threads {
            // Fields after the parenthesised name: utime and stime are the 12th and 13th.
            let s = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap_or_default();
            let f: Vec<&str> = s
                .rsplit(')')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .collect();
            ticks += f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
        Ok(Self {
            at: Instant::now(),
            busy,
            tasks,
            total,
            net_rx,
            threads: ticks,
        })
    }

    pub fn elapsed_since(&self, start: &CpuSnapshot) -> f64 {
        self.at.duration_since(start.at).as_secs_f64().max(1e-9)
    }

    /// CPU time of the chosen threads between the snapshots, as a fraction of one CPU.
    pub fn threads_share(&self, end: &CpuSnapshot) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        end.threads.saturating_sub(self.threads) as f64 / hz / end.elapsed_since(self)
    }

    /// "cpu0 99% cpu1 97% busy, NET_RX softirqs cpu0 12 cpu1 3, forwarder 96% of a CPU"
    pub fn report(&self, end: &CpuSnapshot, what: &str) -> String {
        let share = |c: usize, a: &[u64; 2], b: &[u64; 2]| {
            let t = end.total[c].saturating_sub(self.total[c]).max(1);
            100.0 * b[c].saturating_sub(a[c]) as f64 / t as f64
        };
        let pct = |c: usize| share(c, &self.busy, &end.busy);
        let forwarder = 100.0 * self.threads_share(end);
        // Task time on the forwarder's CPU beyond the forwarder's own threads: other processes
        // on the machine (or the hypervisor), which take the CPU from the forwarder.
        let others = share(FORWARDER_CPU, &self.tasks, &end.tasks) - forwarder;
        format!(
            "cpu{LOAD_CPU} {:.0}% cpu{FORWARDER_CPU} {:.0}% busy, NET_RX softirqs cpu0 {} cpu1 {}, {what} {forwarder:.0}% \
             of a CPU{}",
            pct(LOAD_CPU),
            pct(FORWARDER_CPU),
            end.net_rx[0].saturating_sub(self.net_rx[0]),
            end.net_rx[1].saturating_sub(self.net_rx[1]),
            if others > 15.0 {
                format!(
                    "; WARNING: {others:.0}% of cpu{FORWARDER_CPU} went to something else, figures disturbed"
                )
            } else {
                String::new()
            }
        )
    }
}

pub struct Measured {
    /// The rate over the measurement window.
    pub rate: f64,
    /// The forwarder's threads' CPU time in the window, as a fraction of one CPU.
    pub forwarder_cpu: f64,
    /// One line on the side: offered load, errors, CPU use.
    pub detail: String,
    /// The contender's own counter (redirects for the balancer) across the window.
    pub extra: u64,
    pub count: u64,
}

/// What a measurement reads around its window besides its own counters: the balancer's
/// redirect counter, for example.
pub type Probe<'a> = &'a dyn Fn() -> Result<u64>;

/// Runs the generator from the client namespace on the load CPU and counts the datagrams that
/// reach the backends' sinks during the window.
pub fn udp(
    topo: &Topology,
    generator: &Arc<Generator>,
    w: Windows,
    probe: Probe,
    threads: &[i32],
) -> Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let ifindex = {
        let name = std::ffi::CString::new(CLIENT_DEV)?;
        // SAFETY: name is a valid C string.
        crate::in_ns(&topo.client, move || unsafe {
            libc::if_nametoindex(name.as_ptr())
        })
    };
    if ifindex == 0 {
        bail!("no {CLIENT_DEV} in the client namespace");
    }
    let thread = spawn_in_ns(&topo.client, {
        let (generator, stop, sent) = (generator.clone(), stop.clone(), sent.clone());
        move || {
            // Batches of a few ms of frames, so that stopping is prompt.
            const BATCH: u32 = 65536;
            while !stop.load(Ordering::Relaxed) {
                generator.send(ifindex, BATCH)?;
                sent.fetch_add(u64::from(BATCH), Ordering::Relaxed);
            }
            Ok(())
        }
    })?;
    let result = (|| -> Result<Measured> {
        wait_or_fail(w.warmup, &thread)?;
        let extra0 = probe()?;
        let (c0, s0, cpu0) = (
            topo.sink.count()?,
            sent.load(Ordering::Relaxed),
            CpuSnapshot::take(threads)?,
        );
        wait_or_fail(w.measure, &thread)?;
        let (c1, s1, cpu1) = (
            topo.sink.count()?,
            sent.load(Ordering::Relaxed),
            CpuSnapshot::take(threads)?,
        );
        let extra1 = probe()?;
        let secs = cpu1.elapsed_since(&cpu0);
        let delivered = c1 - c0;
        Ok(Measured {
            rate: delivered as f64 / secs,
            forwarder_cpu: cpu0.threads_share(&cpu1),
            detail: format!(
                "offered {:.2} Mpps; {}",
                (s1 - s0) as f64 / secs / 1e6,
                cpu0.report(&cpu1, "forwarder")
            ),
            extra: extra1 - extra0,
            count: delivered,
        })
    })();
    stop.store(true, Ordering::Relaxed);
    let joined = thread
        .join()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
    joined.context("UDP generator")?;
    result
}

/// Sleeps `d` unless the thread ends first (it only ends early on an error).
fn wait_or_fail<T>(d: Duration, thread: &JoinHandle<Result<T>>) -> Result<()> {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        if thread.is_finished() {
            bail!("load thread ended early");
        }
        std::thread::sleep(Duration::from_millis(10).min(deadline - Instant::now()));
    }
    Ok(())
}
