//! The daemon: owns the data plane, serves the control socket, keeps backend MACs fresh.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::future::join_all;
use lb_common::{Counter, FlowKey};
use log::{error, info, warn};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, watch},
};

use crate::{
    api::{Request, Response},
    config::{Config, DaemonConfig, ServiceSpec, validate_against, validate_services, validate_weight},
    dataplane::{
        self, DataPlane,
        sync::{Reconciler, addr_bytes, backend_key},
    },
    error::{Error, Result},
    neigh::{NextHop, ResolveError, Resolver},
    state::Persisted,
};

const RESOLVE_TIMEOUT: Duration = Duration::from_millis(1000);

pub struct Daemon {
    config_path: PathBuf,
    cfg: DaemonConfig,
    services: Vec<ServiceSpec>,
    dp: DataPlane,
    rec: Reconciler,
    hops: HashMap<IpAddr, NextHop>,
    resolver: Resolver,
    /// What the NAT collector last saw.
    nat: Arc<std::sync::Mutex<crate::nat::NatStatus>>,
}

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
    let resolver = Resolver::new()?;
    let persisted = if dp.adopted {
        Persisted::load(&cfg.state_path())?
    } else {
        None
    };
    let (services, rec) = match persisted {
        Some(p) => {
            info!(
                "restored {} services from {}",
                p.services.len(),
                cfg.state_path().display()
            );
            let rec = Reconciler::adopt(&dp, p.assignments);
            (p.services, rec)
        }
        None => (config.services.clone(), Reconciler::new(&dp)),
    };
    let mut daemon = Daemon {
        config_path,
        cfg: cfg.clone(),
        services: Vec::new(),
        dp,
        rec,
        hops: HashMap::new(),
        resolver,
        nat: Arc::default(),
    };
    let warnings = daemon.replace_services(services).await?;
    for w in warnings {
        warn!("{w}");
    }
    let daemon = Arc::new(Mutex::new(daemon));

    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    info!("listening on {}", socket.display());
    let (stop_tx, mut stop_rx) = watch::channel(false);

    let refresher = tokio::spawn(refresh_loop(
        daemon.clone(),
        Duration::from_millis(cfg.neighbour_refresh_ms),
    ));
    let nat_pin = dataplane::pin_dir(&cfg.instance).join(lb_common::maps::NAT_FLOWS);
    let nat_status = daemon.lock().await.nat.clone();
    let stop_collector = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector =
        crate::nat::spawn_collector(&nat_pin, cfg.nat.clone(), nat_status, stop_collector.clone())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve(stream, daemon.clone(), stop_tx.clone())); }
                Err(e) => error!("accept: {e}"),
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = stop_rx.changed() => break,
        }
    }
    refresher.abort();
    stop_collector.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = collector.join();
    let _ = std::fs::remove_file(&socket);
    info!("daemon stopped; the data plane stays attached (`lb detach` removes it)");
    Ok(())
}

fn prepare_run_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))
}

async fn serve(stream: UnixStream, daemon: Arc<Mutex<Daemon>>, stop: watch::Sender<bool>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let (response, shutdown) = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Shutdown) => (Response::ok(json!("stopping"), vec![]), true),
            Ok(request) => (daemon.lock().await.handle(request).await, false),
            Err(e) => (Response::error(format!("malformed request: {e}")), false),
        };
        let mut out =
            serde_json::to_string(&response).unwrap_or_else(|_| r#"{"ok":false,"error":"serialize"}"#.into());
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
        if shutdown {
            let _ = stop.send(true);
            return;
        }
    }
}

/// Re-reads backend MACs; a change (or a backend resolving late) rewrites the maps.
async fn refresh_loop(daemon: Arc<Mutex<Daemon>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut d = daemon.lock().await;
        if let Err(e) = d.refresh_hops().await {
            warn!("neighbour refresh: {e}");
        }
    }
}

impl Daemon {
    async fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok((self.status(), vec![])),
            Request::ListServices => Ok((self.list(), vec![])),
            Request::Stats => self.stats().map(|d| (d, vec![])),
            Request::Lookup { protocol, src, dst } => self.lookup(protocol, src, dst).map(|d| (d, vec![])),
            Request::Reload => match Config::load(&self.config_path) {
                Ok(cfg) => {
                    if cfg.daemon != self.cfg {
                        warn!("reload: [daemon] changes take effect only after a restart");
                    }
                    self.replace_services(cfg.services)
                        .await
                        .map(|w| (json!("reloaded"), w))
                }
                Err(e) => Err(e),
            },
            Request::AddService { service } => {
                self.mutate(|s| {
                    if s.iter().any(|x| x.name == service.name) {
                        return Err(Error::Exists(format!("service {} already exists", service.name)));
                    }
                    s.push(service);
                    Ok(())
                })
                .await
            }
            Request::RemoveService { name } => {
                self.mutate(|s| {
                    let before = s.len();
                    s.retain(|x| x.name != name);
                    if s.len() == before {
                        return Err(unknown_service(&name));
                    }
                    Ok(())
                })
                .await
            }
            Request::AddBackend { service, backend } => {
                self.mutate(|s| {
                    let svc = s
                        .iter_mut()
                        .find(|x| x.name == service)
                        .ok_or_else(|| unknown_service(&service))?;
                    if svc.backend(&backend.id).is_some() {
                        return Err(Error::Exists(format!(
                            "service {service} already has a backend {}",
                            backend.id
                        )));
                    }
                    svc.backends.push(backend);
                    Ok(())
                })
                .await
            }
            Request::RemoveBackend { service, id } => {
                self.mutate(|s| {
                    let svc = s
                        .iter_mut()
                        .find(|x| x.name == service)
                        .ok_or_else(|| unknown_service(&service))?;
                    let before = svc.backends.len();
                    svc.backends.retain(|b| b.id != id);
                    if svc.backends.len() == before {
                        return Err(unknown_backend(&service, &id));
                    }
                    Ok(())
                })
                .await
            }
            Request::SetWeight { service, id, weight } => {
                self.mutate(|s| {
                    validate_weight(weight)?;
                    let svc = s
                        .iter_mut()
                        .find(|x| x.name == service)
                        .ok_or_else(|| unknown_service(&service))?;
                    let b = svc
                        .backends
                        .iter_mut()
                        .find(|b| b.id == id)
                        .ok_or_else(|| unknown_backend(&service, &id))?;
                    b.weight = weight;
                    Ok(())
                })
                .await
            }
            Request::Shutdown => Ok((json!("stopping"), vec![])),
        };
        match result {
            Ok((data, warnings)) => Response::ok(data, warnings),
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Applies a change to a copy of the services; nothing changes unless all of it is valid.
    async fn mutate(
        &mut self,
        change: impl FnOnce(&mut Vec<ServiceSpec>) -> Result<()>,
    ) -> Result<(serde_json::Value, Vec<String>)> {
        let mut next = self.services.clone();
        change(&mut next)?;
        let warnings = self.replace_services(next).await?;
        Ok((json!("ok"), warnings))
    }

    /// Validates, resolves new backends, rewrites the maps and persists. On error the old state stays.
    async fn replace_services(&mut self, next: Vec<ServiceSpec>) -> Result<Vec<String>> {
        validate_services(&next)?;
        validate_against(&self.cfg, &next)?;
        let mut warnings = Vec::new();
        let mut hops = self.hops.clone();
        let wanted = backend_addresses(&next);
        // A backend's needs can change with its services' modes: resolve again then.
        let current = backend_addresses(&self.services);
        hops.retain(|a, _| wanted.contains_key(a) && current.get(a) == wanted.get(a));
        let missing: Vec<(IpAddr, bool)> = wanted
            .iter()
            .filter(|(a, _)| !hops.contains_key(a))
            .map(|(a, l2)| (*a, *l2))
            .collect();
        let resolver = &self.resolver;
        let results = join_all(missing.iter().map(|&(a, l2)| async move {
            if l2 {
                resolver.resolve(a, RESOLVE_TIMEOUT).await
            } else {
                resolver.route_hop(a).await
            }
        }))
        .await;
        let missing: Vec<IpAddr> = missing.into_iter().map(|(a, _)| a).collect();
        for (addr, result) in missing.iter().zip(results) {
            match result {
                Ok(hop) => {
                    hops.insert(*addr, hop);
                }
                Err(e @ ResolveError::Unresolved { .. }) => warnings.push(format!(
                    "{e}; the backend stays out of the tables until it resolves"
                )),
                Err(e) => return Err(e.into()),
            }
        }
        if let Err(e) = self.rec.apply(&mut self.dp, &next, &hops) {
            // Put the maps back as they were.
            if let Err(undo) = self.rec.apply(&mut self.dp, &self.services, &self.hops) {
                error!("rollback failed: {undo}");
            }
            return Err(e);
        }
        warnings.extend(forwarding_warnings(&self.cfg.interfaces, &next));
        warnings.extend(self.encap_mtu_warnings(&next, &hops).await);
        warnings.extend(nat_warnings(&self.cfg, &next));
        self.services = next;
        self.hops = hops;
        self.persist()?;
        Ok(warnings)
    }

    /// Encapsulated services whose backends' routes cannot carry a full-size client packet
    /// plus the outer headers: such packets get "too big" answers, or are dropped. Says so,
    /// with the fix.
    async fn encap_mtu_warnings(
        &self,
        services: &[ServiceSpec],
        hops: &HashMap<IpAddr, NextHop>,
    ) -> Vec<String> {
        let mut client = (0, "");
        for iface in &self.cfg.interfaces {
            let Ok(index) = dataplane::ifindex(iface) else {
                continue;
            };
            if let Some(mtu) = self.resolver.interface_mtu(index).await
                && mtu > client.0
            {
                client = (mtu, iface.as_str());
            }
        }
        let (client_mtu, client_if) = client;
        let mut out = Vec::new();
        for s in services {
            let overhead = match (s.forwarding, s.vip.is_ipv4()) {
                (crate::config::Forwarding::Ipip, true) => 20,
                (crate::config::Forwarding::Ipip, false) => 40,
                (crate::config::Forwarding::Gue, true) => 32,
                (crate::config::Forwarding::Gue, false) => 52,
                _ => continue,
            };
            let need = client_mtu + overhead;
            let short: Vec<(&str, u32)> = s
                .backends
                .iter()
                .filter_map(|b| {
                    let hop = hops.get(&b.address)?;
                    (hop.mtu > 0 && hop.mtu < need).then_some((b.id.as_str(), hop.mtu))
                })
                .collect();
            if let Some(&(id, mtu)) = short.iter().min_by_key(|(_, m)| *m) {
                out.push(format!(
                    "service {}: the routes to {} of its {} backends take less than the {need} bytes a full-size \
                     client packet ({client_if} MTU {client_mtu}) needs once encapsulated (smallest: {id}, {mtu}); \
                     such packets get ICMP \"too big\" answers, or are dropped (fix: raise the MTU towards the \
                     backends to {need})",
                    s.name,
                    short.len(),
                    s.backends.len()
                ));
            }
        }
        out
    }

    fn persist(&self) -> Result<()> {
        Persisted {
            services: self.services.clone(),
            assignments: self.rec.assignments.clone(),
        }
        .save(&self.cfg.state_path())
    }

    async fn refresh_hops(&mut self) -> Result<()> {
        let wanted = backend_addresses(&self.services);
        let addrs: Vec<IpAddr> = wanted.keys().copied().collect();
        let resolver = &self.resolver;
        let results = join_all(wanted.iter().map(|(&a, &l2)| async move {
            if !l2 {
                return resolver.route_hop(a).await;
            }
            match resolver.lookup(a).await {
                Ok(hop) => Ok(hop),
                Err(_) => resolver.resolve(a, Duration::from_millis(200)).await,
            }
        }))
        .await;
        let mut hops = HashMap::new();
        for (addr, r) in addrs.iter().zip(results) {
            match r {
                Ok(hop) => {
                    hops.insert(*addr, hop);
                }
                Err(e) => {
                    if self.hops.contains_key(addr) {
                        warn!("backend {addr} no longer resolves ({e}); taking it out of the tables");
                    }
                }
            }
        }
        if hops != self.hops {
            info!("backend next hops changed; rewriting the maps");
            self.rec.apply(&mut self.dp, &self.services, &hops)?;
            self.hops = hops;
            self.persist()?;
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        json!({
            "instance": self.cfg.instance,
            "pin_dir": dataplane::pin_dir(&self.cfg.instance),
            "adopted": self.dp.adopted,
            "interfaces": self.dp.attachments,
            "services": self.services.len(),
            "backends": self.services.iter().map(|s| s.backends.len()).sum::<usize>(),
            "table_pool": { "capacity": self.rec.regions.capacity(), "free": self.rec.regions.free_slots() },
        })
    }

    /// Table slots each backend slot owns in a service's active table.
    fn slot_counts(&self, name: &str) -> HashMap<u32, u32> {
        let mut counts = HashMap::new();
        let active = self.rec.assignments.services.get(name).and_then(|s| s.active);
        if let Some(table) = active.and_then(|r| self.dp.pool.read(r.offset, r.size)) {
            for slot in table {
                *counts.entry(slot).or_insert(0) += 1;
            }
        }
        counts
    }

    fn list(&self) -> serde_json::Value {
        let services: Vec<_> = self
            .services
            .iter()
            .map(|s| {
                let counts = self.slot_counts(&s.name);
                let backends: Vec<_> = s
                    .backends
                    .iter()
                    .map(|b| {
                        let slot = self
                            .rec
                            .assignments
                            .backends
                            .get(&backend_key(&s.name, &b.id))
                            .map(|x| x.slot);
                        let hop = self.hops.get(&b.address);
                        json!({
                            "id": b.id, "address": b.address, "port": b.port(s), "weight": b.weight,
                            "region": b.region, "zone": b.zone, "labels": b.labels,
                            "resolved": hop.is_some(),
                            "mac": hop.map(|h| mac_string(&h.dst_mac)),
                            "interface": hop.map(|h| h.ifname.clone()),
                            "table_slots": slot.and_then(|x| counts.get(&x)).copied().unwrap_or(0),
                        })
                    })
                    .collect();
                json!({
                    "name": s.name, "vip": s.vip, "port": s.port, "protocol": s.protocol,
                    "table_size": s.table_size, "hash": s.hash, "forwarding": s.forwarding, "fragments": s.fragments, "snat": s.snat,
                    "backends": backends,
                })
            })
            .collect();
        json!(services)
    }

    fn stats(&self) -> Result<serde_json::Value> {
        let mut services = Vec::new();
        for s in &self.services {
            let Some(slot) = self.rec.assignments.services.get(&s.name) else {
                continue;
            };
            let t = self.dp.service_traffic(slot.id)?;
            let mut backends = Vec::new();
            for b in &s.backends {
                if let Some(bs) = self.rec.assignments.backends.get(&backend_key(&s.name, &b.id)) {
                    let bt = self.dp.backend_traffic(bs.slot)?;
                    backends.push(json!({"id": b.id, "packets": bt.packets, "bytes": bt.bytes, "new_flows": bt.new_flows}));
                }
            }
            services.push(json!({"name": s.name, "packets": t.packets, "bytes": t.bytes, "new_flows": t.new_flows, "backends": backends}));
        }
        let mut counters = serde_json::Map::new();
        for &c in Counter::ALL {
            counters.insert(c.name().into(), json!(self.dp.counter(c)?));
        }
        // As of the collector's last sweep (every daemon.nat.gc_interval_ms).
        let status = *self.nat.lock().unwrap_or_else(|p| p.into_inner());
        let mut nat = serde_json::to_value(status).unwrap_or_default();
        nat["as_of_ms_ago"] = json!(
            (status.swept_ns > 0)
                .then(|| crate::nat::monotonic_ns().saturating_sub(status.swept_ns) / 1_000_000)
        );
        Ok(json!({"services": services, "counters": counters, "nat": nat}))
    }

    fn lookup(
        &self,
        protocol: crate::config::Protocol,
        src: std::net::SocketAddr,
        dst: std::net::SocketAddr,
    ) -> Result<serde_json::Value> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(Error::invalid(
                "source and destination are of different IP families",
            ));
        }
        let svc = self
            .services
            .iter()
            .find(|s| s.vip == dst.ip() && s.port == dst.port() && s.protocol == protocol)
            .or_else(|| {
                self.services
                    .iter()
                    .find(|s| s.vip == dst.ip() && s.port == 0 && s.protocol == protocol)
            })
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no service for {protocol} {dst}: the packet would be passed to the kernel"
                ))
            })?;
        let (src_addr, family) = addr_bytes(src.ip());
        let (dst_addr, _) = addr_bytes(dst.ip());
        let key = FlowKey::new(
            family,
            protocol.number(),
            src_addr,
            dst_addr,
            src.port().to_be(),
            dst.port().to_be(),
        );
        let by_slot = |slot: u32| {
            svc.backends.iter().find(|b| {
                self.rec
                    .assignments
                    .backends
                    .get(&backend_key(&svc.name, &b.id))
                    .is_some_and(|x| x.slot == slot)
            })
        };
        if svc.forwarding == crate::config::Forwarding::Nat
            && let Ok(e) = self.dp.nat.get(&key, 0)
            && let Some(b) = by_slot(e.backend)
        {
            let (src, dst) = (
                socket_of(e.src_addr, e.src_port, family),
                socket_of(e.dst_addr, e.dst_port, family),
            );
            return Ok(json!({
                "service": svc.name, "backend": b.id, "address": b.address, "source": "nat-table",
                "translated": {"source": src, "destination": dst},
            }));
        }
        if let Ok(state) = self.dp.conntrack.get(&key, 0) {
            let live = self
                .dp
                .backends
                .get(&state.backend, 0)
                .is_ok_and(|b| b.serves(state.generation));
            if let (true, Some(b)) = (live, by_slot(state.backend)) {
                return Ok(
                    json!({"service": svc.name, "backend": b.id, "address": b.address, "source": "connection-table"}),
                );
            }
        }
        let slot_info = self
            .rec
            .assignments
            .services
            .get(&svc.name)
            .and_then(|s| s.active);
        let Some(region) = slot_info else {
            return Err(Error::NotFound(format!(
                "service {} has no usable backend: the packet would be dropped",
                svc.name
            )));
        };
        let hash = if svc.hash == crate::config::HashMode::Source {
            lb_common::hash::source_hash(&key)
        } else {
            lb_common::hash::flow_hash(&key)
        };
        let index = hash % region.size;
        let slot = self
            .dp
            .pool
            .read(region.offset + index, 1)
            .and_then(|s| s.first().copied())
            .ok_or_else(|| Error::dataplane("table region outside the pool"))?;
        let b = by_slot(slot)
            .ok_or_else(|| Error::dataplane(format!("table names unknown backend slot {slot}")))?;
        Ok(
            json!({"service": svc.name, "backend": b.id, "address": b.address, "source": "maglev", "table_index": index}),
        )
    }
}

/// Every distinct backend address, sorted.
/// bpf_fib_lookup answers only for interfaces that forward: without it IPIP traffic is passed
/// to the kernel (counted as pass_no_route). Says so, with the fix.
fn forwarding_warnings(interfaces: &[String], services: &[ServiceSpec]) -> Vec<String> {
    let mut out = Vec::new();
    for (family, v4) in [("ipv4", true), ("ipv6", false)] {
        let encap = services
            .iter()
            .any(|s| !s.forwarding.needs_l2() && s.vip.is_ipv4() == v4);
        if !encap {
            continue;
        }
        for iface in interfaces {
            let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
                out.push(format!(
                    "IPIP/GUE services need forwarding on {iface} for the FIB lookup; until then their \
                     packets are passed to the kernel (fix: sysctl -w net.{family}.conf.{iface}.forwarding=1)"
                ));
            }
        }
    }
    out
}

/// SNAT needs its source address on this host (backends' replies are sent to it), and a port
/// range the kernel does not also hand out from that address.
fn nat_warnings(cfg: &DaemonConfig, services: &[ServiceSpec]) -> Vec<String> {
    let mut out = Vec::new();
    let mut sources: Vec<IpAddr> = services
        .iter()
        .filter(|s| s.snat)
        .filter_map(|s| cfg.nat.source_for(s.vip))
        .collect();
    sources.sort();
    sources.dedup();
    for a in &sources {
        if std::net::UdpSocket::bind((*a, 0)).is_err() {
            out.push(format!(
                "daemon.nat source {a} is not an address of this host: backends' replies to it will not reach the balancer (fix: assign it on the backend-facing interface)"
            ));
        }
    }
    let local = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let range = local.as_deref().and_then(|t| {
        let mut it = t.split_whitespace().map(|x| x.parse::<u16>().ok());
        Some((it.next()??, it.next()??))
    });
    if let (false, Some((lo, hi))) = (sources.is_empty(), range)
        && cfg.nat.ports.overlaps(lo, hi)
    {
        out.push(format!(
            "daemon.nat.ports {}-{} overlaps the kernel's ip_local_port_range {lo}-{hi}: a local connection from the SNAT address could take a port in use (fix: move one of them)",
            cfg.nat.ports.first, cfg.nat.ports.last
        ));
    }
    out
}

/// Every backend address, and whether it must be resolved at L2 (some DSR service uses it) or
/// only needs a route (encapsulation).
fn backend_addresses(services: &[ServiceSpec]) -> std::collections::BTreeMap<IpAddr, bool> {
    let mut addrs = std::collections::BTreeMap::new();
    for s in services {
        for b in &s.backends {
            *addrs.entry(b.address).or_insert(false) |= s.forwarding.needs_l2();
        }
    }
    addrs
}

/// A NAT entry's address words and network-order port as a socket address.
fn socket_of(words: [u32; 4], port_be: u16, family: u8) -> std::net::SocketAddr {
    std::net::SocketAddr::new(lb_common::ip_addr(family, words), u16::from_be(port_be))
}

fn unknown_service(name: &str) -> Error {
    Error::NotFound(format!("unknown service {name}"))
}

fn unknown_backend(service: &str, id: &str) -> Error {
    Error::NotFound(format!("service {service} has no backend {id}"))
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
