//! The chaos run's steady traffic, from the client namespace: long-lived TCP connections that
//! each ask every 50 ms, new TCP connections at a steady rate, and UDP flows. Each thread
//! records what it saw in the shared `Tally`; nothing here judges it (see `super::judge`).

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

/// A long-lived connection or UDP flow asks this often.
pub const ASK_EVERY: Duration = Duration::from_millis(50);
/// An ask not answered within this is a miss, and a failure.
pub const MISS_AFTER: Duration = Duration::from_secs(1);
/// A UDP flow asks this often (20 flows a family: 400 datagrams a second in all).
pub const UDP_EVERY: Duration = Duration::from_millis(100);
/// Threads opening long-lived connections.
const OPENERS: usize = 16;
/// A new connection's connect and first answer may take this (two SYN retransmits).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A service the traffic goes to: its name and address (VIP and port).
#[derive(Clone, Debug)]
pub struct Target {
    pub service: &'static str,
    pub addr: SocketAddr,
}

/// A long-lived connection or UDP flow that failed: closed, reset, a miss past 1 s, or an
/// answer from another backend than its first.
#[derive(Clone, Debug)]
pub struct Broken {
    pub service: &'static str,
    pub backend: String,
    /// When the connection or flow got its backend, and when it failed (from the run's start).
    pub since: Duration,
    pub at: Duration,
    pub why: String,
}

/// A new connection that failed, with its tuple; `backend` is filled in later from the
/// daemon's tables (`lb lookup`), when they still name it.
#[derive(Clone, Debug)]
pub struct Refused {
    pub service: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub started: Duration,
    pub at: Duration,
    pub why: String,
    pub backend: Option<Option<String>>,
}

/// What the traffic did, as it went.
#[derive(Debug, Default)]
pub struct Tally {
    /// Long-lived connections opened (the first ones and their replacements).
    pub long_opened: u64,
    /// Answers on long-lived connections, per service.
    pub long_answers: BTreeMap<&'static str, u64>,
    /// Asks sent on long-lived connections, per service.
    pub long_asks: BTreeMap<&'static str, u64>,
    pub long_broken: Vec<Broken>,
    /// New connections (long-lived opens included) that worked, per service.
    pub new_ok: BTreeMap<&'static str, u64>,
    pub new_failed: Vec<Refused>,
    /// Datagrams sent and answered, per UDP service.
    pub udp_sent: BTreeMap<&'static str, u64>,
    pub udp_answers: BTreeMap<&'static str, u64>,
    pub udp_broken: Vec<Broken>,
    /// Connections and flows served, per backend.
    pub served: BTreeMap<String, u64>,
    /// Most long-lived connections open at once (the goal is at least 200).
    pub long_open_min_after_start: Option<usize>,
    /// Long-lived connections open now (the soak compares the daemon's counted flows to it).
    pub long_open_now: usize,
}

/// What the traffic threads share: the run's clock, the stop flag, the tally.
pub struct Shared {
    pub start: Instant,
    pub stop: AtomicBool,
    pub tally: Mutex<Tally>,
}

impl Shared {
    pub fn new(start: Instant) -> Arc<Self> {
        Arc::new(Self {
            start,
            stop: AtomicBool::new(false),
            tally: Mutex::new(Tally::default()),
        })
    }

    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One new connection tried: counted as served, or its tuple kept for the judge.
    fn record_new(
        &self,
        target: &Target,
        started: Duration,
        r: &Result<(TcpStream, String), (SocketAddr, String)>,
    ) {
        let mut t = self.tally();
        match r {
            Ok((_, backend)) => {
                *t.new_ok.entry(target.service).or_default() += 1;
                *t.served.entry(backend.clone()).or_default() += 1;
            }
            Err((src, why)) => t.new_failed.push(Refused {
                service: target.service,
                src: *src,
                dst: target.addr,
                started,
                at: self.now(),
                why: why.clone(),
                backend: None,
            }),
        }
    }
}

/// One TCP connection to `to`, bound first so its tuple is known even when the connect fails,
/// and its first answer: the backend that served it. Made in the calling thread's namespace.
fn open(to: SocketAddr) -> Result<(TcpStream, String), (SocketAddr, String)> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("any address");
    let domain = socket2::Domain::for_address(to);
    let fail =
        |src: Option<SocketAddr>, what: &str, e: std::io::Error| (src.unwrap_or(any), format!("{what}: {e}"));
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(|e| fail(None, "socket", e))?;
    s.bind(&any.into()).map_err(|e| fail(None, "bind", e))?;
    let src = s.local_addr().ok().and_then(|a| a.as_socket());
    s.connect_timeout(&to.into(), CONNECT_TIMEOUT)
        .map_err(|e| fail(src, "connect", e))?;
    // The local address the route gave it, now that it is connected.
    let src = s.local_addr().ok().and_then(|a| a.as_socket()).or(src);
    let mut stream: TcpStream = s.into();
    let ask = |stream: &mut TcpStream| -> std::io::Result<String> {
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        stream.write_all(b"who\n")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte)? {
                0 => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed")),
                _ if byte[0] == b'\n' => break,
                _ => line.push(byte[0]),
            }
        }
        Ok(String::from_utf8_lossy(&line).trim().to_string())
    };
    match ask(&mut stream) {
        Ok(id) => Ok((stream, id)),
        Err(e) => Err(fail(src, "first answer", e)),
    }
}

/// A long-lived connection in the poll loop.
struct Live {
    stream: TcpStream,
    buf: Vec<u8>,
    target: usize,
    backend: String,
    since: Duration,
    /// When its pending ask went out, if one is pending.
    sent: Option<Duration>,
    due: Duration,
}

/// `per_target` long-lived connections to each target, each asking every `ASK_EVERY`; a
/// connection that fails is recorded and replaced. Runs until the stop flag, then closes every
/// connection (a FIN each). Call in the client namespace (see `netns::spawn_in`).
pub fn long_lived(shared: Arc<Shared>, targets: Vec<Target>, per_target: usize) {
    // Opening is blocking (a refused backend's SYN may wait seconds): a thread of its own
    // feeds the poll loop.
    let (want_tx, want_rx) = mpsc::channel::<usize>();
    let want_rx = Arc::new(Mutex::new(want_rx));
    let (conn_tx, conn_rx) = mpsc::channel::<Live>();
    // Several openers: a connect to a blackholed backend waits seconds, and the others go on.
    let openers: Vec<_> = (0..OPENERS)
        .map(|_| {
            let (shared, targets, want_rx, conn_tx) =
                (shared.clone(), targets.clone(), want_rx.clone(), conn_tx.clone());
            let ns = std::fs::File::open("/proc/thread-self/ns/net").expect("own namespace");
            std::thread::spawn(move || {
                crate::netns::enter(&ns).expect("enter the client namespace");
                loop {
                    let Ok(i) = want_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() else {
                        return;
                    };
                    // Until it opens: a failure is a new connection that failed, judged as such.
                    while !shared.stopped() {
                        let started = shared.now();
                        let r = open(targets[i].addr);
                        shared.record_new(&targets[i], started, &r);
                        if let Ok((stream, backend)) = r {
                            shared.tally().long_opened += 1;
                            let now = shared.now();
                            let live = Live {
                                stream,
                                buf: Vec::new(),
                                target: i,
                                backend,
                                since: now,
                                sent: None,
                                due: now + ASK_EVERY,
                            };
                            if conn_tx.send(live).is_err() {
                                return;
                            }
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
        })
        .collect();
    drop(conn_tx);
    for i in 0..targets.len() {
        for _ in 0..per_target {
            want_tx.send(i).expect("opener");
        }
    }
    let want_total = targets.len() * per_target;
    let mut live: Vec<Live> = Vec::new();
    let mut all_open = false;
    while !shared.stopped() {
        while let Ok(c) = conn_rx.try_recv() {
            c.stream.set_nonblocking(true).expect("nonblocking");
            live.push(c);
        }
        if live.len() == want_total {
            all_open = true;
        }
        shared.tally().long_open_now = live.len();
        if all_open {
            let mut t = shared.tally();
            t.long_open_min_after_start = Some(
                t.long_open_min_after_start
                    .map_or(live.len(), |m| m.min(live.len())),
            );
        }
        let now = shared.now();
        let mut failed: Vec<(usize, String)> = Vec::new();
        for (i, c) in live.iter_mut().enumerate() {
            if c.sent.is_none() && now >= c.due {
                match c.stream.write(b"who\n") {
                    Ok(4) => {
                        c.sent = Some(now);
                        *shared
                            .tally()
                            .long_asks
                            .entry(targets[c.target].service)
                            .or_default() += 1;
                    }
                    Ok(n) => failed.push((i, format!("short write ({n} of 4 bytes)"))),
                    Err(e) => failed.push((i, format!("send: {e}"))),
                }
            }
        }
        // Wait for answers, at most until the next due ask or miss.
        let mut fds: Vec<libc::pollfd> = live
            .iter()
            .map(|c| libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: if c.sent.is_some() { libc::POLLIN } else { 0 },
                revents: 0,
            })
            .collect();
        let next = live
            .iter()
            .map(|c| c.sent.map_or(c.due, |s| s + MISS_AFTER))
            .min()
            .unwrap_or(now + ASK_EVERY);
        let wait = next.saturating_sub(shared.now()).min(ASK_EVERY).as_millis() as i32;
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.max(1)) };
        let now = shared.now();
        for (i, (c, fd)) in live.iter_mut().zip(&fds).enumerate() {
            if failed.iter().any(|(f, _)| *f == i) {
                continue;
            }
            if fd.revents != 0 {
                let mut chunk = [0u8; 256];
                match c.stream.read(&mut chunk) {
                    Ok(0) => failed.push((i, "closed by the far end".into())),
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => failed.push((i, format!("{e}"))),
                }
                if let Some(end) = c.buf.iter().position(|&b| b == b'\n') {
                    let answer = String::from_utf8_lossy(&c.buf[..end]).trim().to_string();
                    c.buf.drain(..=end);
                    if answer != c.backend {
                        failed.push((i, format!("answered by {answer}")));
                    } else if let Some(sent) = c.sent.take() {
                        c.due = sent + ASK_EVERY;
                        *shared
                            .tally()
                            .long_answers
                            .entry(targets[c.target].service)
                            .or_default() += 1;
                    }
                }
            }
            if let Some(sent) = c.sent
                && now > sent + MISS_AFTER
                && !failed.iter().any(|(f, _)| *f == i)
            {
                failed.push((i, format!("no answer in {} ms", MISS_AFTER.as_millis())));
            }
        }
        failed.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        failed.dedup_by_key(|(i, _)| *i);
        for (i, why) in failed {
            let c = live.swap_remove(i);
            shared.tally().long_broken.push(Broken {
                service: targets[c.target].service,
                backend: c.backend,
                since: c.since,
                at: now,
                why,
            });
            let _ = want_tx.send(c.target);
        }
    }
    drop(want_tx);
    drop(conn_rx);
    for o in openers {
        let _ = o.join();
    }
    // Closed with a FIN each (dropped), so the data plane takes them off the active counts.
    drop(live);
}

/// New TCP connections to the targets in turn, `per_s` a second from this thread (a blocked
/// connect delays the next ones, which then catch up), each asked once and closed.
pub fn new_connections(shared: Arc<Shared>, targets: Vec<Target>, per_s: f64) {
    let start = Instant::now();
    let mut n = 0u64;
    while !shared.stopped() {
        let due = start + Duration::from_secs_f64(n as f64 / per_s);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            continue;
        }
        let target = &targets[n as usize % targets.len()];
        let started = shared.now();
        let r = open(target.addr);
        shared.record_new(target, started, &r);
        n += 1;
    }
}

/// A UDP flow: one connected socket, the backend that answered it first.
struct Flow {
    socket: UdpSocket,
    target: usize,
    backend: Option<String>,
    since: Duration,
    sent: Option<Duration>,
    due: Duration,
}

/// `per_target` UDP flows to each target, each asking every `UDP_EVERY`: a miss past 1 s, a
/// refusal or an answer from another backend is recorded (and the flow goes on, on the backend
/// that answers it now). Call in the client namespace.
pub fn udp_flows(shared: Arc<Shared>, targets: Vec<Target>, per_target: usize) {
    let mut flows: Vec<Flow> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        for k in 0..per_target {
            let socket = crate::client::udp_socket(t.addr, Duration::from_secs(1)).expect("UDP socket");
            socket.set_nonblocking(true).expect("nonblocking");
            flows.push(Flow {
                socket,
                target: i,
                backend: None,
                since: Duration::ZERO,
                sent: None,
                // Spread over the period.
                due: shared.now() + UDP_EVERY.mul_f64(k as f64 / per_target as f64),
            });
        }
    }
    let mut buf = [0u8; 256];
    while !shared.stopped() {
        let now = shared.now();
        for f in flows.iter_mut() {
            if f.sent.is_none() && now >= f.due && f.socket.send(b"who").is_ok() {
                f.sent = Some(now);
                *shared
                    .tally()
                    .udp_sent
                    .entry(targets[f.target].service)
                    .or_default() += 1;
            }
        }
        let mut fds: Vec<libc::pollfd> = flows
            .iter()
            .map(|f| libc::pollfd {
                fd: f.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        let now = shared.now();
        for (f, fd) in flows.iter_mut().zip(&fds) {
            let service = targets[f.target].service;
            let broken = |f: &Flow, why: String| {
                shared.tally().udp_broken.push(Broken {
                    service,
                    backend: f.backend.clone().unwrap_or_else(|| "(none yet)".into()),
                    since: f.since,
                    at: now,
                    why,
                })
            };
            if fd.revents != 0 {
                match f.socket.recv(&mut buf) {
                    Ok(n) => {
                        let id = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                        let mut t = shared.tally();
                        *t.udp_answers.entry(service).or_default() += 1;
                        drop(t);
                        match &f.backend {
                            None => {
                                *shared.tally().served.entry(id.clone()).or_default() += 1;
                                f.backend = Some(id);
                                f.since = now;
                            }
                            Some(b) if *b != id => {
                                broken(f, format!("answered by {id}"));
                                f.backend = Some(id);
                                f.since = now;
                            }
                            Some(_) => {}
                        }
                        if let Some(sent) = f.sent.take() {
                            f.due = sent + UDP_EVERY;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => {
                        broken(f, format!("{e}"));
                        f.sent = None;
                        f.due = now + UDP_EVERY;
                    }
                }
            }
            if let Some(sent) = f.sent
                && now > sent + MISS_AFTER
            {
                broken(f, format!("no answer in {} ms", MISS_AFTER.as_millis()));
                f.sent = None;
                f.due = now;
            }
        }
    }
}

/// The services' addresses: VIP and port.
pub fn target(service: &'static str, vip: IpAddr) -> Target {
    Target {
        service,
        addr: SocketAddr::new(vip, crate::topology::PORT),
    }
}
