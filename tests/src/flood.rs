//! Raw frames from a test namespace: an AF_PACKET sender, and a SYN flood at a steady rate
//! from addresses the sender does not own (their SYN-ACKs reach no socket, so no RST ever
//! answers them: a client that never completes its handshakes).

use std::{
    io,
    time::{Duration, Instant},
};

use crate::packets::{eth, fix_l4_checksum, ipv4, tcp};

/// A packet socket bound to one interface of the namespace it was opened in.
pub struct RawSender {
    fd: libc::c_int,
    ifindex: libc::c_int,
}

impl RawSender {
    /// Opens it on `ifname`; call from inside the namespace (see `in_ns`).
    pub fn open(ifname: &str) -> io::Result<Self> {
        let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket(2); the protocol 0 sends only (nothing is received).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, ifindex })
    }

    /// Sends one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_ll with its family and interface set.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = self.ifindex;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `to` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for RawSender {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// A steady flood of TCP SYNs to `dst:dport`, each a new tuple, from `source(i)` for the
/// i-th SYN, at `rate` a second for `duration` (bounded by both). Returns the SYNs sent.
pub struct SynFlood {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub dst: [u8; 4],
    pub dport: u16,
    pub rate: u64,
    pub duration: Duration,
}

impl SynFlood {
    pub fn run(&self, sender: &RawSender, mut source: impl FnMut(u64) -> [u8; 4]) -> io::Result<u64> {
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < self.duration {
            let due = (start.elapsed().as_secs_f64() * self.rate as f64) as u64;
            while sent < due {
                let src = source(sent);
                let sport = 1024 + (sent % 64_000) as u16;
                let mut ip = ipv4(6, src, self.dst, &tcp(sport, self.dport, 0x02));
                fix_l4_checksum(&mut ip);
                sender.send(&[eth(self.dst_mac, self.src_mac, 0x0800), ip].concat())?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(sent)
    }
}

/// Pins the calling thread to one CPU (a flood's share of a receive queue).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An interface's MAC in `ns` (sysfs would show the host's, so ask `ip`).
pub fn mac_of(ns: &crate::NetNs, ifname: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.sh(&format!("ip -j link show dev {ifname}"))?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let text = json[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{ifname}: no address in {out}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    anyhow::ensure!(parts.len() == 6, "{ifname}: MAC {text:?}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}
