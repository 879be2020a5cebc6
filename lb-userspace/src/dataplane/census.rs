//! Counts the connection table's entries now and then, on a thread of its own with its own
//! handle to the pin. The LRU map has no count the kernel keeps, and walking it is one syscall
//! per entry, so the walk is spaced out: every 10 s, or 20 times its own duration if longer.
//! The same walk counts each backend's counted flows (connection-table entries, and NAT
//! connections' forward entries) and corrects the data plane's active-flow counts (`active`)
//! to it.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use lb_common::{FlowKey, FlowState};

use crate::error::{Error, Result};

/// The last count.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConntrackCensus {
    pub entries: u64,
    /// When it was taken (`None`: not yet).
    pub at: Option<Instant>,
    /// How long the walk took.
    pub took: Duration,
    /// Active-flow counts corrected since the daemon started.
    pub active_corrections_total: u64,
}

pub fn spawn(
    pins: &Path,
    out: Arc<Mutex<ConntrackCensus>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let map: HashMap<MapData, FlowKey, FlowState> =
        super::open_pinned(&pins.join(lb_common::maps::CONNTRACK))?
            .try_into()
            .map_err(|e| Error::dataplane(format!("connection table type: {e}")))?;
    let nat: HashMap<MapData, FlowKey, lb_common::NatEntry> =
        super::open_pinned(&pins.join(lb_common::maps::NAT_FLOWS))?
            .try_into()
            .map_err(|e| Error::dataplane(format!("NAT table type: {e}")))?;
    let active = match super::open_pinned(&pins.join(lb_common::maps::ACTIVE))? {
        aya::maps::Map::Array(data) => super::active::ActiveCounts::new(data)?,
        _ => return Err(Error::dataplane("ACTIVE is not an array")),
    };
    std::thread::Builder::new()
        .name("conntrack-census".into())
        .spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    continue;
                }
                let before: Vec<i64> = (0..active.slots()).map(|s| active.get(s)).collect();
                let mut entries = 0u64;
                let mut truth = std::collections::HashMap::<u32, i64>::new();
                for (_, state) in map.iter().flatten() {
                    entries += 1;
                    if state.forward & lb_common::flow::FLOW_COUNTED != 0 {
                        *truth.entry(state.backend).or_default() += 1;
                    }
                }
                // NAT connections count on their forward entries.
                for (_, e) in nat.iter().flatten() {
                    if e.flags & lb_common::nat::NAT_F_COUNTED != 0 {
                        *truth.entry(e.backend).or_default() += 1;
                    }
                }
                let fixes = super::active::corrections(&before, &truth);
                for &(slot, delta) in &fixes {
                    active.add(slot, delta);
                }
                let took = now.elapsed();
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                *o = ConntrackCensus {
                    entries,
                    at: Some(Instant::now()),
                    took,
                    active_corrections_total: o.active_corrections_total + fixes.len() as u64,
                };
                drop(o);
                next = Instant::now() + (took * 20).max(Duration::from_secs(10));
            }
        })
        .map_err(|e| Error::io("start the connection-table census thread", e))
}
