//! Client side of the tests and the demo: real TCP connections and UDP flows from the client
//! namespace to a VIP, each answered with the id of the backend that served it.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use crate::{
    in_ns,
    topology::{PORT, Topology},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// A persistent connection that asks "who are you" and reads the backend id.
pub struct Conn {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Conn {
    pub fn ask(&mut self) -> std::io::Result<String> {
        self.writer.write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.trim().to_string())
    }
}

impl Conn {
    /// A connected stream as a `Conn`, its reads bounded by `TIMEOUT`.
    fn over(s: TcpStream) -> std::io::Result<Self> {
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok(Conn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }
}

pub fn connect(vip: IpAddr) -> Conn {
    connect_to(SocketAddr::new(vip, PORT)).expect("connect to VIP")
}

/// A connection to `target` (any VIP and port), made in the calling thread's namespace.
pub fn connect_to(target: SocketAddr) -> std::io::Result<Conn> {
    Conn::over(TcpStream::connect_timeout(&target, TIMEOUT)?)
}

/// Opens `n` connections from the client namespace; each asks 3 times and must get one answer.
pub fn tcp_flows(
    topo: &Topology,
    vip: IpAddr,
    n: usize,
    keep: bool,
) -> (HashMap<String, usize>, Vec<(Conn, String)>) {
    in_ns(&topo.client, move || {
        let mut counts = HashMap::new();
        let mut kept = Vec::new();
        for _ in 0..n {
            let mut c = connect(vip);
            let first = c.ask().expect("first answer");
            for _ in 0..2 {
                assert_eq!(c.ask().expect("answer"), first, "a TCP flow changed backend");
            }
            *counts.entry(first.clone()).or_insert(0) += 1;
            if keep {
                kept.push((c, first));
            }
        }
        (counts, kept)
    })
}

/// A UDP socket on any address of `target`'s family, connected to `target`; a receive waits
/// at most `timeout`.
pub fn udp_socket(target: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("addr");
    let s = UdpSocket::bind(any)?;
    s.connect(target)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// Asks on a connected UDP socket until an answer comes, at most 5 times: UDP may lose a
/// datagram (the first ones, say, while neighbours resolve).
pub fn udp_ask(s: &UdpSocket) -> Option<String> {
    let mut buf = [0u8; 128];
    for _ in 0..5 {
        s.send(b"who").ok()?;
        if let Ok(len) = s.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..len]).trim().to_string());
        }
    }
    None
}

/// `n` UDP flows (one socket each); every datagram of a flow must reach the same backend.
pub fn udp_flows(topo: &Topology, vip: IpAddr, n: usize) -> HashMap<String, usize> {
    in_ns(&topo.client, move || {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let s = udp_socket(SocketAddr::new(vip, PORT), Duration::from_millis(500)).expect("UDP socket");
            let mut first: Option<String> = None;
            for _ in 0..3 {
                let answer = udp_ask(&s).expect("UDP answer within 5 tries");
                match &first {
                    None => first = Some(answer),
                    Some(f) => assert_eq!(&answer, f, "a UDP flow changed backend"),
                }
            }
            *counts.entry(first.expect("answered")).or_insert(0) += 1;
        }
        counts
    })
}

/// `GET path` over HTTP/1.1 from inside `ns` (with a bearer token if given); returns the status
/// and the body. Reads to the end (the request asks the server to close).
pub fn http_get(
    ns: &crate::NetNs,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_request(ns, addr, "GET", path, token, None)
}

/// Any method, with an optional body sent as JSON (as given, so it may be malformed).
pub fn http_request(
    ns: &crate::NetNs,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let request = request_text(addr, method, path, token, body, true);
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {text:?}")))?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
        Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
    })
}

/// An HTTP/1.1 request's bytes, the body sent as JSON; `close` asks the server to close after
/// its answer.
fn request_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    close: bool,
) -> String {
    let body = body.unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
        if close { "close" } else { "keep-alive" },
        body.len(),
        token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    )
}

/// An HTTP/1.1 connection kept open for many requests, one at a time, as an instance's
/// client keeps one to heartbeat. Answers must carry a `Content-Length` (the daemon's do).
pub struct KeepAlive {
    addr: SocketAddr,
    token: Option<String>,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAlive {
    /// Connects from the calling thread's namespace; every read waits at most 10 s.
    pub fn connect(addr: SocketAddr, token: Option<&str>) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Self {
            addr,
            token: token.map(str::to_string),
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// One request and its answer: the status and the body.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, String)> {
        use std::io::Read;
        let request = request_text(self.addr, method, path, self.token.as_deref(), body, false);
        self.writer.write_all(request.as_bytes())?;
        let mut status = None;
        let mut length = None;
        // The head, bounded: a status line and at most 64 header lines.
        for _ in 0..65 {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            match status {
                None => status = line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()),
                Some(_) => {
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse::<usize>().ok();
                    }
                }
            }
        }
        let status = status.ok_or_else(|| std::io::Error::other("no HTTP status line"))?;
        let length = length.ok_or_else(|| std::io::Error::other("an answer without Content-Length"))?;
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// The data of a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A connection to `vip` from source address `src` (bound before connecting), made in the
/// calling thread's namespace.
pub fn connect_from(src: IpAddr, vip: IpAddr) -> std::io::Result<Conn> {
    let domain = if vip.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&SocketAddr::new(vip, PORT).into(), TIMEOUT)?;
    Conn::over(s.into())
}

/// Long-lived connections, each from its own source address, with the backend that answered
/// first: `check` asks on every one again.
pub struct Held {
    pub conns: Vec<(Conn, String)>,
}

/// What one round of asking found.
#[derive(Debug, Default, PartialEq)]
pub struct Round {
    pub answered: usize,
    /// Closed, reset or timed out.
    pub broken: Vec<String>,
    /// Answered by another backend than the first time.
    pub moved: usize,
}

impl Held {
    /// Opens one connection from each source, in the client namespace.
    pub fn open(client: &crate::NetNs, sources: &[IpAddr], vip: IpAddr) -> std::io::Result<Self> {
        let sources = sources.to_vec();
        in_ns(client, move || {
            let mut conns = Vec::with_capacity(sources.len());
            for src in sources {
                let mut c = connect_from(src, vip)?;
                let first = c.ask()?;
                conns.push((c, first));
            }
            Ok(Self { conns })
        })
    }

    /// Asks on every connection once.
    pub fn check(&mut self) -> Round {
        let mut r = Round::default();
        for (c, first) in &mut self.conns {
            let src = c.writer.local_addr().map(|a| a.to_string()).unwrap_or_default();
            match c.ask() {
                Ok(id) if id == *first => r.answered += 1,
                Ok(id) => {
                    r.answered += 1;
                    r.moved += 1;
                    r.broken.push(format!("{src}: {first} -> {id}"));
                }
                Err(e) => r.broken.push(format!("{src}: {e}")),
            }
        }
        r
    }
}

/// Held connections asked without a pause, in a thread of their own, while the test does
/// something else (Cilium's upgrade test: clients send every 50 ms, no flow may break).
pub struct Steady {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Rounds done so far.
    rounds: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Steadied>>,
}

/// What a steady run saw.
#[derive(Debug)]
pub struct Steadied {
    pub connections: usize,
    pub rounds: usize,
    /// Each connection that failed (closed, reset, no answer within 1 s) or moved, once.
    pub broken: Vec<String>,
}

impl Steady {
    /// Asks on every connection of `held`, a round every 50 ms at most, until `finish`.
    pub fn start(held: Held) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = rounds.clone();
        let thread = std::thread::spawn(move || {
            let mut conns: Vec<(Conn, String, bool)> =
                held.conns.into_iter().map(|(c, id)| (c, id, true)).collect();
            for (c, _, _) in &conns {
                let _ = c.writer.set_read_timeout(Some(Duration::from_secs(1)));
            }
            let mut out = Steadied {
                connections: conns.len(),
                rounds: 0,
                broken: Vec::new(),
            };
            while !flag.load(Ordering::Relaxed) {
                let started = std::time::Instant::now();
                for (c, first, alive) in conns.iter_mut().filter(|(_, _, alive)| *alive) {
                    let src = c.writer.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    match c.ask() {
                        Ok(id) if id == *first => {}
                        Ok(id) => {
                            *alive = false;
                            out.broken.push(format!("{src}: moved {first} -> {id}"));
                        }
                        Err(e) => {
                            *alive = false;
                            out.broken.push(format!("{src}: {e}"));
                        }
                    }
                }
                out.rounds += 1;
                done.store(out.rounds, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
            }
            out
        });
        Self {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until `more` rounds past the current one are done: every connection
    /// was asked since the caller's last step. False if the bound passed first.
    pub fn wait_rounds(&self, more: usize, bound: Duration) -> bool {
        let at = self.rounds.load(std::sync::atomic::Ordering::Relaxed);
        crate::wait_until(bound, || {
            self.rounds.load(std::sync::atomic::Ordering::Relaxed) >= at + more
        })
    }

    /// Stops asking; what the rounds saw.
    pub fn finish(mut self) -> Steadied {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("steady thread")
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
