//! Least privilege, tested. Every end-to-end test starts the daemon as the unit runs it (the
//! unit's capability set, no_new_privs, /proc/sys read-only but for /proc/sys/net: see
//! `topology::as_the_unit_runs_it`), checks through the VIP included. Here: the unit file passes
//! `systemd-analyze verify` and scores at most 3.0 in `systemd-analyze security`, and a
//! running daemon holds only its runtime capabilities, in every set, with no_new_privs.

use lb_tests::{
    Daemon, Topology,
    topology::{unit_capabilities, unit_file},
};

/// The unit with ExecStart on the binary under test (verify wants an executable there).
fn unit_here() -> std::path::PathBuf {
    let text = std::fs::read_to_string(unit_file()).expect("unit file");
    let text = text.replace(
        "ExecStart=/usr/local/bin/lb ",
        &format!("ExecStart={} ", lb_tests::lb_bin().display()),
    );
    let path = std::env::temp_dir().join(format!("lb-test-{}.service", std::process::id()));
    std::fs::write(&path, text).expect("write unit");
    path
}

fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (Debian: systemd) is needed for this test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_unit_verifies_and_scores_at_most_three() {
    let unit = unit_here();
    let path = unit.to_str().expect("path");
    let (ok, text) = systemd_analyze(&["verify", path]);
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify: {text}");
    let (_, text) = systemd_analyze(&["security", "--offline=yes", path]);
    let _ = std::fs::remove_file(&unit);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {text}"));
    println!("systemd-analyze security: exposure {score} (at most 3.0 is \"OK\")");
    assert!(score <= 3.0, "exposure {score}:\n{text}");
    // The unit grants no capability the daemon does not use at start.
    let mut caps = unit_capabilities().expect("unit capabilities");
    caps.sort();
    assert_eq!(
        caps,
        [
            "bpf",
            "net_admin",
            "net_bind_service",
            "perfmon",
            "setpcap",
            "sys_admin"
        ]
    );
}

/// CapEff, CapPrm, CapBnd, CapInh, CapAmb and NoNewPrivs of a process.
fn status_of(pid: u32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn a_running_daemon_keeps_only_its_runtime_capabilities() {
    let topo = Topology::new(2).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let config = topo.config(&instance, &run_dir, &["b1", "b2"]);
    let d = Daemon::start(&topo, &instance, &run_dir, &config).expect("daemon starts");
    d.wait_all_in_tables();
    // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
    let runtime = format!("{:016x}", (1u64 << 12) | (1 << 38) | (1 << 39));
    let st = status_of(d.pid().expect("pid"));
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(st[set], runtime, "{set}: {st:?}");
    }
    assert_eq!(st["CapInh"], "0000000000000000");
    assert_eq!(st["CapAmb"], "0000000000000000");
    assert_eq!(st["NoNewPrivs"], "1");
    assert!(
        d.log()
            .contains("capabilities kept: CAP_NET_ADMIN CAP_PERFMON CAP_BPF"),
        "{}",
        d.log()
    );
    // And it still changes what it owns: a weight, through the writer to the maps.
    let out = d.cli(&["backend", "weight", "web4", "b1", "50"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
