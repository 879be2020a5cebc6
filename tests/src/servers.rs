//! Real TCP and UDP servers in a backend namespace. Each answers every line or datagram with
//! its backend id (and, if asked, the address the request came from), so the client sees which
//! backend served it and as whom.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::{NetNs, in_ns};

pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts TCP and UDP servers on each address (the VIPs) at `port`.
    pub fn start(ns: &NetNs, id: &str, addrs: &[SocketAddr]) -> Self {
        Self::start_with(ns, id, addrs, false)
    }

    /// As `start`; the answers are `"<id> <peer address>"`.
    pub fn start_reporting_peer(ns: &NetNs, id: &str, addrs: &[SocketAddr]) -> Self {
        Self::start_with(ns, id, addrs, true)
    }

    fn start_with(ns: &NetNs, id: &str, addrs: &[SocketAddr], peer: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            let (tcp, udp) = in_ns(ns, move || {
                let tcp = TcpListener::bind(addr).expect("bind tcp");
                tcp.set_nonblocking(true).expect("nonblocking");
                let udp = UdpSocket::bind(addr).expect("bind udp");
                udp.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                (tcp, udp)
            });
            let (id1, stop1) = (id.to_string(), stop.clone());
            threads.push(std::thread::spawn(move || tcp_loop(tcp, id1, peer, stop1)));
            let (id2, stop2) = (id.to_string(), stop.clone());
            threads.push(std::thread::spawn(move || udp_loop(udp, id2, peer, stop2)));
        }
        Self { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn answer(id: &str, peer: Option<SocketAddr>) -> String {
    match peer {
        Some(p) => format!("{id} {}", p.ip()),
        None => id.to_string(),
    }
}

fn tcp_loop(listener: TcpListener, id: String, report_peer: bool, stop: Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (id, stop) = (answer(&id, report_peer.then_some(peer)), stop.clone());
                conns.push(std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut writer = stream;
                    let mut line = String::new();
                    while !stop.load(Ordering::Relaxed) {
                        match reader.read_line(&mut line) {
                            Ok(0) => return,
                            Ok(_) => {
                                if writer.write_all(format!("{id}\n").as_bytes()).is_err() {
                                    return;
                                }
                                line.clear();
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                }));
                conns.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn udp_loop(socket: UdpSocket, id: String, report_peer: bool, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(answer(&id, report_peer.then_some(peer)).as_bytes(), peer);
        }
    }
}

/// What a backend's health responder answers, changeable while it runs.
#[derive(Clone, Debug)]
pub enum Reply {
    /// An HTTP response with this status line code and body, to any request.
    Http(u16, String),
    /// A HAProxy agent-check line (sent on connect, then closed).
    Agent(String),
}

/// A health endpoint on a backend's own addresses: TCP (HTTP or agent replies) and UDP (a
/// datagram answered with `udp_reply`, or nothing when it is `None`). Stops on drop.
pub struct Responder {
    pub reply: Arc<std::sync::Mutex<Reply>>,
    pub udp_reply: Arc<std::sync::Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Responder {
    pub fn start(ns: &NetNs, addrs: &[SocketAddr], reply: Reply, udp_reply: Option<&str>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let reply = Arc::new(std::sync::Mutex::new(reply));
        let udp_reply = Arc::new(std::sync::Mutex::new(udp_reply.map(str::to_string)));
        let mut threads = Vec::new();
        for &addr in addrs {
            let (tcp, udp) = in_ns(ns, move || {
                let tcp = TcpListener::bind(addr).expect("bind health tcp");
                tcp.set_nonblocking(true).expect("nonblocking");
                let udp = UdpSocket::bind(addr).expect("bind health udp");
                udp.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                (tcp, udp)
            });
            let (r, s) = (reply.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((stream, _)) => respond(stream, &r.lock().expect("reply").clone()),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            let (u, s) = (udp_reply.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf)
                        && let Some(text) = u.lock().expect("udp reply").clone()
                    {
                        let _ = udp.send_to(text.as_bytes(), peer);
                    }
                }
            }));
        }
        Self {
            reply,
            udp_reply,
            stop,
            threads,
        }
    }

    pub fn set(&self, reply: Reply) {
        *self.reply.lock().expect("reply") = reply;
    }
}

fn respond(stream: std::net::TcpStream, reply: &Reply) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut writer = stream.try_clone().expect("clone");
    match reply {
        Reply::Agent(line) => {
            let _ = writer.write_all(format!("{line}\n").as_bytes());
        }
        Reply::Http(status, body) => {
            // Read the request head, then answer and close.
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                line.clear();
            }
            let _ = writer.write_all(
                format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
