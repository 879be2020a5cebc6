//! Test harness: network namespaces joined by veth, a DSR topology, real servers in the backend
//! namespaces, the daemon started inside the balancer namespace, and teardown on drop (also when
//! a test panics).

pub mod bench;
pub mod chaos;
pub mod client;
pub mod cluster;
pub mod dns;
pub mod fixture;
pub mod flood;
pub mod netns;
pub mod packets;
pub mod servers;
pub mod soak;
pub mod svg;
pub mod topology;

pub use netns::{NetNs, in_ns};
pub use topology::{Daemon, Topology};

/// The `lb` binary: `LB_BIN`, else next to the test executable's directory (target/debug/lb).
pub fn lb_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("LB_BIN") {
        return p.into();
    }
    built("lb")
}

/// The upgrade test's second `lb`: built with feature `flow-v2` (its connection-table value has
/// one more field, layout version 2). `LB_FLOW_V2_BIN`, else `lb-flow-v2` beside `lb`, where
/// `cargo xtask test` puts it.
pub fn lb_flow_v2_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("LB_FLOW_V2_BIN") {
        return p.into();
    }
    built("lb-flow-v2")
}

/// The `xtask` binary (`cargo xtask`), built beside the tests (target/debug/xtask).
pub fn xtask_bin() -> std::path::PathBuf {
    built("xtask")
}

/// A binary of this build: next to the test executable's directory.
fn built(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The target directory: `CARGO_TARGET_DIR` as the build had it, else the workspace's
/// `target`. Tests keep their artifacts (screenshots) under it.
pub fn target_dir() -> std::path::PathBuf {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    // A relative directory is the workspace's, as cargo reads it.
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| root.join("target"), |d| root.join(d))
}

/// The test environment's Python (`cargo xtask setup` makes it in the target directory's
/// `py`).
pub fn python() -> std::path::PathBuf {
    target_dir().join("py/bin/python")
}

/// Waits for `cond` up to `timeout`, polling; returns whether it became true.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A self-signed P-256 certificate and its key (openssl), for subject `cn`, with `extensions`
/// (`-addext` values: the subjectAltName, say). Panics with openssl's words if it fails.
pub fn self_signed(cert: &std::path::Path, key: &std::path::Path, cn: &str, extensions: &[&str]) {
    let mut req = std::process::Command::new("openssl");
    req.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
    ])
    .args(["-nodes", "-days", "1", "-subj", &format!("/CN={cn}")]);
    for e in extensions {
        req.args(["-addext", e]);
    }
    let out = req
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl req");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// CPU seconds a process has used (its threads, user and system).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').context("/proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// A number from `/proc/PID/status`: `VmRSS` and other sizes in bytes (the file gives kB),
/// counts (`Threads`) as they are.
pub fn proc_status(pid: u32, name: &str) -> anyhow::Result<u64> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .with_context(|| format!("{name} missing in /proc/{pid}/status"))?;
    let (value, kb) = match line.trim().strip_suffix("kB") {
        Some(v) => (v.trim(), 1024),
        None => (line.trim(), 1),
    };
    let n: u64 = value.parse().with_context(|| format!("parse {name}: {line}"))?;
    Ok(n * kb)
}

/// Writes a token file as the daemon accepts one: readable by its owner alone (mode 0600).
pub fn write_secret(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}
