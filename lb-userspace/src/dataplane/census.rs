//! Counts the connection table's entries now and then, on a thread of its own with its own
//! handle to the pin. The LRU map has no count the kernel keeps, and walking it is one syscall
//! per entry, so the walk is spaced out: every 10 s, or 20 times its own duration if longer.
//! The same walk counts each backend's counted flows (connection-table entries, and NAT
//! connections' forward entries) and corrects the data plane's active-flow counts to it, each
//! only when that is safe (`active::settle`). It also walks the embryonic table (flows that
//! have sent one packet) and removes the entries older than `EMBRYONIC_TTL`, so a burst of
//! SYNs that never complete, or of one-packet UDP flows, stops counting toward least
//! connections and `maxconn` within about 40 s.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use lb_common::{
    FlowKey, FlowState,
    flow::{coarse_seconds, embryonic_expired},
};

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
    /// Embryonic entries left after this census removed the expired ones.
    pub embryonic: u64,
    /// The oldest one's age (coarse seconds, about 1.07 s each).
    pub embryonic_oldest_s: u16,
    /// Expired embryonic entries removed since the daemon started.
    pub embryonic_expired_total: u64,
}

/// The embryonic entries a census keeps, those it removes (past `EMBRYONIC_TTL` at `now`, in
/// `coarse_seconds`), and the oldest kept one's age.
#[derive(Default)]
struct Young<'a> {
    kept: Vec<&'a FlowState>,
    expired: Vec<&'a FlowKey>,
    oldest: u16,
}

fn split_embryonic(entries: &[(FlowKey, FlowState)], now: u16) -> Young<'_> {
    let mut young = Young::default();
    for (key, state) in entries {
        if embryonic_expired(state.opened, now) {
            young.expired.push(key);
        } else {
            young.oldest = young.oldest.max(now.wrapping_sub(state.opened));
            young.kept.push(state);
        }
    }
    young
}

/// Counted flows per backend slot, as a census finds them. A flow pinned to a slot at an
/// older generation belongs to a backend removed since: the slot's count was zeroed when it
/// went to the new one, and the data plane takes such a flow off no count
/// (`active_release`), so it is not the new backend's.
#[derive(Default)]
struct Truth {
    per_slot: std::collections::HashMap<u32, i64>,
    /// Each slot's generation now, read once per census (`None`: no such slot).
    generations: std::collections::HashMap<u32, Option<u32>>,
}

impl Truth {
    fn count(&mut self, slot: u32, generation: u32, now: impl Fn(u32) -> Option<u32>) {
        let current = *self.generations.entry(slot).or_insert_with(|| now(slot));
        if current == Some(generation) {
            *self.per_slot.entry(slot).or_default() += 1;
        }
    }
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
    let mut embryonic: HashMap<MapData, FlowKey, FlowState> =
        super::open_pinned(&pins.join(lb_common::maps::EMBRYONIC))?
            .try_into()
            .map_err(|e| Error::dataplane(format!("embryonic table type: {e}")))?;
    let nat: HashMap<MapData, FlowKey, lb_common::NatEntry> =
        super::open_pinned(&pins.join(lb_common::maps::NAT_FLOWS))?
            .try_into()
            .map_err(|e| Error::dataplane(format!("NAT table type: {e}")))?;
    let backends: aya::maps::Array<MapData, lb_common::Backend> =
        super::open_pinned(&pins.join(lb_common::maps::BACKENDS))?
            .try_into()
            .map_err(|e| Error::dataplane(format!("backend table type: {e}")))?;
    let active = match super::open_pinned(&pins.join(lb_common::maps::ACTIVE))? {
        aya::maps::Map::Array(data) => super::active::ActiveCounts::new(data)?,
        _ => return Err(Error::dataplane("ACTIVE is not an array")),
    };
    std::thread::Builder::new()
        .name("conntrack-census".into())
        .spawn(move || {
            let mut next = Instant::now();
            // Per slot, the walks its count has been busy through (`active::settle`).
            let mut waited = vec![0u8; active.slots() as usize];
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    continue;
                }
                let before: Vec<i64> = (0..active.slots()).map(|s| active.get(s)).collect();
                let mut entries = 0u64;
                let mut truth = Truth::default();
                let generation = |slot: u32| backends.get(&slot, 0).ok().map(|b| b.generation);
                let mut count = |state: &FlowState| {
                    if state.forward & lb_common::flow::FLOW_COUNTED != 0 {
                        truth.count(state.backend, state.generation, generation);
                    }
                };
                for (_, state) in map.iter().flatten() {
                    entries += 1;
                    count(&state);
                }
                // Flows of one packet: the expired go (and so leave the truth); the rest count.
                let all: Vec<(FlowKey, FlowState)> = embryonic.iter().flatten().collect();
                let now_coarse = coarse_seconds(super::clock_ns(libc::CLOCK_MONOTONIC_COARSE));
                let young = split_embryonic(&all, now_coarse);
                let mut removed = 0u64;
                for key in &young.expired {
                    removed += u64::from(embryonic.remove(key).is_ok());
                }
                young.kept.iter().for_each(|state| count(state));
                // NAT connections count on their forward entries.
                for (_, e) in nat.iter().flatten() {
                    if e.flags & lb_common::nat::NAT_F_COUNTED != 0 {
                        truth.count(e.backend, e.generation, generation);
                    }
                }
                let mut fixed = 0u64;
                for (slot, was, found) in super::active::corrections(&before, &truth.per_slot) {
                    fixed += u64::from(active.settle(slot, was, found, &mut waited[slot as usize]));
                }
                let took = now.elapsed();
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                *o = ConntrackCensus {
                    entries,
                    at: Some(Instant::now()),
                    took,
                    active_corrections_total: o.active_corrections_total + fixed,
                    embryonic: all.len() as u64 - removed,
                    embryonic_oldest_s: young.oldest,
                    embryonic_expired_total: o.embryonic_expired_total + removed,
                };
                drop(o);
                next = Instant::now() + (took * 20).max(Duration::from_secs(10));
            }
        })
        .map_err(|e| Error::io("start the connection-table census thread", e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_flow_of_a_slots_earlier_backend_does_not_count_for_the_new_one() {
        // Slot 3 went to a new backend (generation 8); slot 5 has kept its generation 2.
        let now = |slot: u32| match slot {
            3 => Some(8),
            5 => Some(2),
            _ => None,
        };
        let mut truth = super::Truth::default();
        for (slot, generation) in [(3, 7), (3, 8), (3, 8), (5, 2), (9, 1)] {
            truth.count(slot, generation, now);
        }
        assert_eq!(truth.per_slot.get(&3), Some(&2));
        assert_eq!(truth.per_slot.get(&5), Some(&1));
        assert_eq!(truth.per_slot.get(&9), None);
    }

    #[test]
    fn embryonic_entries_past_their_ttl_go_and_the_oldest_kept_is_reported() {
        let now = 5u16;
        // Opened 2 units ago, exactly at the TTL, one past it, and long ago across the wrap.
        let opened = [
            3,
            now.wrapping_sub(lb_common::flow::EMBRYONIC_TTL),
            now.wrapping_sub(31),
            40_000,
        ];
        let entries: Vec<(lb_common::FlowKey, lb_common::FlowState)> = opened
            .iter()
            .enumerate()
            .map(|(i, &opened)| {
                let key = lb_common::FlowKey {
                    src_port: i as u16,
                    ..Default::default()
                };
                (
                    key,
                    lb_common::FlowState {
                        opened,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let young = super::split_embryonic(&entries, now);
        let ports: Vec<u16> = young.expired.iter().map(|k| k.src_port).collect();
        assert_eq!(ports, vec![2, 3]);
        assert_eq!(young.kept.len(), 2);
        assert_eq!(young.oldest, lb_common::flow::EMBRYONIC_TTL);
    }
}
