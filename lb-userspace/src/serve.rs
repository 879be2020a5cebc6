//! One accept loop for every HTTP listener: the control socket, the TCP API (with or without
//! TLS) and metrics. A slow or idle client holds a connection only so long, and a crowd of
//! them only so many: a cap per listener and per peer address, header-read, idle and request
//! timeouts (HAProxy's `timeout http-request`, `timeout http-keep-alive`, `maxconn`), and
//! accept errors that back off instead of spinning. The caps keep every listener's
//! descriptors inside the daemon's budget (see `fd_budget`), so API pressure cannot take the
//! descriptors health checks, maps and the state file need.

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::Request,
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use log::{info, warn};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Semaphore, watch},
};

use crate::config::HttpLimits;

/// A TLS acceptor that SIGHUP may replace (a renewed certificate); each connection takes the
/// one current when it comes.
pub type SharedTls = Arc<std::sync::RwLock<tokio_rustls::TlsAcceptor>>;

/// The peer of a TCP connection (none on the socket), in every request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub Option<IpAddr>);

/// A listening socket of either kind.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Serves `app` on `listener` within `limits` until `stop` is set; `name` names the listener
/// in the log. With `tls`, every TCP connection is a TLS one.
pub async fn serve(
    name: &'static str,
    listener: Listener,
    app: Router,
    tls: Option<SharedTls>,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let app = app.layer(middleware::from_fn_with_state(
        Duration::from_secs(limits.request_timeout_s),
        request_timeout,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let peers = Arc::new(Mutex::new(HashMap::<IpAddr, u32>::new()));
    let refusals = Refusals::default();
    loop {
        let failed = tls
            .is_some()
            .then(|| crate::failpoints::io_error("tls-accept"))
            .flatten();
        let accepted = match failed {
            Some(e) => Err(e),
            None => tokio::select! {
                a = accept(&listener) => a,
                _ = stop.wait_for(|s| *s) => return,
            },
        };
        let (io, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: back off so the loop does not spin, and say so
                // once a while rather than per attempt.
                refusals.note(name, &format!("accept: {e}"));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.note(
                name,
                &format!(
                    "{} connections open, the cap (max_connections)",
                    limits.max_connections
                ),
            );
            continue; // dropping `io` closes it
        };
        let peer_slot = match peer {
            Some(ip) => match PeerSlot::take(&peers, ip, limits.max_connections_per_peer) {
                Some(p) => Some(p),
                None => {
                    refusals.note(
                        name,
                        &format!(
                            "{ip} has {} connections open, the cap (max_connections_per_peer)",
                            limits.max_connections_per_peer
                        ),
                    );
                    continue;
                }
            },
            None => None,
        };
        let phase = Arc::new(Phase::default());
        let app = app
            .clone()
            .layer(axum::Extension(Peer(peer)))
            .layer(middleware::from_fn_with_state(phase.clone(), in_request));
        let tls = tls
            .as_ref()
            .map(|t| t.read().unwrap_or_else(|p| p.into_inner()).clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _held = (slot, peer_slot);
            let header = Duration::from_millis(limits.header_read_timeout_ms);
            match (io, tls) {
                (Stream::Tcp(tcp), Some(acceptor)) => {
                    // The handshake is bounded as the request head is.
                    match tokio::time::timeout(header, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => connection(tls, app, phase, &limits, stop).await,
                        Ok(Err(e)) => log::debug!("{name}: TLS handshake with {peer:?}: {e}"),
                        Err(_) => log::debug!("{name}: TLS handshake with {peer:?} timed out"),
                    }
                }
                (Stream::Tcp(tcp), None) => connection(tcp, app, phase, &limits, stop).await,
                (Stream::Unix(unix), _) => connection(unix, app, phase, &limits, stop).await,
            }
        });
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<(Stream, Option<IpAddr>)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Stream::Tcp(s), Some(peer.ip())))
        }
        Listener::Unix(l) => Ok((Stream::Unix(l.accept().await?.0), None)),
    }
}

/// One HTTP/1.1 connection: the header-read timeout for each request head, the idle timeout
/// between requests (no byte either way), and a graceful end when the daemon stops.
///
/// The head's clock is ours, not hyper's: hyper starts its `header_read_timeout` as soon as it
/// waits for a head, so a kept-alive connection quiet for that long between two requests was
/// closed (at 10 s, under the 60 s idle timeout). As HAProxy's `timeout http-request` and
/// Envoy's `request_headers_timeout` do, the clock starts at the connection's accept for its
/// first request and at the first byte of each later one; between requests only the idle
/// timeout runs.
async fn connection<T>(
    io: T,
    app: Router,
    phase: Arc<Phase>,
    limits: &HttpLimits,
    mut stop: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    phase.head_since.store(0, Ordering::Relaxed);
    let io = Watched {
        inner: io,
        started,
        phase: phase.clone(),
    };
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = Duration::from_secs(limits.idle_timeout_s);
    let head = Duration::from_millis(limits.header_read_timeout_ms);
    let mut closing: Option<Instant> = None;
    loop {
        let tick = tokio::time::sleep(Duration::from_millis(500).min(idle).min(head / 2));
        tokio::select! {
            _ = &mut conn => return,
            _ = stop.wait_for(|s| *s), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = tick => {
                let now = started.elapsed();
                let since = |at: &AtomicU64| now.saturating_sub(Duration::from_millis(at.load(Ordering::Relaxed)));
                let quiet = since(&phase.last);
                let heading = phase.head_since.load(Ordering::Relaxed) != NOT_READING;
                match closing {
                    // A request still running after the request timeout and a grace: drop it.
                    Some(at) if at.elapsed() > Duration::from_secs(limits.request_timeout_s) + Duration::from_secs(1) => return,
                    // A head that has not come whole in time (a slow client): drop it, as
                    // hyper's own timeout did, with no answer.
                    _ if heading && since(&phase.head_since) >= head => {
                        log::debug!("an HTTP request head took longer than {} ms (header_read_timeout_ms)", limits.header_read_timeout_ms);
                        return;
                    }
                    Some(_) => {}
                    None if quiet >= idle => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    None => {}
                }
            }
        }
    }
}

/// `Phase::head_since` when no head is being read.
const NOT_READING: u64 = u64::MAX;

/// Where one connection is between its requests, in milliseconds since its accept: when a
/// byte last moved either way, and since when a request head has been coming (`NOT_READING`
/// while a request runs or the connection waits between requests).
#[derive(Default)]
struct Phase {
    last: AtomicU64,
    head_since: AtomicU64,
    requests: std::sync::atomic::AtomicU32,
}

/// A request's head is whole once it reaches the service: its clock stops until the next
/// request's first byte.
async fn in_request(
    axum::extract::State(phase): axum::extract::State<Arc<Phase>>,
    request: Request,
    next: Next,
) -> Response {
    struct Running(Arc<Phase>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.requests.fetch_sub(1, Ordering::Relaxed);
        }
    }
    phase.requests.fetch_add(1, Ordering::Relaxed);
    phase.head_since.store(NOT_READING, Ordering::Relaxed);
    let _running = Running(phase.clone());
    next.run(request).await
}

/// A request that runs past its timeout is answered 503 (its handler is dropped).
async fn request_timeout(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(r) => r,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "error": "timeout",
                "detail": format!("the request took longer than {} s (request_timeout_s)", limit.as_secs()),
            })),
        )
            .into_response(),
    }
}

/// A peer address's share of a listener's connections, given back on drop.
struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<Mutex<HashMap<IpAddr, u32>>>, ip: IpAddr, cap: u32) -> Option<Self> {
        let mut map = peers.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if cap != 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(Self {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Refused connections, said at most every 10 s per listener with how many since.
#[derive(Default)]
struct Refusals {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Refusals {
    fn note(&self, name: &str, why: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        if s.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            warn!("{name}: refused {} connection(s) in the last 10 s: {why}", s.1);
            *s = (Some(Instant::now()), 0);
        }
    }
}

/// An I/O stream that notes when a byte last moved either way, and when a request head's first
/// byte came (`Phase`).
struct Watched<T> {
    inner: T,
    started: Instant,
    phase: Arc<Phase>,
}

impl<T> Watched<T> {
    fn touch(&self) -> u64 {
        let now = self.started.elapsed().as_millis() as u64;
        self.phase.last.store(now, Ordering::Relaxed);
        now
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.touch();
            // Bytes while no request runs begin the next head (a body's bytes do not).
            if self.phase.requests.load(Ordering::Relaxed) == 0 {
                let _ = self.phase.head_since.compare_exchange(
                    NOT_READING,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Descriptors the daemon needs besides its listeners and checks: the maps and programs,
/// the state file, netlink, the log, the check path.
pub const DAEMON_FDS: u64 = 256;

/// The token a request sends as `Authorization: Bearer <token>`, if it sends one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Raises the soft descriptor limit to the hard one and checks the budget: every listener's
/// cap, `checks` (the most health checks in flight at once, each one socket) and `DAEMON_FDS`
/// must fit, so no crowd of HTTP clients can take a check's descriptor. Returns the limit, or
/// a one-line error naming the fix.
pub fn fd_budget(listener_caps: u64, checks: u64) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill, then to set.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            anyhow::bail!("getrlimit(NOFILE): {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let need = listener_caps + checks + DAEMON_FDS;
    if lim.rlim_cur < need {
        anyhow::bail!(
            "the descriptor limit is {} but the listeners' caps ({listener_caps}), health checks ({checks}) and the daemon's own {DAEMON_FDS} need {need} (fix: raise LimitNOFILE, or lower [daemon.http] max_connections)",
            lim.rlim_cur
        );
    }
    info!(
        "descriptors: limit {}, listeners at most {listener_caps}, checks at most {checks}",
        lim.rlim_cur
    );
    Ok(lim.rlim_cur)
}
