//! Answers to the read-only requests (status, list, stats, lookup, health), from the writer's
//! last snapshot and the readers' own map handles: a read never waits for a table build.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use lb_common::{Counter, FlowKey};
use serde_json::json;

use crate::{
    dataplane::{self, Readers},
    error::{Error, Result},
    model::BackendRef,
    nat::NatStatus,
    reconcile::apply::addr_bytes,
    snapshot::Snapshot,
    status::checks::Board,
};

/// One request's view: the snapshot taken when it arrived.
pub struct Queries<'a> {
    pub instance: &'a str,
    pub cfg: &'a crate::config::DaemonConfig,
    pub snap: Arc<Snapshot>,
    pub readers: &'a Readers,
    pub nat: &'a Mutex<NatStatus>,
    pub conntrack: &'a Mutex<crate::dataplane::census::ConntrackCensus>,
    pub board: &'a Board,
    pub bgp: &'a Mutex<crate::status::bgp::BgpStatus>,
}

impl Queries<'_> {
    /// Each attached interface: its mode, whether adopted, and the frames the program sent
    /// out that the driver dropped (its own counter; null where the driver has none).
    pub fn interfaces(&self) -> Vec<serde_json::Value> {
        self.snap
            .attachments
            .iter()
            .map(|a| {
                let tx_errors = crate::link::xdp_tx_errors(&a.interface).ok().flatten();
                json!({
                    "interface": a.interface,
                    "mode": a.mode,
                    "adopted": a.adopted,
                    "xdp_tx_errors": tx_errors,
                })
            })
            .collect()
    }

    pub fn status(&self) -> serde_json::Value {
        let interfaces = self.interfaces();
        let unhealthy = self
            .snap
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| BackendRef::new(&s.name, &b.id)))
            .filter(|b| {
                self.snap
                    .status
                    .get(b)
                    .is_some_and(|st| st.health == crate::status::HealthState::Down)
            })
            .count();
        let census = *self.conntrack.lock().unwrap_or_else(|p| p.into_inner());
        let counted = census.at.is_some();
        json!({
            "instance": self.instance,
            "pin_dir": dataplane::pin_dir(self.instance),
            "adopted": self.snap.adopted,
            "upgrade": self.snap.upgrade,
            "interfaces": interfaces,
            "services": self.snap.services.len(),
            "backends": self.snap.services.iter().map(|s| s.backends.len()).sum::<usize>(),
            "backends_unhealthy": unhealthy,
            "table_pool": {
                "capacity": self.snap.pool_capacity,
                "free": self.snap.pool_free,
                "second_chance": self.snap.assignments.second_chance_slots(),
            },
            // As of the census (every 10 s or more); null until its first count.
            "conntrack": {
                "entries": counted.then_some(census.entries),
                "size": self.cfg.conntrack_size,
                "embryonic_entries": counted.then_some(census.embryonic),
                "embryonic_size": self.cfg.embryonic_size,
                "age_s": census.at.map(|t| t.elapsed().as_secs_f64()),
            },
            "reconciler": self.snap.counters,
            "bgp": self.bgp(),
        })
    }

    /// `lb node status`: the announcer's state and the packets the VIPs received (their total,
    /// so a caller sees whether traffic still arrives after a drain).
    pub fn node(&self) -> Result<serde_json::Value> {
        let ids = self.snap.assignments.services.values().map(|s| s.id);
        let mut packets = 0u64;
        for id in ids {
            packets += self.readers.service_traffic(id)?.packets;
        }
        Ok(json!({
            "bgp": self.bgp(),
            "vip_packets": packets,
        }))
    }

    /// The announcer's state (`null` without `[daemon.bgp]`), and the drain flag.
    pub fn bgp(&self) -> serde_json::Value {
        let bgp = self.bgp.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if bgp.enabled {
            json!(bgp)
        } else {
            json!({ "enabled": false, "draining": bgp.draining })
        }
    }

    /// The backend a flow from `src` to `dst` gets in service `name` (`get_instance`). Without
    /// `src`, a fresh flow from a random client; without `dst`, the service's VIP and port.
    pub fn pick(
        &self,
        name: &str,
        src: Option<std::net::SocketAddr>,
        dst: Option<std::net::SocketAddr>,
    ) -> Result<serde_json::Value> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let svc = self
            .snap
            .services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::NotFound(format!("unknown service {name}")))?;
        let dst = dst.unwrap_or(SocketAddr::new(svc.vip, svc.port));
        if dst.ip() != svc.vip || (svc.port != 0 && dst.port() != svc.port) {
            return Err(Error::invalid(format!(
                "dst {dst} is not service {name}'s VIP and port ({}:{})",
                svc.vip, svc.port
            )));
        }
        let src = src.unwrap_or_else(|| {
            // A client from the documentation ranges: it only feeds the hash.
            let ip = if svc.vip.is_ipv4() {
                IpAddr::V4(Ipv4Addr::new(198, 18, fastrand::u8(..), fastrand::u8(1..)))
            } else {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    fastrand::u16(..),
                    fastrand::u16(1..),
                ))
            };
            SocketAddr::new(ip, fastrand::u16(1024..))
        });
        self.lookup(svc.protocol, src, dst)
    }

    /// The geo data in use, and per geo service and region the serving region and backends.
    pub fn geo(&self) -> serde_json::Value {
        let services: Vec<_> = self
            .snap
            .services
            .iter()
            .filter(|s| s.strategy == crate::model::Strategy::Geo)
            .map(|s| {
                let slot = self.snap.assignments.services.get(&s.name);
                let regions: Vec<_> = self
                    .cfg
                    .geo
                    .as_ref()
                    .map(|g| g.regions())
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let g = slot.and_then(|x| x.geo.get(&(i as u32)));
                        // A region without a table of its own shares the service's.
                        let own = g.and_then(|g| g.built.as_ref());
                        let built = own.or(slot.and_then(|x| x.built.as_ref()));
                        json!({
                            "region": r,
                            "serving": g.and_then(|g| g.serving.clone()),
                            "backends": built.map(|b| b.members.iter().map(|m| m.0.clone()).collect::<Vec<_>>()),
                            "own_table": own.is_some(),
                        })
                    })
                    .collect();
                json!({"service": s.name, "regions": regions})
            })
            .collect();
        json!({
            "default_region": self.cfg.geo.as_ref().map(|g| g.default_region.clone()),
            "data": self.snap.geo,
            "services": services,
        })
    }

    /// Each backend's health: state, score and its inputs, the last check, since when.
    pub fn health(&self, service: Option<&str>) -> Result<serde_json::Value> {
        if let Some(name) = service
            && !self.snap.services.iter().any(|s| s.name == name)
        {
            return Err(Error::NotFound(format!("unknown service {name}")));
        }
        let board = self.board.read().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let default = crate::status::BackendStatus::default();
        let mut out = Vec::new();
        for s in self
            .snap
            .services
            .iter()
            .filter(|s| service.is_none_or(|n| n == s.name))
        {
            let weights = self.snap.weights.get(&s.name);
            let mut backends = Vec::new();
            for b in &s.backends {
                let key = BackendRef::new(&s.name, &b.id);
                let st = self.snap.status.get(&key).unwrap_or(&default);
                let e = weights
                    .and_then(|w| w.backends.get(&b.id))
                    .copied()
                    .unwrap_or_default();
                let agent = board.agents.get(&key).map(|v| json!(v));
                let check = board.checks.get(&key).map(|v| {
                    json!({
                        "kind": v.kind, "target": v.target, "checks": v.checks, "failed": v.failed,
                        "consecutive_ok": v.consecutive_ok, "consecutive_failed": v.consecutive_failed,
                        "last": v.last.as_ref().map(|o| json!({"ok": o.ok, "latency_ms": o.latency.as_secs_f64() * 1000.0, "detail": o.detail})),
                        "since_ms": v.since_ms, "transitions": v.transitions, "reason": v.reason, "breaker": v.breaker, "passive_failures": v.passive_failures,
                    })
                });
                let external = st.external.map(|x| {
                    json!({"score": x.score, "ttl_left_s": x.expires.map(|t| t.saturating_duration_since(now).as_secs_f64())})
                });
                let l = &st.load;
                let load = (!l.settled()).then(|| json!({
                    "report": l.report.map(|(r, _)| r),
                    "report_ttl_left_s": l.report.map(|(_, t)| t.saturating_duration_since(now).as_secs_f64()),
                    "smoothed": l.smoothed, "target_factor": l.target, "factor": l.factor,
                }));
                backends.push(json!({
                    "id": b.id,
                    "state": st.state_name(),
                    "source": source(s, Some(st)),
                    "registration": registration(st, now),
                    "departure": departure(s, st, now),
                    "drain": drain(s, st, now),
                    "load": load,
                    "resolved": self.snap.hops.contains_key(&b.address),
                    "health_score": st.score,
                    "external": external,
                    "slow_start_factor": st.ramp(now),
                    "weight": b.weight,
                    "effective_weight": e.weight,
                    // As the tables have it (the check's own view may be a pass ahead).
                    "breaker": st.breaker,
                    "serves_pinned_flows": e.active,
                    "check": check,
                    "agent": agent,
                }));
            }
            out.push(json!({
                "service": s.name,
                "panic": weights.is_some_and(|w| w.panic),
                "backends": backends,
            }));
        }
        Ok(json!(out))
    }

    /// Entries each backend slot owns in a service's active region: Maglev table slots, round
    /// robin turns per period, or 1 per member of a counting strategy.
    pub fn slot_counts(&self, name: &str) -> HashMap<u32, u32> {
        let mut counts = HashMap::new();
        let service = self.snap.services.iter().find(|s| s.name == name);
        let stride = service.map_or(1, |s| s.strategy.stride());
        let active = self.snap.assignments.services.get(name).and_then(|s| s.active);
        if let Some(table) = active.and_then(|r| self.readers.pool.read(r.offset, r.size)) {
            for slot in table.into_iter().step_by(stride) {
                *counts.entry(u32::from(slot)).or_insert(0) += 1;
            }
        }
        counts
    }

    pub fn list(&self) -> serde_json::Value {
        let services: Vec<_> = self
            .snap
            .services
            .iter()
            .map(|s| {
                let counts = self.slot_counts(&s.name);
                let backends: Vec<_> = s
                    .backends
                    .iter()
                    .map(|b| {
                        let slot = self
                            .snap
                            .assignments
                            .slot(&s.name, &b.id)
                            .map(|x| x.slot);
                        let hop = self.snap.hops.get(&b.address);
                        let effective = self.snap.weights.get(&s.name).and_then(|w| w.backends.get(&b.id));
                        let now = std::time::Instant::now();
                        let st = self.snap.status.get(&BackendRef::new(&s.name, &b.id));
                        let health = st.map_or("up", crate::status::BackendStatus::state_name);
                        json!({
                            "id": b.id, "address": b.address, "port": b.port(s), "weight": b.weight,
                            "effective_weight": effective.map_or(0, |e| e.weight), "health": health,
                            "source": source(s, st),
                            "registration": st.map(|st| registration(st, now)),
                            "departure": st.map(|st| departure(s, st, now)),
                            "drain": st.map(|st| drain(s, st, now)),
                            "region": b.region, "zone": b.zone, "labels": b.labels,
                            "resolved": hop.is_some(),
                            "mac": hop.map(|h| mac_string(&h.dst_mac)),
                            "interface": hop.map(|h| h.ifname.clone()),
                            "table_slots": slot.and_then(|x| counts.get(&x)).copied().unwrap_or(0),
                            "active_flows": slot.map(|x| self.readers.active.get(x)),
                            "maxconn": effective.map_or(0, |e| e.maxconn),
                        })
                    })
                    .collect();
                json!({
                    "name": s.name, "vip": s.vip, "port": s.port, "protocol": s.protocol,
                    "table_size": s.table_size, "hash": s.hash, "strategy": s.strategy, "forwarding": s.forwarding, "fragments": s.fragments, "snat": s.snat,
                    "panic": self.snap.weights.get(&s.name).is_some_and(|w| w.panic),
                    "in_effect": self.snap.in_effect(s),
                    "adaptive": self.snap.adaptive.get(&s.name).map(|a| json!({
                        "current": a.current, "reason": a.reason, "switches": a.switches,
                        "for_s": a.since.elapsed().as_secs_f64(),
                    })),
                    "discovery": self.discovery(s),
                    "backends": backends,
                })
            })
            .collect();
        json!(services)
    }

    /// A service's source: what it last read, what it skipped, what it holds; `null` for a
    /// service without one.
    fn discovery(&self, s: &crate::model::Service) -> serde_json::Value {
        let Some(d) = &s.discovery else {
            return serde_json::Value::Null;
        };
        let now = std::time::Instant::now();
        let live = crate::status::discovery::live(s, &self.snap.status);
        let state = self.snap.discovery.get(&s.name);
        json!({
            "kind": d.kind,
            "settings": d,
            "backends": live,
            "updates": state.map_or(0, |x| x.updates),
            "updated_s_ago": state.and_then(|x| x.updated_at).map(|t| now.saturating_duration_since(t).as_secs_f64()),
            "error": state.and_then(|x| x.error.as_ref()).map(|e| json!({"reason": e.reason, "message": e.message})),
            "skipped": state.map(|x| x.skipped.clone()).unwrap_or_default(),
            "held": state.and_then(|x| x.held.as_ref()).map(|h| json!({
                "wanted": h.set.len(), "live": h.live,
                "for_s": now.saturating_duration_since(h.since).as_secs_f64(),
                "applies_in_s": h.until.saturating_duration_since(now).as_secs_f64(),
            })),
        })
    }

    pub fn stats(&self) -> Result<serde_json::Value> {
        let mut services = Vec::new();
        for s in self.snap.services.iter() {
            let Some(slot) = self.snap.assignments.services.get(&s.name) else {
                continue;
            };
            let t = self.readers.service_traffic(slot.id)?;
            let mut backends = Vec::new();
            for b in &s.backends {
                if let Some(bs) = self.snap.assignments.slot(&s.name, &b.id) {
                    let bt = self.readers.backend_traffic(bs.slot)?;
                    backends.push(json!({"id": b.id, "packets": bt.packets, "bytes": bt.bytes, "new_flows": bt.new_flows, "syn_retransmits": bt.syn_retransmits, "refused": bt.refused}));
                }
            }
            services.push(json!({"name": s.name, "packets": t.packets, "bytes": t.bytes, "new_flows": t.new_flows, "backends": backends}));
        }
        let mut counters = serde_json::Map::new();
        for &c in Counter::ALL {
            counters.insert(c.name().into(), json!(self.readers.counter(c)?));
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

    pub fn lookup(
        &self,
        protocol: crate::model::Protocol,
        src: std::net::SocketAddr,
        dst: std::net::SocketAddr,
    ) -> Result<serde_json::Value> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(Error::invalid(
                "source and destination are of different IP families",
            ));
        }
        let svc = self
            .snap
            .services
            .iter()
            .find(|s| s.vip == dst.ip() && s.port == dst.port() && s.protocol == protocol)
            .or_else(|| {
                self.snap
                    .services
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
                self.snap
                    .assignments
                    .slot(&svc.name, &b.id)
                    .is_some_and(|x| x.slot == slot)
            })
        };
        if svc.forwarding == crate::model::Forwarding::Nat
            && let Ok(e) = self.readers.nat.get(&key, 0)
            && let Some(b) = by_slot(e.backend)
        {
            let (src, dst) = (
                socket_of(e.src_addr, e.src_port, family),
                socket_of(e.dst_addr, e.dst_port, family),
            );
            return Ok(json!({
                "service": svc.name, "backend": b.id, "address": b.address, "port": b.port(svc), "source": "nat-table",
                "translated": {"source": src, "destination": dst},
            }));
        }
        // As the data plane reads them: the connection table, then the flows of one packet.
        let known = [
            (&self.readers.conntrack, "connection-table"),
            (&self.readers.embryonic, "embryonic-table"),
        ];
        for (table, source) in known {
            let Ok(state) = table.get(&key, 0) else {
                continue;
            };
            let live = self
                .readers
                .backends
                .get(&state.backend, 0)
                .is_ok_and(|b| b.serves(state.generation));
            if let (true, Some(b)) = (live, by_slot(state.backend)) {
                return Ok(
                    json!({"service": svc.name, "backend": b.id, "address": b.address, "port": b.port(svc), "source": source}),
                );
            }
            break;
        }
        let slot = self.snap.assignments.services.get(&svc.name);
        let mut slot_info = slot.and_then(|s| s.active);
        // A geo service: the client's region's table, as the data plane picks it.
        let mut geo_region = None;
        if svc.strategy == crate::model::Strategy::Geo
            && let Some(id) = slot.map(|s| s.id)
            && let Some((region, value)) = self.readers.geo_value(id, src.ip())
        {
            geo_region = self
                .cfg
                .geo
                .as_ref()
                .and_then(|g| g.regions().get(region as usize).map(|r| r.to_string()));
            slot_info = (value.table_size > 0).then_some(crate::snapshot::Region {
                offset: value.table_offset,
                size: value.table_size,
            });
        }
        let Some(region) = slot_info else {
            return Err(Error::NotFound(format!(
                "service {} has no usable backend: the packet would be dropped",
                svc.name
            )));
        };
        let hash = if svc.hash == crate::model::HashMode::Source {
            lb_common::hash::source_hash(&key)
        } else {
            lb_common::hash::flow_hash(&key)
        };
        let region_words = self
            .readers
            .pool
            .read(region.offset, region.size)
            .ok_or_else(|| Error::dataplane("table region outside the pool"))?;
        // What the service's region holds: an adaptive service's pick, Maglev for
        // resource-aware and geo.
        let strategy = self
            .snap
            .weights
            .get(&svc.name)
            .map_or(svc.strategy.table(), |w| w.strategy);
        let (index, source) = if strategy.counts() {
            // As the data plane does it, on the counts as they are now.
            let members: Vec<(u32, u32, u32)> = region_words
                .as_chunks::<{ lb_common::strategy::MEMBER_STRIDE as usize }>()
                .0
                .iter()
                .map(lb_common::strategy::member_of)
                .collect();
            let active = |slot: u32| self.readers.active.get(slot).max(0) as u64;
            let i = least_loaded(&members, hash, strategy.id(), active).ok_or_else(|| {
                Error::NotFound(format!(
                    "service {}: every candidate is at its maxconn: the packet would be dropped",
                    svc.name
                ))
            })?;
            (i * lb_common::strategy::MEMBER_STRIDE, strategy.name())
        } else if lb_common::strategy::cursor(strategy.id()) {
            // The receiving CPU's cursor decides; its position is the data plane's own.
            (hash % region.size, "schedule-entry-by-hash")
        } else {
            (hash % region.size, "maglev")
        };
        let slot = u32::from(region_words[index as usize]);
        let b = by_slot(slot)
            .ok_or_else(|| Error::dataplane(format!("table names unknown backend slot {slot}")))?;
        let mut answer = json!({"service": svc.name, "backend": b.id, "address": b.address, "port": b.port(svc), "source": source, "strategy": strategy.name(), "table_index": index});
        if svc.strategy == crate::model::Strategy::Geo {
            answer["region"] = json!(geo_region);
        }
        Ok(answer)
    }
}

/// The member a counting strategy gives a new flow, as the data plane picks it (select.rs):
/// every member up to LC_SCAN from the hash's start, or two hashed ones (power of two choices);
/// members at their cap skipped. `members`: (slot, weight, cap).
pub fn least_loaded(
    members: &[(u32, u32, u32)],
    hash: u32,
    strategy: u32,
    active: impl Fn(u32) -> u64,
) -> Option<u32> {
    use lb_common::strategy::{less_loaded, scan_member, scan_plan, under_cap};
    let n = members.len() as u32;
    if n == 0 {
        return None;
    }
    let (first, step, loops) = scan_plan(hash, n, strategy);
    let mut best: Option<(u32, u64, u32)> = None;
    for i in 0..loops {
        let m = scan_member(first, step, i, n);
        let (slot, weight, cap) = members[m as usize];
        let a = active(slot);
        if under_cap(a, cap) && best.is_none_or(|(_, ba, bw)| less_loaded(a, weight, ba, bw)) {
            best = Some((m, a, weight));
        }
    }
    best.map(|b| b.0)
}

/// A NAT entry's address words and network-order port as a socket address.
fn socket_of(words: [u32; 4], port_be: u16, family: u8) -> std::net::SocketAddr {
    std::net::SocketAddr::new(lb_common::ip_addr(family, words), u16::from_be(port_be))
}

/// Where a backend comes from: its service's source (`file`, `dns`, `etcd`), a registration
/// with a TTL (`registration`), or the config file and the API (`static`).
fn source(s: &crate::model::Service, st: Option<&crate::status::BackendStatus>) -> &'static str {
    match (&s.discovery, st.and_then(|st| st.lease)) {
        (Some(d), _) => d.kind.name(),
        (None, Some(_)) => "registration",
        (None, None) => "static",
    }
}

/// The name of a service's discovery source, for the lines that say a backend left it.
fn source_kind(s: &crate::model::Service) -> &'static str {
    s.discovery.as_ref().map_or("discovery", |d| d.kind.name())
}

/// A backend gone from its source, drained until its removal: why, and when it goes; `null`
/// for any other.
fn departure(
    s: &crate::model::Service,
    st: &crate::status::BackendStatus,
    now: std::time::Instant,
) -> serde_json::Value {
    st.departing.map_or(serde_json::Value::Null, |at| {
        json!({
            "removed_in_s": at.saturating_duration_since(now).as_secs_f64(),
            "reason": st.departure(source_kind(s), now),
        })
    })
}

/// Why a backend takes no new flows though its health may be fine: `reason` (`operator`,
/// `heartbeat`, `source`) and a line that says it; `null` when it is not drained.
fn drain(
    s: &crate::model::Service,
    st: &crate::status::BackendStatus,
    now: std::time::Instant,
) -> serde_json::Value {
    st.drain().map_or(serde_json::Value::Null, |reason| {
        json!({
            "reason": reason,
            "detail": st.drain_detail(source_kind(s), now),
            "since_s": st.held.filter(|_| reason == crate::status::Drain::Operator)
                .map(|at| now.saturating_duration_since(at).as_secs_f64()),
        })
    })
}

/// A registration with a TTL: its terms, when the heartbeat is due (negative: late by), and
/// why it takes no new flows; `null` for a backend registered without one.
fn registration(st: &crate::status::BackendStatus, now: std::time::Instant) -> serde_json::Value {
    st.lease.map_or(serde_json::Value::Null, |l| {
        json!({
            "ttl_s": l.terms.ttl.as_secs_f64(),
            "deregister_after_s": l.terms.deregister_after.as_secs_f64(),
            "heartbeat_due_in_s": l.left_s(now),
            "drained": l.drained,
            "reason": l.reason(now),
        })
    })
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
