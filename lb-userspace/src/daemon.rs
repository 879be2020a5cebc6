//! The daemon's wiring: open the data plane, start the writer, the health monitor, the
//! next-hop refresher, the NAT collector and the control socket, and stop them in order.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use log::{info, warn};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::watch,
};

use crate::{
    api::server::{self, Shared, Tokens},
    config::Config,
    dataplane::{self, Readers},
    error::{Error, Result},
    health::monitor,
    metrics,
    model::Service,
    neigh::Resolver,
    reconcile::{Reconciler, Writer, hops},
    state::Persisted,
};

/// Checks in flight at once, over all backends.
const MAX_CONCURRENT_CHECKS: usize = 1024;

/// Runs the daemon until SIGINT/SIGTERM or a shutdown request. Forwarding continues after.
pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let cfg = config.daemon.clone();
    let socket = cfg.socket_path();
    prepare_run_dir(&cfg.run_dir)?;
    if UnixStream::connect(&socket).await.is_ok() {
        anyhow::bail!(
            "a daemon for instance {} is already running (socket {})",
            cfg.instance,
            socket.display()
        );
    }
    let _ = std::fs::remove_file(&socket);

    let mut dp = dataplane::open(&cfg)?;
    dp.set_config(&cfg)?;
    for a in &dp.attachments {
        info!(
            "{}: {} ({})",
            a.interface,
            a.mode,
            if a.adopted { "adopted" } else { "attached" }
        );
    }
    let data_plane_log = dp.program_id.and_then(|id| match spawn_data_plane_log(id) {
        Ok(task) => Some(task),
        Err(e) => {
            warn!("data-plane events will not be logged: {e}");
            None
        }
    });
    let resolver = Arc::new(Resolver::new()?);
    let persisted = if dp.adopted {
        Persisted::load(&cfg.state_path())?
    } else {
        None
    };
    let (services, rec): (Vec<Service>, _) = match persisted {
        Some(p) => {
            info!(
                "restored {} services from {}",
                p.services.len(),
                cfg.state_path().display()
            );
            let rec = Reconciler::adopt(&dp, p.assignments);
            (p.services.into_iter().map(Service::from).collect(), rec)
        }
        None => (config.services.clone(), Reconciler::new(&dp)),
    };
    let readers = Arc::new(Readers::open(&cfg.instance)?);
    // Bound before anything runs, so a taken port is an error at start, with its fix.
    let metrics_listener = if cfg.metrics.enabled {
        let token = match &cfg.metrics.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(cfg.metrics.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot serve metrics on {}: {e} (fix: set [daemon.metrics] listen to a free address, or enabled = false)",
                cfg.metrics.listen
            )
        })?;
        Some((listener, token))
    } else {
        None
    };
    let api_listener = match cfg.api.listen {
        Some(addr) => {
            let tokens = Tokens {
                admin: cfg
                    .api
                    .token_file
                    .as_deref()
                    .map(read_token)
                    .transpose()?
                    .map(Arc::new),
                read: cfg
                    .api
                    .read_token_file
                    .as_deref()
                    .map(read_token)
                    .transpose()?
                    .map(Arc::new),
            };
            let tls = match (&cfg.api.cert_file, &cfg.api.key_file) {
                (Some(cert), Some(key)) => Some(server::tls_acceptor(cert, key)?),
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot serve the control API on {addr}: {e} (fix: set [daemon.api] listen to a free address)")
            })?;
            Some((listener, tokens, tls))
        }
        None => None,
    };
    let histograms = metrics::Histograms::new();
    let (writer, handles, commands, warnings) = Writer::start(
        cfg.clone(),
        dp,
        rec,
        resolver.clone(),
        services,
        histograms.clone(),
    )
    .await?;
    for w in warnings {
        warn!("{w}");
    }
    let writer_task = tokio::spawn(writer.run(commands));

    let board = monitor::Board::default();
    let steering = Arc::new(crate::health::through::Steering::new(
        cfg.clone(),
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
    let refresher = tokio::spawn(hops::refresh(
        resolver,
        handles.snapshot.clone(),
        handles.commands.clone(),
        Duration::from_millis(cfg.neighbour_refresh_ms),
    ));
    let nat_pin = dataplane::pin_dir(&cfg.instance).join(lb_common::maps::NAT_FLOWS);
    let nat_status = Arc::<std::sync::Mutex<crate::nat::NatStatus>>::default();
    let stop_collector = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = crate::nat::spawn_collector(
        &nat_pin,
        cfg.nat.clone(),
        nat_status.clone(),
        stop_collector.clone(),
    )?;

    let conntrack = Arc::<std::sync::Mutex<dataplane::census::ConntrackCensus>>::default();
    let census = dataplane::census::spawn(
        &dataplane::pin_dir(&cfg.instance),
        conntrack.clone(),
        stop_collector.clone(),
    )?;
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    info!("listening on {}", socket.display());
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let metrics_task = match metrics_listener {
        Some((listener, token)) => {
            let metrics = metrics::registry(
                metrics::Sources {
                    snapshot: handles.snapshot.clone(),
                    readers: readers.clone(),
                    board: board.clone(),
                    nat: nat_status.clone(),
                    nat_capacity: u64::from(cfg.nat.table_size),
                    conntrack_capacity: u64::from(cfg.conntrack_size),
                    conntrack,
                },
                &histograms,
            )
            .map_err(|e| anyhow::anyhow!("metrics registry: {e}"))?;
            info!("metrics on http://{}/metrics", cfg.metrics.listen);
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics,
                token,
                stop_tx.subscribe(),
            )))
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        config_path,
        cfg: cfg.clone(),
        writer: handles.commands,
        snapshot: handles.snapshot,
        readers,
        nat: nat_status,
        board,
        stop: stop_tx.clone(),
    });
    let server = tokio::spawn(server::serve_unix(listener, shared.clone()));
    let tcp_api = match api_listener {
        Some((listener, tokens, tls)) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            info!(
                "control API on {scheme}://{}",
                cfg.api.listen.map(|a| a.to_string()).unwrap_or_default()
            );
            Some(tokio::spawn(server::serve_tcp(
                listener,
                shared.clone(),
                tokens,
                tls,
            )))
        }
        None => None,
    };
    // SIGHUP reloads the config file, as `lb reload` does.
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reloader = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
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
    drop(shared);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
        _ = stop_rx.changed() => {}
    }
    let _ = stop_tx.send(true);
    reloader.abort();
    let _ = reloader.await;
    drop(watcher);
    if let Some(t) = tcp_api {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some(t) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    health.abort();
    refresher.abort();
    adaptive.abort();
    // With every sender gone, the writer finishes its pass and stops.
    let _ = health.await;
    let _ = refresher.await;
    let _ = adaptive.await;
    let _ = tokio::time::timeout(Duration::from_secs(10), writer_task).await;
    steering.close().await;
    stop_collector.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = collector.join();
    let _ = census.join();
    if let Some(t) = data_plane_log {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket);
    info!("daemon stopped; the data plane stays attached (`lb detach` removes it)");
    Ok(())
}

/// Reloads when the config file changes: watches its directory (editors replace files), and
/// waits for writes to settle (200 ms) before reading it.
fn watch_config(
    shared: Arc<Shared>,
) -> anyhow::Result<(notify::RecommendedWatcher, tokio::task::JoinHandle<()>)> {
    use notify::Watcher;
    let path = std::fs::canonicalize(&shared.config_path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file = path.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && e.paths.iter().any(|p| p == &file)
            && !matches!(e.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
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
fn spawn_data_plane_log(program_id: u32) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let logger = aya_log::EbpfLogger::init_from_id(program_id)?;
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

/// A bearer token from a file: its first line, which must not be empty.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.is_empty() {
        anyhow::bail!("token file {} is empty", path.display());
    }
    Ok(token)
}

fn prepare_run_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))
}
