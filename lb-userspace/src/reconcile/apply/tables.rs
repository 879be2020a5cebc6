//! Building a service's pool region from its plan's members: the Maglev table, round robin's
//! members, a smooth weighted round robin period, or the counting strategies' elements. Pure
//! and CPU-bound: the writer runs it on a blocking thread, a batch over the CPUs.

use crate::{
    maglev::{MaglevBackend, build_table},
    snapshot::TableInput,
};

/// Tables built ahead at most this many at a time: a pass that rebuilds many (a start, a
/// reload, a backend of many services going down) spreads them over the CPUs, and holds no
/// more than this many built tables at once.
pub const BUILD_BATCH: usize = 16;

/// Builds each input's region, the batch split over the CPUs (one alone: on this thread).
pub fn build_all(batch: &[(&str, &TableInput)]) -> Vec<(String, Vec<u16>)> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(batch.len());
    if workers <= 1 {
        return batch
            .iter()
            .map(|(name, input)| (name.to_string(), build(input)))
            .collect();
    }
    let per = batch.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(name, input)| (name.to_string(), build(input)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// The pool slots the rebuilt tables take, at most.
pub(super) fn pool_need(rebuild: &[(String, TableInput)]) -> u64 {
    rebuild.iter().map(|(_, input)| region_len(input) as u64).sum()
}

/// The pool slots `build` fills for these inputs, at most (none without members).
fn region_len(input: &TableInput) -> u32 {
    use crate::model::Strategy;
    let n = input.members.len() as u32;
    match input.strategy {
        _ if n == 0 => 0,
        Strategy::RoundRobin => n,
        Strategy::LeastConnections | Strategy::PowerOfTwo => n * lb_common::strategy::MEMBER_STRIDE,
        _ => input.size,
    }
}

/// A service's pool region for a plan's members (see `lb_common::strategy`): the Maglev table,
/// the members in turn, one period of smooth weighted round robin, or one element of (slot,
/// weight, cap) per member. Backend slots fit 16 bits (`MAX_BACKENDS`).
pub fn build(input: &TableInput) -> Vec<u16> {
    use crate::model::Strategy;
    let slots = input.members.iter().map(|m| m.2 as u16);
    match input.strategy {
        Strategy::Maglev | Strategy::ResourceAware | Strategy::Adaptive | Strategy::Geo => maglev(input),
        Strategy::RoundRobin => slots.collect(),
        Strategy::WeightedRoundRobin => {
            let mut weights: Vec<u32> = input.members.iter().map(|m| m.1).collect();
            // A period no longer than the Maglev table the service would have.
            lb_common::strategy::wrr_weights(&mut weights, input.size);
            let total: usize = weights.iter().map(|&w| w as usize).sum();
            let mut current = vec![0i64; weights.len()];
            let mut order = vec![0u32; total];
            let n = lb_common::strategy::smooth_wrr(&weights, &mut current, &mut order);
            order[..n]
                .iter()
                .map(|&i| input.members[i as usize].2 as u16)
                .collect()
        }
        Strategy::LeastConnections | Strategy::PowerOfTwo => input
            .members
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                lb_common::strategy::member_words(m.2 as u16, m.1, input.caps.get(i).copied().unwrap_or(0))
            })
            .collect(),
    }
}

/// The Maglev table of a plan's members, as backend slots.
fn maglev(input: &TableInput) -> Vec<u16> {
    let members: Vec<MaglevBackend<'_>> = input
        .members
        .iter()
        .map(|(id, weight, _)| MaglevBackend { id, weight: *weight })
        .collect();
    build_table(&members, input.size)
        .into_iter()
        .map(|i| input.members[i as usize].2 as u16)
        .collect()
}
