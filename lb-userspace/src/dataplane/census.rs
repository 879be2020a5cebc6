//! Counts the connection table's entries now and then, on a thread of its own with its own
//! handle to the pin. The LRU map has no count the kernel keeps, and walking it is one syscall
//! per entry, so the walk is spaced out: every 10 s, or 20 times its own duration if longer.

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
}

pub fn spawn(
    pin: &Path,
    out: Arc<Mutex<ConntrackCensus>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let map: HashMap<MapData, FlowKey, FlowState> = super::open_pinned(pin)?
        .try_into()
        .map_err(|e| Error::dataplane(format!("connection table type: {e}")))?;
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
                let entries = map.keys().filter(|k| k.is_ok()).count() as u64;
                let took = now.elapsed();
                *out.lock().unwrap_or_else(|p| p.into_inner()) = ConntrackCensus {
                    entries,
                    at: Some(Instant::now()),
                    took,
                };
                next = Instant::now() + (took * 20).max(Duration::from_secs(10));
            }
        })
        .map_err(|e| Error::io("start the connection-table census thread", e))
}
