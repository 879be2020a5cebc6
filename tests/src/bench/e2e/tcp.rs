//! TCP connections/s: one epoll client thread in the client namespace keeping a fixed number of
//! exchanges in flight, and one epoll server thread for all backends' listeners. Event loops
//! rather than a thread per connection keep the load side's CPU cost per connection low, since
//! it shares a core with nothing but itself and must outpace the forwarder's core.

use std::{
    collections::HashMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    load::{CpuSnapshot, Measured, Probe, Windows},
    net::{PORT, Topology, VIP, spawn_in_ns},
};
use crate::{NetNs, in_ns, wait_until};

/// Exchanges in flight at any time.
pub const CONCURRENCY: usize = 128;
/// Longest an exchange may take (connect, request, reply to EOF) before it counts as an error.
const TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST: &[u8] = b"hello\n";

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> Result<Self> {
        // SAFETY: epoll_create1 returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: fd is a new descriptor we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Registers or changes `fd` (level-triggered); the event carries the fd back.
    fn ctl(&self, op: i32, fd: RawFd, events: u32) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: ev is valid for the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ready fds (closing an fd removes it from the set, so no explicit removal is needed).
    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> Result<Vec<RawFd>> {
        // SAFETY: events is a valid buffer of events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout.as_millis() as i32,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                return Ok(Vec::new());
            }
            return Err(e).context("epoll_wait");
        }
        Ok(events[..n as usize].iter().map(|e| e.u64 as RawFd).collect())
    }
}

fn no_events() -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; 256]
}

enum Step {
    Pending,
    Done,
    Failed(String),
}

/// Every backend's listener on 0.0.0.0:PORT, served by one thread: read one request line,
/// answer the backend id, close. The server closes first, so TIME_WAIT lands on the backends
/// and the client's ports come back at once.
pub struct Servers {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    errors: Arc<Errors>,
}

#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn add(&self, e: impl FnOnce() -> String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first.lock().expect("lock").get_or_insert_with(e);
    }
}

impl Servers {
    pub fn start(backends: &[NetNs]) -> Result<Self> {
        let mut listeners = Vec::new();
        for (i, ns) in backends.iter().enumerate() {
            let listener = in_ns(ns, || {
                TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
            })
            .with_context(|| format!("listen on port {PORT} in {}", ns.name))?;
            listener.set_nonblocking(true).context("nonblocking listener")?;
            listeners.push((listener, format!("b{}\n", i + 1).into_bytes()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Errors::default());
        let thread = std::thread::spawn({
            let (stop, errors) = (stop.clone(), errors.clone());
            move || serve(listeners, &stop, &errors)
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            errors,
        })
    }
}

impl Servers {
    /// The first error the servers met in their lifetime.
    fn first_error(&self) -> String {
        self.errors
            .first
            .lock()
            .expect("lock")
            .clone()
            .unwrap_or_default()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct ServerConn {
    stream: TcpStream,
    backend: usize,
    request: Vec<u8>,
    since: Instant,
}

fn serve(listeners: Vec<(TcpListener, Vec<u8>)>, stop: &AtomicBool, errors: &Errors) -> Result<()> {
    let epoll = Epoll::new()?;
    for (l, _) in &listeners {
        epoll
            .ctl(libc::EPOLL_CTL_ADD, l.as_raw_fd(), libc::EPOLLIN as u32)
            .context("epoll add listener")?;
    }
    let mut conns: HashMap<RawFd, ServerConn> = HashMap::new();
    let mut events = no_events();
    let mut swept = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for fd in epoll.wait(&mut events, Duration::from_millis(100))? {
            if let Some(backend) = listeners.iter().position(|(l, _)| l.as_raw_fd() == fd) {
                loop {
                    match listeners[backend].0.accept() {
                        Ok((stream, _)) => {
                            if let Err(e) = stream.set_nonblocking(true) {
                                errors.add(|| format!("nonblocking: {e}"));
                                continue;
                            }
                            let mut c = ServerConn {
                                stream,
                                backend,
                                request: Vec::new(),
                                since: Instant::now(),
                            };
                            // The request has often arrived by the time the accept is seen.
                            match server_step(&mut c, &listeners[backend].1) {
                                Step::Pending => {
                                    let cfd = c.stream.as_raw_fd();
                                    if let Err(e) = epoll.ctl(libc::EPOLL_CTL_ADD, cfd, libc::EPOLLIN as u32)
                                    {
                                        errors.add(|| format!("epoll: {e}"));
                                        continue;
                                    }
                                    conns.insert(cfd, c);
                                }
                                Step::Done => {}
                                Step::Failed(e) => errors.add(|| e),
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            errors.add(|| format!("accept: {e}"));
                            break;
                        }
                    }
                }
            } else if let Some(c) = conns.get_mut(&fd) {
                match server_step(c, &listeners[c.backend].1) {
                    Step::Pending => {}
                    Step::Done => {
                        conns.remove(&fd);
                    }
                    Step::Failed(e) => {
                        errors.add(|| e);
                        conns.remove(&fd);
                    }
                }
            }
        }
        if swept.elapsed() > Duration::from_millis(100) {
            swept = Instant::now();
            conns.retain(|_, c| {
                let alive = c.since.elapsed() < TIMEOUT;
                if !alive {
                    errors.add(|| format!("no request within {} s", TIMEOUT.as_secs()));
                }
                alive
            });
        }
    }
    Ok(())
}

fn server_step(c: &mut ServerConn, reply: &[u8]) -> Step {
    let mut buf = [0u8; 64];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => return Step::Failed("EOF before the request".into()),
            Ok(n) => {
                c.request.extend_from_slice(&buf[..n]);
                if c.request.contains(&b'\n') {
                    // A few bytes into an empty send buffer: written whole or not at all.
                    return match c.stream.write(reply) {
                        Ok(n) if n == reply.len() => Step::Done,
                        Ok(_) => Step::Failed("short write".into()),
                        Err(e) => Step::Failed(format!("send: {e}")),
                    };
                }
                if c.request.len() > 64 {
                    return Step::Failed("request too long".into());
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Step::Failed(format!("receive: {e}")),
        }
    }
}

/// One blocking exchange: connect, send the request, read the answer to EOF, close.
fn exchange() -> Result<()> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(VIP, PORT)), TIMEOUT)
        .context("connect")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(REQUEST).context("send")?;
    let mut reply = Vec::with_capacity(8);
    s.read_to_end(&mut reply).context("receive")?;
    check_reply(&reply).map_err(anyhow::Error::msg)
}

/// A backend's answer is its id, "b<N>\n".
fn check_reply(reply: &[u8]) -> Result<(), String> {
    if reply.len() < 3 || reply[0] != b'b' || reply.last() != Some(&b'\n') {
        return Err(format!("unexpected reply {:?}", String::from_utf8_lossy(reply)));
    }
    Ok(())
}

/// Waits (bounded) until one exchange through the contender succeeds.
pub fn ready(client: &NetNs) -> Result<()> {
    let last = Arc::new(Mutex::new(String::new()));
    let ok = {
        let last = last.clone();
        in_ns(client, move || {
            wait_until(Duration::from_secs(10), || match exchange() {
                Ok(()) => true,
                Err(e) => {
                    *last.lock().expect("lock") = format!("{e:#}");
                    false
                }
            })
        })
    };
    if !ok {
        bail!(
            "no TCP exchange through the contender within 10 s: {}",
            last.lock().expect("lock")
        );
    }
    Ok(())
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

struct Counters {
    phase: AtomicU8,
    done: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn fail(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().expect("lock").get_or_insert(e);
    }
}

struct ClientConn {
    stream: TcpStream,
    sent: bool,
    reply: Vec<u8>,
    since: Instant,
}

/// A non-blocking connect to VIP:PORT from the calling thread's namespace.
fn connect() -> std::io::Result<TcpStream> {
    // SAFETY: socket returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket we own from here on.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(VIP).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in of the given size.
    let rc = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(stream)
}

fn client_step(c: &mut ClientConn, epoll: &Epoll) -> Step {
    if !c.sent {
        // Writable (or an error) after a non-blocking connect: the handshake is over.
        match c.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => return Step::Failed(format!("connect: {e}")),
        }
        match c.stream.write(REQUEST) {
            Ok(n) if n == REQUEST.len() => {}
            Ok(_) => return Step::Failed("short write".into()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
            Err(e) => return Step::Failed(format!("send: {e}")),
        }
        c.sent = true;
        if let Err(e) = epoll.ctl(libc::EPOLL_CTL_MOD, c.stream.as_raw_fd(), libc::EPOLLIN as u32) {
            return Step::Failed(format!("epoll: {e}"));
        }
        return Step::Pending;
    }
    let mut buf = [0u8; 64];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => {
                return match check_reply(&c.reply) {
                    Ok(()) => Step::Done,
                    Err(e) => Step::Failed(e),
                };
            }
            Ok(n) => c.reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Pending,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Step::Failed(format!("receive: {e}")),
        }
    }
}

fn client(counters: &Counters) -> Result<()> {
    let epoll = Epoll::new()?;
    let mut conns: HashMap<RawFd, ClientConn> = HashMap::new();
    let mut events = no_events();
    let mut swept = Instant::now();
    while counters.phase.load(Ordering::Relaxed) != STOP {
        while conns.len() < CONCURRENCY {
            match connect() {
                Ok(stream) => {
                    let fd = stream.as_raw_fd();
                    epoll
                        .ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLOUT as u32)
                        .context("epoll add connection")?;
                    conns.insert(
                        fd,
                        ClientConn {
                            stream,
                            sent: false,
                            reply: Vec::new(),
                            since: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    counters.fail(format!("connect: {e}"));
                    break;
                }
            }
        }
        for fd in epoll.wait(&mut events, Duration::from_millis(50))? {
            let Some(c) = conns.get_mut(&fd) else { continue };
            match client_step(c, &epoll) {
                Step::Pending => {}
                Step::Done => {
                    conns.remove(&fd);
                    if counters.phase.load(Ordering::Relaxed) == MEASURE {
                        counters.done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Step::Failed(e) => {
                    conns.remove(&fd);
                    counters.fail(e);
                }
            }
        }
        if swept.elapsed() > Duration::from_millis(100) {
            swept = Instant::now();
            conns.retain(|_, c| {
                let alive = c.since.elapsed() < TIMEOUT;
                if !alive {
                    counters.fail(format!(
                        "no {} within {} s",
                        if c.sent { "reply" } else { "connection" },
                        TIMEOUT.as_secs()
                    ));
                }
                alive
            });
        }
    }
    Ok(())
}

/// Runs the client from the client namespace; counts the exchanges completed in the window.
/// Any failed exchange (warm-up included) is an error; over 1% of the completed count, or none
/// completed, fails the measurement.
pub fn measure(
    topo: &Topology,
    servers: &Servers,
    w: Windows,
    probe: Probe,
    threads: &[i32],
) -> Result<Measured> {
    let counters = Arc::new(Counters {
        phase: AtomicU8::new(WARMUP),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let thread = spawn_in_ns(&topo.client, {
        let counters = counters.clone();
        move || client(&counters)
    })?;
    let window = (|| -> Result<(u64, f64, u64, u64, f64, String)> {
        std::thread::sleep(w.warmup);
        let server_errors0 = servers.errors.count.load(Ordering::Relaxed);
        let extra0 = probe()?;
        let cpu0 = CpuSnapshot::take(threads)?;
        counters.phase.store(MEASURE, Ordering::Relaxed);
        std::thread::sleep(w.measure);
        let completed = counters.done.load(Ordering::Relaxed);
        let cpu1 = CpuSnapshot::take(threads)?;
        // Before the client stops: the exchanges it abandons then are no server's fault.
        let server_errors = servers.errors.count.load(Ordering::Relaxed) - server_errors0;
        counters.phase.store(STOP, Ordering::Relaxed);
        let extra1 = probe()?;
        let secs = cpu1.elapsed_since(&cpu0);
        let share = cpu0.threads_share(&cpu1);
        Ok((
            completed,
            secs,
            extra1 - extra0,
            server_errors,
            share,
            cpu0.report(&cpu1, "forwarder"),
        ))
    })();
    counters.phase.store(STOP, Ordering::Relaxed);
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("TCP client thread panicked"))?
        .context("TCP client")?;
    let (completed, secs, extra, server_errors, forwarder_cpu, cpu) = window?;
    let errors = counters.errors.load(Ordering::Relaxed);
    let first = counters
        .first_error
        .lock()
        .expect("lock")
        .clone()
        .unwrap_or_default();
    if completed == 0 {
        bail!("no TCP exchange completed in the window ({errors} errors; first: {first})");
    }
    // A healthy forwarder loses nothing here; tolerate a stray loss, not a pattern.
    if (errors + server_errors) * 100 > completed {
        bail!(
            "{errors} client and {server_errors} server errors for {completed} completed exchanges \
             (over 1%); first client error: {first}; first server error: {}",
            servers.first_error()
        );
    }
    Ok(Measured {
        rate: completed as f64 / secs,
        forwarder_cpu,
        detail: if server_errors > 0 {
            format!(
                "{errors} client errors, {server_errors} server errors (first: {}); {cpu}",
                servers.first_error()
            )
        } else {
            format!("{errors} client errors, 0 server errors; {cpu}")
        },
        extra,
        count: completed,
    })
}
