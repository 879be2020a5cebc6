//! The soak (issue 27 §5; `lb_tests::soak`): 240 long-lived TCP connections, 40 UDP flows and
//! 20 new connections a second through one daemon process while its control plane churns
//! (backends and whole services added and removed, weights changed) and `/metrics`,
//! `/v1/status` and `lb status` are scraped every second. Samples every 10 s go to
//! `target/soak/` (samples.csv, soak.svg, summary.txt). `LB_SOAK_SECONDS` (default 180, CI's
//! form) sets the length; `cargo xtask soak --minutes N` runs longer ones.

use std::time::Duration;

use lb_tests::soak::{self, LEAK_POINT, Options};

fn seconds() -> u64 {
    std::env::var("LB_SOAK_SECONDS").map_or(180, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("LB_SOAK_SECONDS={v}: not a number"))
    })
}

/// RSS flat (fitted growth under 5 % after the warm-up), descriptors flat, the connection
/// table's counted flows the live ones at the end, the pool back to the start's.
#[test]
fn soak_memory_and_descriptors_stay_flat_under_churn() {
    let report = soak::run(Options::new(Duration::from_secs(seconds()))).expect("the soak lab runs");
    let dir = lb_tests::target_dir().join("soak");
    report.write(&dir).expect("write target/soak");
    println!(
        "{}(samples, plot and summary in {})",
        report.summary(),
        dir.display()
    );
    assert!(report.violations.is_empty(), "{}", report.summary());
}

/// The proof that the judge catches a leak: the daemon leaks a descriptor at each change
/// (the `apply-leak-descriptor` failpoint), and the same run must fail on descriptors. About
/// 3 minutes; run with `--ignored` (CI runs the run above).
#[test]
#[ignore]
fn a_descriptor_leaked_per_change_fails_the_soak() {
    let mut opts = Options::new(Duration::from_secs(seconds()));
    opts.leak = true;
    let report = soak::run(opts).expect("the soak lab runs");
    println!("with {LEAK_POINT}:\n{}", report.summary());
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.starts_with("descriptors rose by")),
        "the leak was not reported: {}",
        report.summary()
    );
}
