//! Loading, attaching and pinning; adopting what an earlier daemon pinned.
//!
//! Layout under `/sys/fs/bpf/<instance>/`: one file per map (pinned by name), `prog_lb`, and
//! `link_<interface>` for each attachment. While the pins exist, forwarding goes on without a
//! daemon; a restarted daemon opens them instead of loading again, so no flow is lost.
//! A daemon of another build (its eBPF object differs from the one the pins record) upgrades
//! them first: its program is loaded against the pinned maps it shares, the maps whose layout
//! changed are migrated, and every pinned XDP link is moved to the new program in place
//! (`bpf_link_update`), so no packet finds the interface without a program (see `layout`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Map, MapData},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use aya_obj::programs::XdpAttachType;
use lb_common::maps;
use log::{info, warn};

use super::{
    AttachMode, Attachment, DataPlane, Pool, Settings,
    layout::{self, Action, Found, Plan, Upgrade},
};
use crate::error::{Error, Result};

pub const BPFFS: &str = "/sys/fs/bpf";

pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPFFS).join(instance)
}

fn prog_pin(dir: &Path) -> PathBuf {
    dir.join("prog_lb")
}

fn link_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("link_{iface}"))
}

/// Opens the instance's data plane: adopts pinned state when present, else loads and attaches.
pub fn open(cfg: &Settings) -> Result<DataPlane> {
    for iface in &cfg.interfaces {
        super::ifindex(iface)?;
    }
    let dir = pin_dir(&cfg.instance);
    let adopting = prog_pin(&dir).exists();
    let upgrade = if adopting { upgrade(cfg, &dir)? } else { None };
    let result = open_inner(cfg, &dir, adopting).and_then(|dp| {
        if !adopting {
            layout::write_record(&dir, crate::object_id())?;
        }
        Ok(dp)
    });
    if result.is_err() && !adopting {
        // A failed first start leaves nothing pinned behind.
        let _ = detach_instance(&cfg.instance);
    }
    result.map(|dp| DataPlane { upgrade, ..dp })
}

/// Pins of another build: plans what to reuse, migrate or create and does it, or refuses in one
/// line having changed nothing (the pinned program keeps forwarding). `None` when the pins are
/// this build's own: they are adopted as they are.
fn upgrade(cfg: &Settings, dir: &Path) -> Result<Option<Upgrade>> {
    let this = crate::object_id();
    let record = layout::read_record(dir)?;
    if record.as_ref().is_some_and(|r| r.build == this) {
        return Ok(None);
    }
    let wanted = layout::wanted(crate::EBPF_OBJECT)?;
    let mut found = Vec::with_capacity(wanted.len());
    let mut ids = Vec::with_capacity(wanted.len());
    for w in &wanted {
        let path = dir.join(w.name);
        if !path.exists() {
            found.push((w.name, None));
            continue;
        }
        let data = MapData::from_pin(&path)
            .map_err(|e| Error::dataplane(format!("open pinned map {}: {e}", path.display())))?;
        let version = record.as_ref().map_or(1, |r| {
            r.versions
                .iter()
                .find(|(n, _)| n == w.name)
                .map_or(1, |(_, v)| *v)
        });
        found.push((
            w.name,
            Some(Found {
                version,
                shape: layout::shape(&data)?,
            }),
        ));
        ids.push((w.name, map_id(&data)?));
    }
    let plan = layout::plan(&wanted, &found, record.map(|r| r.build), this).map_err(|why| {
        Error::dataplane(format!(
            "cannot upgrade the pinned data plane in {}: {why}; nothing was changed and the pinned \
             program keeps forwarding (`lb detach` removes the pins, dropping their flows)",
            dir.display()
        ))
    })?;
    if plan.adopt_only() {
        return Ok(None);
    }
    let next = |name: &str| dir.join(format!("{name}_next"));
    let changed: Vec<(&'static str, Action)> = plan
        .maps
        .iter()
        .copied()
        .filter(|(_, a)| *a != Action::Reuse)
        .collect();
    // What an upgrade that died before its commit left behind.
    for (name, _) in &changed {
        let _ = fs::remove_file(next(name));
    }
    let _ = fs::remove_file(next(maps::PROG_LB));
    let result = replace(cfg, dir, &plan, &changed, &ids, &next);
    if result.is_err() {
        for (name, _) in &changed {
            let _ = fs::remove_file(next(name));
        }
        let _ = fs::remove_file(next(maps::PROG_LB));
    }
    let upgrade = result?;
    info!(
        "upgraded the pinned data plane in {}: {}",
        dir.display(),
        upgrade.summary()
    );
    Ok(Some(upgrade))
}

/// Loads this build's program with the reused maps and new ones (pinned as `NAME_next`), copies
/// the migrated maps' entries, moves every pinned link to the program, then commits: the new
/// pins take the old names, the record is rewritten, and what the old program wrote between the
/// copy and the move is copied too (entries the new program has written are kept).
fn replace(
    cfg: &Settings,
    dir: &Path,
    plan: &Plan,
    changed: &[(&'static str, Action)],
    ids: &[(&str, u32)],
    next: &dyn Fn(&str) -> PathBuf,
) -> Result<Upgrade> {
    let mut loader = loader(cfg, dir);
    for (name, _) in changed {
        loader.map_pin_path(name, next(name));
    }
    let mut ebpf = loader
        .load(crate::EBPF_OBJECT)
        .map_err(|e| Error::dataplane(format!("load eBPF object: {e}")))?;
    let prog = load_lb(&mut ebpf)?;
    let new_id = prog.info().map_err(Error::dataplane)?.id();
    let old = Xdp::from_pin(prog_pin(dir), XdpAttachType::Interface)
        .map_err(|e| Error::dataplane(format!("open pinned program: {e}")))?;
    let old_id = old.info().map_err(Error::dataplane)?.id();
    let id_of = |name: &str| ids.iter().find(|(n, _)| *n == name).map(|(_, id)| *id);
    let mut copies = Vec::new();
    for &(name, action) in changed {
        if let Action::Migrate { from, to } = action {
            let old_map = id_of(name).ok_or_else(|| Error::dataplane(format!("map {name} not pinned")))?;
            let new_map = map_id(&MapData::from_pin(next(name)).map_err(Error::dataplane)?)?;
            let entries = layout::copy_flows(old_map, new_map, from, to, false)?;
            copies.push((name, from, to, old_map, new_map, entries));
        }
    }
    move_links(dir, prog)?;
    // Committed: the links run the new program. A failure from here on leaves it running.
    for (name, _) in changed {
        layout::replace_pin(&next(name), &dir.join(name))?;
    }
    prog.pin(next(maps::PROG_LB))
        .map_err(|e| Error::dataplane(format!("pin program: {e}")))?;
    layout::replace_pin(&next(maps::PROG_LB), &prog_pin(dir))?;
    layout::write_record(dir, crate::object_id())?;
    let mut migrated = Vec::new();
    for (name, from, to, old_map, new_map, entries) in copies {
        let late = layout::copy_flows(old_map, new_map, from, to, true)?;
        migrated.push(layout::Migrated {
            map: name.to_string(),
            from,
            to,
            entries: entries + late,
        });
    }
    drop(old);
    let named = |want: fn(&Action) -> bool| -> Vec<String> {
        plan.maps
            .iter()
            .filter(|(_, a)| want(a))
            .map(|(n, _)| n.to_string())
            .collect()
    };
    Ok(Upgrade {
        reused: named(|a| *a == Action::Reuse),
        migrated,
        created: named(|a| *a == Action::Create),
        program: Some((old_id, new_id)),
    })
}

/// Moves every pinned XDP link of the instance to `prog` (`bpf_link_update`: the interface is
/// never without a program). If one cannot be moved, those moved already go back to the pinned
/// program.
fn move_links(dir: &Path, prog: &mut Xdp) -> Result<()> {
    let mut links: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("link_"))
        })
        .collect();
    links.sort();
    let open = |path: &Path| -> Result<XdpLink> {
        let link = PinnedLink::from_pin(path)
            .map_err(|e| Error::dataplane(format!("open pinned link {}: {e}", path.display())))?;
        XdpLink::try_from(FdLink::from(link))
            .map_err(|e| Error::dataplane(format!("{}: not an XDP link: {e}", path.display())))
    };
    let swap = |prog: &mut Xdp, path: &Path| -> Result<()> {
        let id = prog
            .attach_to_link(open(path)?)
            .map_err(|e| Error::dataplane(format!("update link {}: {e}", path.display())))?;
        // The pin keeps the link; this handle only closes.
        drop(prog.take_link(id));
        Ok(())
    };
    for (i, path) in links.iter().enumerate() {
        if let Err(e) = swap(prog, path) {
            let mut old = Xdp::from_pin(prog_pin(dir), XdpAttachType::Interface)
                .map_err(|e| Error::dataplane(format!("open pinned program: {e}")))?;
            for back in &links[..i] {
                if let Err(e) = swap(&mut old, back) {
                    warn!("{}: could not go back to the pinned program: {e}", back.display());
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// The object's balancer program, through the verifier.
fn load_lb(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(maps::PROG_LB)
        .ok_or_else(|| Error::dataplane("program lb missing from the eBPF object"))?
        .try_into()
        .map_err(Error::dataplane)?;
    prog.load()
        .map_err(|e| Error::dataplane(format!("verifier rejected lb: {e}")))?;
    Ok(prog)
}

fn map_id(data: &MapData) -> Result<u32> {
    Ok(data
        .info()
        .map_err(|e| Error::dataplane(format!("map info: {e}")))?
        .id())
}

fn open_inner(cfg: &Settings, dir: &Path, adopting: bool) -> Result<DataPlane> {
    let dir = dir.to_path_buf();
    let mut maps_by_name = if adopting {
        info!("adopting pinned data plane in {}", dir.display());
        open_pinned_maps(&dir)?
    } else {
        None.into_iter().collect()
    };
    let mut attachments = Vec::new();
    let mut program: Option<Xdp> = None;
    if !adopting {
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut ebpf = load_object(cfg, &dir)?;
        for name in maps::PINNED {
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| Error::dataplane(format!("map {name} missing from the eBPF object")))?;
            maps_by_name.push((name, map));
        }
        let prog = load_lb(&mut ebpf)?;
        prog.pin(prog_pin(&dir))
            .map_err(|e| Error::dataplane(format!("pin program: {e}")))?;
        program = Some(
            Xdp::from_pin(prog_pin(&dir), XdpAttachType::Interface)
                .map_err(|e| Error::dataplane(format!("reopen pinned program: {e}")))?,
        );
    }
    for iface in &cfg.interfaces {
        let pin = link_pin(&dir, iface);
        if pin.exists() {
            attachments.push(Attachment {
                interface: iface.clone(),
                mode: "pinned",
                adopted: true,
            });
            continue;
        }
        if program.is_none() {
            program = Some(
                Xdp::from_pin(prog_pin(&dir), XdpAttachType::Interface)
                    .map_err(|e| Error::dataplane(format!("open pinned program: {e}")))?,
            );
        }
        let prog = program.as_mut().expect("set above");
        let mode = attach(prog, iface, cfg.attach, &pin)?;
        attachments.push(Attachment {
            interface: iface.clone(),
            mode,
            adopted: false,
        });
    }

    // The program's id, for reading its log records (aya-log) whether it was loaded or adopted.
    let program_id = match &program {
        Some(p) => p.info().ok().map(|i| i.id()),
        None => Xdp::from_pin(prog_pin(&dir), XdpAttachType::Interface)
            .ok()
            .and_then(|p| p.info().ok())
            .map(|i| i.id()),
    };
    let mut take = |name: &str| -> Result<Map> {
        let idx = maps_by_name
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or_else(|| Error::dataplane(format!("map {name} not found")))?;
        Ok(maps_by_name.swap_remove(idx).1)
    };
    let pool = pool_of(take(maps::MAGLEV_POOL)?)?;
    Ok(DataPlane {
        services: take(maps::SERVICES)?.try_into().map_err(typed)?,
        fragment_services: take(maps::FRAGMENT_SERVICES)?.try_into().map_err(typed)?,
        vip_filter: take(maps::VIP_FILTER)?.try_into().map_err(typed)?,
        vip_addrs: take(maps::VIP_ADDRS)?.try_into().map_err(typed)?,
        dp_config: take(maps::DP_CONFIG)?.try_into().map_err(typed)?,
        backends: take(maps::BACKENDS)?.try_into().map_err(typed)?,
        conntrack: take(maps::CONNTRACK)?.try_into().map_err(typed)?,
        embryonic: take(maps::EMBRYONIC)?.try_into().map_err(typed)?,
        nat: take(maps::NAT_FLOWS)?.try_into().map_err(typed)?,
        tx_ports: take(maps::TX_PORTS)?.try_into().map_err(typed)?,
        service_stats: take(maps::SERVICE_STATS)?.try_into().map_err(typed)?,
        backend_stats: take(maps::BACKEND_STATS)?.try_into().map_err(typed)?,
        global_stats: take(maps::GLOBAL_STATS)?.try_into().map_err(typed)?,
        shed: take(maps::SHED)?.try_into().map_err(typed)?,
        active: take(maps::ACTIVE)?.try_into().map_err(typed)?,
        geo: [
            take(maps::GEO_A)?.try_into().map_err(typed)?,
            take(maps::GEO_B)?.try_into().map_err(typed)?,
        ],
        geo_services: take(maps::GEO_SERVICES)?.try_into().map_err(typed)?,
        pool,
        attachments,
        adopted: adopting,
        program_id,
        upgrade: None,
        mirror: Default::default(),
    })
}

fn open_pinned_maps(dir: &Path) -> Result<Vec<(&'static str, Map)>> {
    // A map this build has and the pins lack: they were made by an older build, whose program
    // cannot use it. Said as such, with the way out, rather than as a missing file.
    if let Some(name) = maps::PINNED.iter().find(|&&name| !dir.join(name).exists()) {
        return Err(Error::dataplane(format!(
            "the pinned data plane in {} predates this build (it has no map {name}); `lb detach` \
             removes it (its flows are dropped), then start again",
            dir.display()
        )));
    }
    maps::PINNED
        .iter()
        .map(|&name| Ok((name, open_pinned(&dir.join(name))?)))
        .collect()
}

/// A pinned map, its own handle (the daemon's, the readers', the NAT collector's, the census').
pub fn open_pinned(path: &Path) -> Result<Map> {
    let data = MapData::from_pin(path)
        .map_err(|e| Error::dataplane(format!("open pinned map {}: {e}", path.display())))?;
    Map::from_map_data(data).map_err(Error::dataplane)
}

/// A map of the expected kind, or one line saying it is not.
pub fn typed(e: aya::maps::MapError) -> Error {
    Error::dataplane(format!("map type mismatch: {e}"))
}

/// The mmap-ed table pool of a MAGLEV_POOL map.
pub fn pool_of(map: Map) -> Result<Pool> {
    match map {
        Map::Array(data) => Pool::new(data),
        _ => Err(Error::dataplane("MAGLEV_POOL is not an array")),
    }
}

/// Attaches in the configured mode (auto: native, then generic with a warning) and pins the link.
fn attach(prog: &mut Xdp, iface: &str, setting: AttachMode, pin: &Path) -> Result<&'static str> {
    let tries: &[(XdpMode, &'static str)] = match setting {
        AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        AttachMode::Native => &[(XdpMode::Driver, "native")],
        AttachMode::Generic => &[(XdpMode::Skb, "generic")],
    };
    let mut last_error = String::new();
    for &(mode, name) in tries {
        match prog.attach(iface, mode) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(Error::dataplane)?;
                let link = FdLink::try_from(link)
                    .map_err(|e| Error::dataplane(format!("{iface}: XDP link cannot be pinned: {e}")))?;
                link.pin(pin)
                    .map_err(|e| Error::dataplane(format!("pin link {}: {e}", pin.display())))?;
                if !last_error.is_empty() {
                    warn!("{iface}: attached in {name} mode because native mode failed: {last_error}");
                } else {
                    info!("{iface}: attached in {name} mode");
                }
                return Ok(name);
            }
            Err(aya::programs::ProgramError::UnknownInterface { name }) => {
                return Err(Error::invalid(format!("unknown interface {name}")));
            }
            Err(e) => last_error = error_chain(&e),
        }
    }
    Err(Error::dataplane(format!(
        "cannot attach XDP to {iface}: {last_error}"
    )))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Loads the eBPF object with the instance's pinned maps: the ones pinned already are shared,
/// the others are created and pinned.
pub fn load_object(cfg: &Settings, dir: &Path) -> Result<aya::Ebpf> {
    loader(cfg, dir)
        .load(crate::EBPF_OBJECT)
        .map_err(|e| Error::dataplane(format!("load eBPF object: {e}")))
}

/// The loader with the instance's pin directory and table sizes.
fn loader<'a>(cfg: &Settings, dir: &Path) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(dir)
        .map_max_entries(maps::CONNTRACK, cfg.conntrack_size)
        .map_max_entries(maps::EMBRYONIC, cfg.embryonic_size)
        .map_max_entries(maps::NAT_FLOWS, cfg.nat_table_size)
        .map_max_entries(
            maps::MAGLEV_POOL,
            cfg.table_pool_slots.div_ceil(lb_common::maps::POOL_LANES),
        );
    loader
}

/// Detaches every link and removes every pin of an instance. Returns what was removed.
pub fn detach_instance(instance: &str) -> Result<Vec<String>> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        return Err(Error::NotFound(format!(
            "instance {instance} has no pinned data plane in {}",
            dir.display()
        )));
    }
    let mut removed = Vec::new();
    let entries = fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.starts_with("link_") {
            // Unpinning drops the last reference, which detaches the program.
            match PinnedLink::from_pin(&path) {
                Ok(link) => {
                    link.unpin()
                        .map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
                }
                Err(_) => {
                    fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?
                }
            }
        } else {
            fs::remove_file(&path).map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
        }
        removed.push(name);
    }
    fs::remove_dir(&dir).map_err(|e| Error::io(format!("remove {}", dir.display()), e))?;
    Ok(removed)
}
