//! Chaos under continuous traffic (issue 27 §2; `lb_tests::chaos`): 240 long-lived TCP
//! connections asking every 50 ms, 50 new connections a second and 40 UDP flows, through the
//! daemon, while a seeded schedule of faults runs. `LB_CHAOS_SECONDS` (default 120) and
//! `LB_CHAOS_SEED` (default fixed, so CI replays the same schedule) set the run; `cargo xtask
//! chaos --minutes N --seed S` runs longer ones. A failure prints the seed and the timeline.

use std::time::Duration;

use lb_tests::chaos::{self, Options};

/// CI's schedule.
const SEED: u64 = 27;

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

#[test]
fn chaos_under_continuous_traffic_keeps_every_invariant() {
    let seed = env("LB_CHAOS_SEED").unwrap_or(SEED);
    let length = Duration::from_secs(env("LB_CHAOS_SECONDS").unwrap_or(120));
    println!("chaos: seed={seed} length={}s", length.as_secs());
    let report = chaos::run(Options::new(seed, length)).expect("the chaos lab runs");
    println!("{}", report.summary());
    if let Err(text) = report.verdict() {
        panic!("{text}");
    }
}

/// The proof that the judge catches a failure it should: a run whose stopped servers and
/// downed links the judge is not told of must report their connections' failures. About 2
/// minutes; run with `--ignored` (CI runs the run above).
#[test]
#[ignore]
fn a_fault_the_judge_is_not_told_of_is_reported() {
    let length = Duration::from_secs(60);
    let upgrades = chaos::second_build().is_some();
    for kind in ["server stopped", "link down"] {
        // The first seed from CI's on whose schedule the fault is.
        let seed = (env("LB_CHAOS_SEED").unwrap_or(SEED)..)
            .take(50)
            .find(|&s| {
                chaos::faults(s, length, upgrades)
                    .iter()
                    .any(|f| f.fault.kind() == kind)
            })
            .expect("a seed with the fault");
        let mut opts = Options::new(seed, length);
        opts.unexcused = Some(kind);
        let report = chaos::run(opts).expect("the chaos lab runs");
        println!("{kind} left unexcused:\n{}", report.summary());
        assert!(
            report.timeline.iter().any(|d| d.fault.kind() == kind),
            "seed {seed}: no {kind} in 60 s"
        );
        let text = report
            .verdict()
            .expect_err("the failures it caused were reported");
        assert!(
            text.contains("its backend healthy and in the service"),
            "{kind}: {text}"
        );
        println!("{}", text.lines().take(4).collect::<Vec<_>>().join("\n"));
    }
}
