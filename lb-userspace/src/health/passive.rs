//! Passive health from the data plane. DSR, IPIP and GUE see only the client's direction, but a
//! client's SYN for a flow just pinned to a backend is a retransmit: the backend did not
//! answer. The data plane counts those per backend; every [`INTERVAL`] the monitor compares
//! them with the backend's new flows over the last [`WINDOW`] readings (a sliding window of
//! 500 ms), and a share of retransmits over `passive_threshold`, with at least
//! `passive_min_samples` SYNs, is one failure for the backend's tracker and breaker, as a
//! failed check would be. NAT sees both directions: there a RST as the backend's first answer
//! (refused) counts as a failure too, and a retransmit is a client SYN the backend has not
//! answered. With `error_threshold = 3`, a blackholed backend is out about 0.5 s
//! after its clients' first retransmits (1 s after their first unanswered SYNs).

use std::time::Duration;

use crate::{model::health_settings::PassiveSpec, status::checks::Outcome};

/// How often the counters are compared.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// Readings the window spans: the interval judged is `WINDOW × INTERVAL`.
pub const WINDOW: usize = 2;

/// One reading of a backend's counters: new flows, client SYN retransmits, and (NAT) refused
/// connections.
pub type Reading = (u64, u64, u64);

/// A failure if the interval between two readings crosses the threshold: retransmits and
/// refusals per first SYN. New flows count retransmits too (each SYN is picked), so the first
/// SYNs are their difference; a refusal answers a first SYN.
pub fn evaluate(before: Reading, now: Reading, spec: &PassiveSpec) -> Option<Outcome> {
    let syns = now.0.saturating_sub(before.0);
    let retransmits = now.1.saturating_sub(before.1).min(syns);
    let first = syns - retransmits;
    let refused = now.2.saturating_sub(before.2).min(first);
    let failed = retransmits + refused;
    if first < u64::from(spec.min_samples) && failed < u64::from(spec.min_samples) {
        return None;
    }
    let ratio = failed as f64 / first.max(1) as f64;
    let ms = INTERVAL.as_millis() * WINDOW as u128;
    (ratio > spec.threshold).then(|| Outcome {
        ok: false,
        latency: Duration::ZERO,
        detail: if refused == 0 {
            format!("passive: {retransmits} client SYN retransmits to {first} new flows in {ms} ms")
        } else {
            format!("passive: {retransmits} client SYN retransmits and {refused} refused (RST) of {first} new flows in {ms} ms")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmits_over_the_threshold_with_enough_samples_are_a_failure() {
        let spec = PassiveSpec {
            threshold: 0.3,
            min_samples: 5,
        };
        assert!(
            evaluate((100, 0, 0), (120, 0, 0), &spec).is_none(),
            "no retransmits"
        );
        assert!(
            evaluate((100, 0, 0), (120, 4, 0), &spec).is_none(),
            "4 to 16: 0.25"
        );
        assert!(
            evaluate((100, 0, 0), (120, 5, 0), &spec).is_some(),
            "5 to 15: 0.33"
        );
        let f = evaluate((100, 0, 0), (120, 10, 0), &spec).expect("10 retransmits to 10 first SYNs");
        assert!(
            f.detail.contains("10 client SYN retransmits to 10 new flows"),
            "{}",
            f.detail
        );
        assert!(
            evaluate((100, 0, 0), (103, 1, 0), &spec).is_none(),
            "too few samples"
        );
        assert!(
            evaluate((100, 0, 0), (106, 6, 0), &spec).is_some(),
            "a blackhole: every SYN a retransmit"
        );
        // NAT: refusals of first SYNs fail too.
        let f = evaluate((100, 0, 0), (120, 0, 8), &spec).expect("8 refused of 20");
        assert!(
            f.detail.contains("8 refused (RST) of 20 new flows"),
            "{}",
            f.detail
        );
        assert!(
            evaluate((100, 0, 0), (120, 0, 6), &spec).is_none(),
            "6 of 20: 0.3"
        );
    }
}
