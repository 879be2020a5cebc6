//! `cargo xtask bench`: data-plane cost per packet, end-to-end forwarding against nftables and
//! HAProxy, control-plane speed, and service discovery at scale. Each part returns plain records; the runner prints them and
//! writes `target/bench/results.json`.

pub mod cluster;
pub mod control;
pub mod dataplane;
pub mod discovery;
pub mod e2e;
pub mod health;
pub mod katran;
pub mod report;
pub mod scale;
pub mod spread;

/// The median (the mean of the middle two for an even count); `None` for no values.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut s: Vec<f64> = values.into_iter().collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}
