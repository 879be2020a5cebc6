//! The daemon's wiring: open the data plane, start the writer, the health monitor, the
//! next-hop refresher, the NAT collector and the control socket, and stop them in order.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use log::{info, warn};
use tokio::{net::UnixListener, sync::watch};

use crate::{
    api::{
        access::{Access, read_token},
        server::{self, Shared},
    },
    config::{Config, DaemonConfig},
    dataplane::{self, DataPlane, Readers},
    error::{Error, Result},
    health::monitor,
    metrics,
    model::Service,
    neigh::Resolver,
    reconcile::{
        Handles, Maps, Start, Writer, hops,
        persist::{KeptStatus, Persisted},
    },
    status::checks::Board,
    status_page,
};

/// Checks in flight at once, over all backends.
const MAX_CONCURRENT_CHECKS: usize = 1024;

/// What the daemon opens while it holds its start-up privileges (see `privileges`).
pub struct Prepared {
    config_path: PathBuf,
    config: Config,
    dp: dataplane::DataPlane,
    log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    metrics_listener: Option<(std::net::TcpListener, Option<String>)>,
    api_listener: Option<ApiListener>,
}

/// The TCP API's listener, who may call it, and its certificate.
type ApiListener = (std::net::TcpListener, Access, Option<crate::serve::SharedTls>);

impl Prepared {
    /// What the daemon keeps beyond `privileges::RUNTIME`: BIRD takes the daemon's set.
    pub fn keeps(&self) -> Vec<caps::Capability> {
        if self.config.daemon.bgp.is_some() {
            vec![caps::Capability::CAP_NET_BIND_SERVICE]
        } else {
            Vec::new()
        }
    }
}

/// The daemon's start-up, on the only thread, before it drops what it no longer needs: the
/// config, the run directory, the descriptor budget, the data plane opened or adopted, its
/// log, and the TCP listeners (a port below 1024 needs CAP_NET_BIND_SERVICE).
pub fn prepare(config_path: PathBuf) -> anyhow::Result<Prepared> {
    let config = Config::load(&config_path)?;
    // Refused at start as a change would be (the services a restart restores from the state
    // file were accepted already).
    crate::config::check_own_addresses(&[], &config.services)?;
    let cfg = &config.daemon;
    let socket = cfg.socket_path();
    prepare_run_dir(&cfg.run_dir)?;
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!(
            "a daemon for instance {} is already running (socket {})",
            cfg.instance,
            socket.display()
        );
    }
    let _ = std::fs::remove_file(&socket);
    let listeners = 1 + u64::from(cfg.metrics.enabled) + u64::from(cfg.api.listen.is_some());
    crate::serve::fd_budget(
        listeners * u64::from(cfg.http.max_connections),
        MAX_CONCURRENT_CHECKS as u64,
    )?;

    // Read again at each connect; here so a missing or bad one is an error at start.
    if let Some(c) = &cfg.cluster {
        crate::cluster::connection::Security::of(c)
            .check()
            .map_err(anyhow::Error::msg)?;
    }

    let settings = data_plane_settings(cfg);
    let mut dp = dataplane::open(&settings)?;
    dp.set_config(&settings.interfaces, &settings.forwarding)?;
    for a in &dp.attachments {
        info!(
            "{}: {} ({})",
            a.interface,
            a.mode,
            if a.adopted { "adopted" } else { "attached" }
        );
    }
    // Found by program id, which takes CAP_SYS_ADMIN: here, before it is dropped.
    let log = dp
        .program_id
        .and_then(|id| match aya_log::EbpfLogger::init_from_id(id) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("data-plane events will not be logged: {e}");
                None
            }
        });
    // Bound before anything runs, so a taken port is an error at start, with its fix.
    let bind = |addr: std::net::SocketAddr, what: &str, fix: &str| -> anyhow::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot serve {what} on {addr}: {e} (fix: {fix})"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let metrics_listener = if cfg.metrics.enabled {
        let token = match &cfg.metrics.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let listener = bind(
            cfg.metrics.listen,
            "metrics",
            "set [daemon.metrics] listen to a free address, or enabled = false",
        )?;
        Some((listener, token))
    } else {
        None
    };
    let api_listener = match cfg.api.listen {
        Some(addr) => {
            let access = Access::tcp(&cfg.api)?;
            let tls = match (&cfg.api.cert_file, &cfg.api.key_file) {
                (Some(cert), Some(key)) => {
                    Some(Arc::new(std::sync::RwLock::new(server::tls_acceptor(cert, key)?)))
                }
                _ => None,
            };
            let listener = bind(
                addr,
                "the control API",
                "set [daemon.api] listen to a free address",
            )?;
            Some((listener, access, tls))
        }
        None => None,
    };
    Ok(Prepared {
        config_path,
        config,
        dp,
        log,
        metrics_listener,
        api_listener,
    })
}

/// The data plane's settings, from `[daemon]`: the one place the data plane meets the config.
pub fn data_plane_settings(cfg: &DaemonConfig) -> dataplane::Settings {
    use crate::config::{EchoPolicy, TooBigPolicy, XdpModeSetting};
    dataplane::Settings {
        instance: cfg.instance.clone(),
        interfaces: cfg.interfaces.clone(),
        attach: match cfg.xdp_mode {
            XdpModeSetting::Auto => dataplane::AttachMode::Auto,
            XdpModeSetting::Native => dataplane::AttachMode::Native,
            XdpModeSetting::Generic => dataplane::AttachMode::Generic,
        },
        conntrack_size: cfg.conntrack_size,
        embryonic_size: cfg.embryonic_size,
        nat_table_size: cfg.nat.table_size,
        table_pool_slots: cfg.table_pool_slots,
        forwarding: dataplane::Forwarding {
            encap_source4: cfg.encap_source4,
            encap_source6: cfg.encap_source6,
            gue_port: cfg.gue_port,
            echo_reply: cfg.icmp_echo == EchoPolicy::Reply,
            too_big_icmp: cfg.encap_too_big == TooBigPolicy::Icmp,
            nat_source4: cfg.nat.source4,
            nat_source6: cfg.nat.source6,
            nat_port_first: cfg.nat.ports.first,
            nat_port_count: cfg.nat.ports.len(),
            nat_max_new_per_source: cfg.nat.max_new_per_source,
            flood_guard_per_cpu: cfg.flood_guard_per_cpu,
        },
    }
}

/// Runs the daemon until SIGINT/SIGTERM or a shutdown request. Forwarding continues after.
pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    let Prepared {
        config_path,
        config,
        dp,
        log,
        metrics_listener,
        api_listener,
    } = prepared;
    let cfg = config.daemon.clone();
    let socket = cfg.socket_path();
    let data_plane_log = log.and_then(|logger| match spawn_data_plane_log(logger) {
        Ok(task) => Some(task),
        Err(e) => {
            warn!("data-plane events will not be logged: {e}");
            None
        }
    });
    let mut dp = dp;
    check_attachments(&cfg, &mut dp.attachments).await;
    let resolver = Arc::new(Resolver::new()?);
    let (start, maps) = restore(&cfg, &config.services, dp);
    let readers = Arc::new(Readers::open(&cfg.instance)?);
    let histograms = metrics::Histograms::new();
    let (writer, handles, commands, warnings) =
        Writer::start(cfg.clone(), maps, resolver.clone(), start, histograms.clone()).await?;
    for w in warnings {
        warn!("{w}");
    }
    let writer_task = tokio::spawn(writer.run(commands));
    let background = Background::spawn(&cfg, &handles, &readers, resolver, &histograms)?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        config_path,
        cfg: cfg.clone(),
        writer: handles.commands.clone(),
        snapshot: handles.snapshot.clone(),
        readers: readers.clone(),
        nat: background.nat_status.clone(),
        conntrack: background.conntrack.clone(),
        board: background.board.clone(),
        bgp: background.bgp.clone(),
        drain: background.drain.clone(),
        cluster: background.cluster.clone(),
        cluster_status: background.cluster_status.clone(),
        stop: stop_tx.clone(),
        reloading: tokio::sync::Mutex::new(()),
    });
    let endpoints = Endpoints::serve(
        &shared,
        &background,
        &handles,
        &histograms,
        metrics_listener,
        api_listener,
    )?;
    drop(handles);
    drop(shared);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
        _ = stop_rx.changed() => {}
    }
    let _ = stop_tx.send(true);
    endpoints.stop().await;
    // With every sender gone, the writer finishes its pass and stops.
    background.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), writer_task).await;
    if let Some(t) = data_plane_log {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket);
    info!("daemon stopped; the data plane stays attached (`lb detach` removes it)");
    Ok(())
}

/// What the kernel says of each attached interface, read once: a veth in native mode whose
/// peer runs no XDP program loses what the program sends out of it (said in one line); an
/// adopted attachment gets its real mode (status and metrics said "pinned"), and one line where
/// it is not the mode the file asks for: changing it takes a re-attach, which adopting never
/// does.
async fn check_attachments(cfg: &DaemonConfig, attachments: &mut [dataplane::Attachment]) {
    for a in attachments.iter_mut() {
        let state = match crate::link::xdp_state(&a.interface).await {
            Ok(state) => state,
            Err(e) => {
                info!("{}: cannot read its XDP state from the kernel: {e}", a.interface);
                continue;
            }
        };
        if let Some(warning) = state.lossy_peer {
            warn!("{warning}");
        }
        if !a.adopted {
            continue;
        }
        match state.mode {
            Some(mode) => a.mode = mode,
            None => warn!(
                "{}: a pinned attachment was adopted, but the kernel shows no XDP program on it",
                a.interface
            ),
        }
        if let Some(wanted) = mode_mismatch(cfg.xdp_mode, a.mode) {
            warn!(
                "{}: the adopted program runs in {} mode, the config file says xdp_mode = \"{wanted}\": \
                 the mode changes only with a re-attach (fix: lb detach, then start the daemon; \
                 established flows are lost with the connection table)",
                a.interface, a.mode
            );
        }
    }
}

/// The mode the file asks for, when an attachment in `running` mode is not in it.
fn mode_mismatch(setting: crate::config::XdpModeSetting, running: &str) -> Option<&'static str> {
    use crate::config::XdpModeSetting;
    match (setting, running) {
        (XdpModeSetting::Native, "generic") => Some("native"),
        (XdpModeSetting::Generic, "native" | "offload") => Some("generic"),
        _ => None,
    }
}

/// What the writer starts from, and the maps' book: the state file's services (each checked as
/// an API change would be; one that fails stays out) and the config file as it was when they
/// were saved, when this daemon adopts a running data plane; else the config file's on fresh
/// maps. The writer lays the config file over a kept state (`reconcile::layers`).
fn restore(cfg: &DaemonConfig, configured: &[Service], dp: DataPlane) -> (Start, Maps) {
    let persisted = if dp.adopted {
        Persisted::restore(&cfg.state_path(), |kept, s| {
            s.validate()?;
            crate::model::health_settings::validate_service(s).map_err(Error::invalid)?;
            let mut all = kept.to_vec();
            all.push(s.clone());
            crate::model::validate_services(&all)?;
            crate::config::validate_against(cfg, &all)
        })
    } else {
        None
    };
    match persisted {
        Some(p) => {
            info!(
                "restored {} services from {}",
                p.services.len(),
                cfg.state_path().display()
            );
            for w in &p.warnings {
                warn!("{w}");
            }
            let start = Start {
                services: p.services,
                kept: p.kept,
                file_before: p.file.unwrap_or_else(|| configured.to_vec()),
                file: configured.to_vec(),
            };
            (start, Maps::adopt(dp, p.assignments))
        }
        None => {
            let start = Start {
                services: configured.to_vec(),
                kept: KeptStatus::default(),
                file_before: configured.to_vec(),
                file: configured.to_vec(),
            };
            (start, Maps::new(dp))
        }
    }
}

/// The writer's producers and the data plane's collectors, running beside it.
struct Background {
    board: Board,
    nat_status: Arc<std::sync::Mutex<crate::nat::NatStatus>>,
    conntrack: Arc<std::sync::Mutex<dataplane::census::ConntrackCensus>>,
    steering: Arc<crate::health::through::Steering>,
    bgp: Arc<std::sync::Mutex<crate::status::bgp::BgpStatus>>,
    drain: Arc<watch::Sender<bool>>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    cluster_status: Arc<std::sync::Mutex<crate::status::cluster::ClusterStatus>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop_threads: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Background {
    fn spawn(
        cfg: &DaemonConfig,
        handles: &Handles,
        readers: &Arc<Readers>,
        resolver: Arc<Resolver>,
        histograms: &metrics::Histograms,
    ) -> anyhow::Result<Self> {
        let board = Board::default();
        let steering = Arc::new(crate::health::through::Steering::new(
            data_plane_settings(cfg),
            handles.snapshot.clone(),
        ));
        let health = tokio::spawn(monitor::run(
            handles.services.clone(),
            handles.commands.clone(),
            board.clone(),
            MAX_CONCURRENT_CHECKS,
            Some(histograms.check.clone()),
            Some(monitor::PassiveSource {
                readers: readers.clone(),
                snapshot: handles.snapshot.clone(),
            }),
            Some(steering.clone()),
        ));
        let adaptive = tokio::spawn(crate::reconcile::adapt::run(
            handles.snapshot.clone(),
            readers.clone(),
            handles.commands.clone(),
        ));
        let epochs = tokio::spawn(hops::epochs(resolver.clone(), handles.commands.clone()));
        let refresher = tokio::spawn(hops::refresh(
            resolver,
            handles.snapshot.clone(),
            handles.commands.clone(),
            Duration::from_millis(cfg.neighbour_refresh_ms),
        ));
        let pins = dataplane::pin_dir(&cfg.instance);
        let nat_status = Arc::<std::sync::Mutex<crate::nat::NatStatus>>::default();
        let stop_threads = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let collector = crate::nat::spawn_collector(
            &pins.join(lb_common::maps::NAT_FLOWS),
            cfg.nat.clone(),
            nat_status.clone(),
            stop_threads.clone(),
        )?;
        let conntrack = Arc::<std::sync::Mutex<dataplane::census::ConntrackCensus>>::default();
        let census = dataplane::census::spawn(&pins, conntrack.clone(), stop_threads.clone())?;
        let draining = crate::bgp::drain_path(&cfg.run_dir, &cfg.instance).exists();
        let (drain, drain_rx) = watch::channel(draining);
        // Enabled from the start, so the announcer never takes a node in cluster mode for a
        // standalone one before the sync has begun.
        let cluster_status = Arc::new(std::sync::Mutex::new(crate::status::cluster::ClusterStatus {
            enabled: cfg.cluster.is_some(),
            ..Default::default()
        }));
        // The drain flag as the file says, before the announcer's first tick: a node restarted
        // drained says so from its first answer.
        let bgp = Arc::new(std::sync::Mutex::new(crate::status::bgp::BgpStatus {
            draining,
            ..Default::default()
        }));
        let sources = tokio::spawn(crate::discovery::run(
            handles.services.clone(),
            handles.commands.clone(),
            cfg.cluster.clone(),
        ));
        let mut tasks = vec![health, adaptive, refresher, epochs, sources];
        if let Some(settings) = cfg.bgp.clone() {
            let announcer = crate::bgp::Announcer {
                settings,
                instance: cfg.instance.clone(),
                interfaces: cfg.interfaces.clone(),
                run_dir: cfg.run_dir.clone(),
            };
            tasks.push(tokio::spawn(announcer.run(
                handles.snapshot.clone(),
                drain_rx,
                cluster_status.clone(),
                bgp.clone(),
            )));
        }
        let cluster = cfg.cluster.clone().map(|settings| {
            let cluster = Arc::new(crate::cluster::Cluster::new(settings, cluster_status.clone()));
            let owner = format!("{}/{}", host_id(), cfg.instance);
            tasks.push(tokio::spawn(cluster.clone().run(
                handles.commands.clone(),
                handles.snapshot.clone(),
                owner,
            )));
            cluster
        });
        Ok(Self {
            board,
            nat_status,
            conntrack,
            steering,
            bgp,
            drain: Arc::new(drain),
            cluster,
            cluster_status,
            tasks,
            stop_threads,
            threads: vec![collector, census],
        })
    }

    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.steering.close().await;
        self.stop_threads
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// What serves the daemon's readers and operators: the control socket, the TCP API, metrics,
/// SIGHUP and the config watcher.
struct Endpoints {
    server: tokio::task::JoinHandle<()>,
    tcp_api: Option<tokio::task::JoinHandle<()>>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    reloader: tokio::task::JoinHandle<()>,
    watcher: Option<(notify::RecommendedWatcher, tokio::task::JoinHandle<()>)>,
}

impl Endpoints {
    fn serve(
        shared: &Arc<Shared>,
        background: &Background,
        handles: &Handles,
        histograms: &metrics::Histograms,
        metrics_listener: Option<(std::net::TcpListener, Option<String>)>,
        api_listener: Option<ApiListener>,
    ) -> anyhow::Result<Self> {
        let cfg = &shared.cfg;
        let socket = cfg.socket_path();
        let listener = UnixListener::bind(&socket)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        info!("listening on {}", socket.display());
        let metrics = match metrics_listener {
            Some((listener, token)) => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let metrics = metrics::registry(
                    metrics::Sources {
                        snapshot: handles.snapshot.clone(),
                        readers: shared.readers.clone(),
                        board: background.board.clone(),
                        nat: background.nat_status.clone(),
                        nat_capacity: u64::from(cfg.nat.table_size),
                        conntrack_capacity: u64::from(cfg.conntrack_size),
                        conntrack: background.conntrack.clone(),
                        bgp: background.bgp.clone(),
                        cluster: background.cluster_status.clone(),
                    },
                    histograms,
                )
                .map_err(|e| anyhow::anyhow!("metrics registry: {e}"))?;
                info!(
                    "metrics on http://{0}/metrics, the status page on http://{0}/status",
                    cfg.metrics.listen
                );
                let gate = status_page::Gate::metrics(token.clone());
                let page = status_page::router(shared.clone(), gate);
                Some(tokio::spawn(metrics::serve(
                    listener,
                    metrics,
                    token,
                    Some(page),
                    cfg.http,
                    shared.stop.subscribe(),
                )))
            }
            None => None,
        };
        let server = tokio::spawn(server::serve(
            crate::serve::Listener::Unix(listener),
            shared.clone(),
            Access::socket(),
            None,
            None,
        ));
        // What SIGHUP reads again besides the config file: the API's tokens and certificate.
        let credentials = api_listener
            .as_ref()
            .map(|(_, access, tls)| (access.clone(), tls.clone()));
        let tcp_api = match api_listener {
            Some((listener, access, tls)) => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let scheme = if tls.is_some() { "https" } else { "http" };
                let at = cfg.api.listen.map(|a| a.to_string()).unwrap_or_default();
                info!("control API on {scheme}://{at}, the status page on {scheme}://{at}/status");
                let gate = {
                    let access = access.clone();
                    status_page::Gate::new(move |request| access.may_read(request))
                };
                let page = status_page::router(shared.clone(), gate);
                Some(tokio::spawn(server::serve(
                    crate::serve::Listener::Tcp(listener),
                    shared.clone(),
                    access,
                    tls,
                    Some(page),
                )))
            }
            None => None,
        };
        // SIGHUP reloads the config file, as `lb reload` does, and the API's tokens and TLS
        // certificate (each kept as it was if its file is refused).
        let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reloader = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while sighup.recv().await.is_some() {
                    if let Some((access, tls)) = &credentials {
                        reload_credentials(&shared.cfg.api, access, tls.as_ref());
                    }
                    match server::reload_config(&shared).await {
                        Ok(warnings) => {
                            info!("SIGHUP: reloaded {}", shared.config_path.display());
                            for w in warnings {
                                warn!("{w}");
                            }
                        }
                        Err(e) => warn!("SIGHUP: reload refused, nothing changed: {e}"),
                    }
                }
            })
        };
        let watcher = if cfg.watch_config {
            Some(watch_config(shared.clone())?)
        } else {
            None
        };
        Ok(Self {
            server,
            tcp_api,
            metrics,
            reloader,
            watcher,
        })
    }

    /// Stops reloads and lets each server finish what it is answering (2 s at most each).
    async fn stop(self) {
        self.reloader.abort();
        let _ = self.reloader.await;
        drop(self.watcher);
        let wait = |t| tokio::time::timeout(Duration::from_secs(2), t);
        if let Some(t) = self.tcp_api {
            let _ = wait(t).await;
        }
        let _ = wait(self.server).await;
        if let Some(t) = self.metrics {
            let _ = wait(t).await;
        }
    }
}

/// This host, as the cluster's node keys name their owners: its machine id, else its name.
fn host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown-host".into())
}

/// Reloads when the config file changes: watches its directory (editors replace files), and
/// waits for writes to settle (200 ms) before reading it.
fn watch_config(
    shared: Arc<Shared>,
) -> anyhow::Result<(notify::RecommendedWatcher, tokio::task::JoinHandle<()>)> {
    let path = std::fs::canonicalize(&shared.config_path)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = crate::files::watch(&path, tx)?;
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Coalesce the burst of events one save makes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            match server::reload_config(&shared).await {
                Ok(warnings) => {
                    info!("{} changed: reloaded", shared.config_path.display());
                    for w in warnings {
                        warn!("{w}");
                    }
                }
                Err(e) => warn!(
                    "{} changed, reload refused, nothing changed: {e}",
                    shared.config_path.display()
                ),
            }
        }
    });
    Ok((watcher, task))
}

/// Forwards the data plane's rare-event records (aya-log) to this process's log.
fn spawn_data_plane_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd holds it.
    let mut fd =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }?;
    Ok(tokio::spawn(async move {
        while let Ok(mut ready) = fd.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}

/// Reads the API's token files and certificate again; what fails keeps its old value.
fn reload_credentials(
    api: &crate::config::ApiConfig,
    access: &Access,
    tls: Option<&crate::serve::SharedTls>,
) {
    match access.reload(api) {
        Ok(()) => info!("SIGHUP: API tokens read again"),
        Err(e) => warn!("SIGHUP: API tokens kept as they were: {e}"),
    }
    if let (Some(tls), Some(cert), Some(key)) = (tls, &api.cert_file, &api.key_file) {
        match server::tls_acceptor(cert, key) {
            Ok(acceptor) => {
                *tls.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
                info!("SIGHUP: TLS certificate read again");
            }
            Err(e) => warn!("SIGHUP: TLS certificate kept as it was: {e}"),
        }
    }
}

/// The run directory holds the socket and the state file: it must be a real directory of
/// ours. A link or another user's directory is refused, never chmod-ed.
fn prepare_run_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        Err(e) => return Err(Error::io(format!("stat {}", dir.display()), e)),
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::config(format!(
                "run_dir {} is a symbolic link (fix: point run_dir at the directory itself)",
                dir.display()
            )));
        }
        Ok(m) if !m.is_dir() => {
            return Err(Error::config(format!(
                "run_dir {} is not a directory",
                dir.display()
            )));
        }
        // SAFETY: geteuid has no preconditions.
        Ok(m) if m.uid() != unsafe { libc::geteuid() } => {
            return Err(Error::config(format!(
                "run_dir {} belongs to uid {}, not to this daemon's (fix: a directory of root's, as /run/lb)",
                dir.display(),
                m.uid()
            )));
        }
        Ok(_) => {}
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_is_a_real_directory_of_ours() {
        let base = std::env::temp_dir().join(format!("lb-run-dir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // Made when missing, private.
        let fresh = base.join("run");
        prepare_run_dir(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A link is refused, and what it points at keeps its mode.
        let target = base.join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = prepare_run_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Another user's directory is refused, never chmod-ed.
        let foreign = base.join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        let e = prepare_run_dir(&foreign).unwrap_err().to_string();
        assert!(e.contains("belongs to uid 65534"), "{e}");
        assert_eq!(
            std::fs::metadata(&foreign).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
