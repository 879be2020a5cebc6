//! `cargo xtask setup`: check every prerequisite first (cheap), then install
//! only what is missing, so a second run takes well under a second.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::ctx::{self, Ctx};

/// Build dependencies of bpf-linker (LLVM 22, linked dynamically).
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
];
/// Tools used by the integration tests and the demo, the bench's contenders (nftables,
/// HAProxy; its load generator is our own XDP program), and Prometheus with promtool (the
/// metrics tests scrape the daemon with a real server), and BIRD 2 (the daemon announces VIPs
/// through it; the cluster tests run a router with it too), etcd (the cluster's desired state,
/// a real server in the tests), protoc with its well-known types (the etcd client's
/// protocol is compiled from .proto files), what `cargo xtask package` builds and checks
/// the Debian package with (dpkg-dev's dpkg-shlibdeps, binutils' strip, lintian),
/// Chromium with its WebDriver (the status page is tested in a real browser, driven by
/// Selenium from the Python environment), and dnsmasq's binary (the DNS discovery tests serve
/// SRV records from it; `-base` has no system service that would start on install).
const TOOL_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "nftables",
    "haproxy",
    "prometheus",
    "bird2",
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
    "dpkg-dev",
    "binutils",
    "lintian",
    "chromium",
    "chromium-driver",
    "dnsmasq-base",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The cargo-deny `cargo xtask deny` runs (pinned: its checks and config format change).
const CARGO_DENY: &str = "0.20.2";
const BPFFS: &str = "/sys/fs/bpf";

/// What is missing, found before anything is installed.
struct Plan {
    packages: Vec<&'static str>,
    nightly: Nightly,
    bpf_linker: BpfLinker,
    mount_bpffs: bool,
}

#[derive(PartialEq)]
enum Nightly {
    Ok,
    MissingToolchain,
    MissingRustSrc,
}

#[derive(PartialEq)]
enum BpfLinker {
    Ok,
    Missing,
    /// Installed in cargo's bin directory but `--version` fails.
    Broken,
}

pub fn setup(ctx: &Ctx) -> Result<()> {
    let start = Instant::now();
    let packages = missing_packages(ctx)?;
    let need_bpffs = !bpffs_mounted()?;

    // Fail before any check or long install if a root-only step cannot be done.
    if !is_root() {
        let mut missing = Vec::new();
        let mut fixes = Vec::new();
        if !packages.is_empty() {
            let pkgs = packages.join(" ");
            missing.push(format!("install Debian packages {pkgs}"));
            fixes.push(format!("sudo apt-get update && sudo apt-get install -y {pkgs}"));
        }
        if need_bpffs {
            missing.push(format!("mount bpffs at {BPFFS}"));
            fixes.push(format!("sudo mount -t bpf bpf {BPFFS}"));
        }
        if !missing.is_empty() {
            bail!(
                "setup must run as root to {} (fix: {}, or run `cargo xtask setup` as root)",
                missing.join(" and "),
                fixes.join(" && ")
            );
        }
    }

    let plan = Plan {
        packages,
        nightly: check_nightly(ctx)?,
        bpf_linker: check_bpf_linker(ctx),
        mount_bpffs: need_bpffs,
    };

    let mut done = Vec::new();
    // cargo-deny compiles for minutes: alongside the downloads below, which wait on the network.
    let deny = if cargo_deny_runs(ctx) {
        None
    } else {
        Some(start_cargo_deny_install(ctx)?)
    };
    if !plan.packages.is_empty() {
        install_packages(ctx, &plan.packages)?;
        done.push(format!("Debian packages ({})", plan.packages.join(" ")));
    }
    match plan.nightly {
        Nightly::Ok => {}
        Nightly::MissingToolchain => {
            install_nightly(ctx)?;
            done.push("nightly toolchain with rust-src".to_string());
        }
        Nightly::MissingRustSrc => {
            install_rust_src(ctx)?;
            done.push("nightly rust-src".to_string());
        }
    }
    if plan.bpf_linker != BpfLinker::Ok {
        install_bpf_linker(ctx, plan.bpf_linker == BpfLinker::Broken)?;
        done.push("bpf-linker".to_string());
    }
    if plan.mount_bpffs {
        mount_bpffs(ctx)?;
        done.push(format!("bpffs at {BPFFS}"));
    }
    if !python_env_ready(ctx) {
        install_python_env(ctx)?;
        done.push(format!("Python test environment ({PY_REQUIREMENTS})"));
    }
    if let Some(install) = deny {
        finish_cargo_deny_install(ctx, install)?;
        done.push(format!("cargo-deny {CARGO_DENY}"));
    }

    let secs = start.elapsed().as_secs_f64();
    if done.is_empty() {
        eprintln!("setup: nothing to install, all prerequisites present ({secs:.2}s)");
    } else {
        eprintln!("setup: installed {} ({secs:.1}s)", done.join(", "));
    }
    Ok(())
}

/// Effective uid 0, read from /proc/self/status (no libc dependency).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

// ---- Python test environment -------------------------------------------------

/// What the API tests run (schemathesis against the live API, the Python client's httpx,
/// mmdb-writer for the geo test's MaxMind files), every package and dependency pinned with
/// its hash, in a virtual environment under the target directory.
const PY_REQUIREMENTS: &str = "python/requirements-test.txt";

fn py_requirements(ctx: &Ctx) -> Result<String> {
    let path = ctx.root.join(PY_REQUIREMENTS);
    fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

/// The virtual environment's directory; tests find it as `target/py`.
pub fn python_env(ctx: &Ctx) -> std::path::PathBuf {
    ctx.target_dir().join("py")
}

/// The client package `python/`, installed into the environment beside the requirements.
const PY_CLIENT: &str = "python";

/// What the environment was made from: the requirements and the client package's files, so
/// either changing installs again.
fn py_marker(ctx: &Ctx) -> Result<String> {
    let mut marker = py_requirements(ctx)?;
    for file in ["pyproject.toml", "lbclient/__init__.py", "lbclient/py.typed"] {
        let path = ctx.root.join(PY_CLIENT).join(file);
        marker.push_str(&format!("\n# {file}\n"));
        marker.push_str(&fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?);
    }
    Ok(marker)
}

/// Ready when the environment was made from the requirements and the client as they are now.
fn python_env_ready(ctx: &Ctx) -> bool {
    let marker = python_env(ctx).join("lb-packages");
    py_marker(ctx).is_ok_and(|want| fs::read_to_string(marker).is_ok_and(|m| m == want))
}

fn install_python_env(ctx: &Ctx) -> Result<()> {
    let dir = python_env(ctx);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| ctx.which(OsStr::new(p)).is_some())
        .context("python3 not found (fix: apt-get install python3 python3-venv)")?;
    let mut venv = ctx.command(python);
    venv.args(["-m", "venv"]).arg(&dir);
    ctx::run(&mut venv).context("create the Python test environment (fix: apt-get install python3-venv)")?;
    let mut pip = ctx.command(dir.join("bin/pip"));
    pip.args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--require-hashes",
        "-r",
    ])
    .arg(ctx.root.join(PY_REQUIREMENTS));
    ctx::run(&mut pip).context("install the Python test packages")?;
    // The client as `pip install ./python` installs it, built with the setuptools the
    // environment has (no download: the build backend is not fetched in isolation).
    let mut client = ctx.command(dir.join("bin/pip"));
    client
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--force-reinstall",
        ])
        .arg(ctx.root.join(PY_CLIENT));
    ctx::run(&mut client).context("install the Python client (python/)")?;
    fs::write(dir.join("lb-packages"), py_marker(ctx)?)
        .with_context(|| format!("write {}", dir.display()))?;
    Ok(())
}

// ---- Debian packages -------------------------------------------------------

fn missing_packages(ctx: &Ctx) -> Result<Vec<&'static str>> {
    let wanted: Vec<&'static str> = LLVM_PACKAGES.iter().chain(TOOL_PACKAGES).copied().collect();
    if ctx.which(OsStr::new("dpkg-query")).is_none() {
        bail!(
            "dpkg-query not found: setup supports Debian 12 only (install {} by other means)",
            wanted.join(" ")
        );
    }
    let installed = installed_packages(ctx, &wanted)?;
    Ok(wanted.into_iter().filter(|p| !installed.contains(*p)).collect())
}

/// Which of `pkgs` dpkg reports as "install ok installed" (one dpkg-query call;
/// it exits non-zero when some package is unknown, which just means missing).
fn installed_packages(ctx: &Ctx, pkgs: &[&str]) -> Result<HashSet<String>> {
    let mut query = ctx.command("dpkg-query");
    query.args(["-W", "-f=${Package}\t${Status}\n"]).args(pkgs);
    let out = ctx::output(&mut query)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name.trim().to_string())
        .collect())
}

fn install_packages(ctx: &Ctx, pkgs: &[&str]) -> Result<()> {
    let list = pkgs.join(" ");
    let fix = format!("apt-get update && apt-get install -y {list}");
    eprintln!("setup: installing Debian packages: {list}");

    let mut update = ctx.command("apt-get");
    update.arg("update");
    ctx::run(&mut update).with_context(|| format!("cannot install {list} (fix: {fix})"))?;

    let mut install = ctx.command("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        // Don't start HAProxy's system service: the bench starts its own instance.
        .env("RUNLEVEL", "1")
        .args(["install", "-y"])
        .args(pkgs);
    ctx::run(&mut install).with_context(|| format!("cannot install {list} (fix: {fix})"))?;

    let installed = installed_packages(ctx, pkgs)?;
    let still: Vec<&str> = pkgs.iter().copied().filter(|p| !installed.contains(*p)).collect();
    if !still.is_empty() {
        bail!(
            "Debian packages still missing after apt-get install: {} (fix: {fix})",
            still.join(" ")
        );
    }
    Ok(())
}

// ---- nightly rust-src ------------------------------------------------------

fn rustup(ctx: &Ctx) -> Result<std::process::Command> {
    if ctx.which(OsStr::new("rustup")).is_none() {
        bail!(
            "rustup not found on PATH (fix: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh)"
        );
    }
    Ok(ctx.command("rustup"))
}

fn check_nightly(ctx: &Ctx) -> Result<Nightly> {
    let mut list = rustup(ctx)?;
    list.args(["component", "list", "--toolchain", "nightly", "--installed"]);
    let out = ctx::output(&mut list)?;
    if out.status.success() {
        let has_src = String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-"));
        return Ok(if has_src {
            Nightly::Ok
        } else {
            Nightly::MissingRustSrc
        });
    }
    // The component listing fails when nightly is not installed; confirm that
    // rather than guess from the error text.
    let mut toolchains = rustup(ctx)?;
    toolchains.args(["toolchain", "list"]);
    let tl = ctx::output(&mut toolchains)?;
    let has_nightly = String::from_utf8_lossy(&tl.stdout).lines().any(|l| {
        // "nightly-<host>", not a dated "nightly-YYYY-MM-DD-<host>".
        l.split_whitespace()
            .next()
            .and_then(|name| name.strip_prefix("nightly-"))
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if tl.status.success() && !has_nightly {
        return Ok(Nightly::MissingToolchain);
    }
    bail!(
        "`{}` failed: {}",
        ctx::display(&list),
        ctx::first_line(&out.stderr)
    )
}

fn install_nightly(ctx: &Ctx) -> Result<()> {
    let mut cmd = rustup(ctx)?;
    cmd.args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]);
    eprintln!(
        "setup: installing nightly toolchain with rust-src ({})",
        ctx::display(&cmd)
    );
    let shown = ctx::display(&cmd);
    ctx::run(&mut cmd).with_context(|| format!("nightly toolchain missing (fix: {shown})"))
}

fn install_rust_src(ctx: &Ctx) -> Result<()> {
    let mut cmd = rustup(ctx)?;
    cmd.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    eprintln!("setup: installing nightly rust-src ({})", ctx::display(&cmd));
    let shown = ctx::display(&cmd);
    ctx::run(&mut cmd).with_context(|| format!("nightly rust-src missing (fix: {shown})"))
}

// ---- bpf-linker ------------------------------------------------------------

fn bpf_linker_runs(ctx: &Ctx) -> bool {
    if ctx.which(OsStr::new("bpf-linker")).is_none() {
        return false;
    }
    let mut version = ctx.command("bpf-linker");
    version.arg("--version");
    ctx::output(&mut version).is_ok_and(|o| o.status.success())
}

fn check_bpf_linker(ctx: &Ctx) -> BpfLinker {
    if bpf_linker_runs(ctx) {
        BpfLinker::Ok
    } else if ctx.cargo_bin.join("bpf-linker").exists() {
        BpfLinker::Broken
    } else {
        BpfLinker::Missing
    }
}

fn install_bpf_linker(ctx: &Ctx, force: bool) -> Result<()> {
    let mut cmd = ctx.cargo();
    cmd.env("LLVM_PREFIX", LLVM_PREFIX)
        .args(["install", "bpf-linker", "--locked", "--no-default-features"])
        .args(["--features", "llvm-22"]);
    if force {
        // A binary is there but does not run (e.g. built against another LLVM).
        cmd.arg("--force");
    }
    let shown = ctx::display(&cmd);
    eprintln!("setup: installing bpf-linker, this compiles for several minutes ({shown})");
    ctx::run(&mut cmd).with_context(|| format!("bpf-linker missing (fix: {shown})"))?;
    if !bpf_linker_runs(ctx) {
        bail!("bpf-linker was installed but `bpf-linker --version` fails (fix: {shown} --force)");
    }
    Ok(())
}

// ---- cargo-deny ----------------------------------------------------------------

fn cargo_deny_runs(ctx: &Ctx) -> bool {
    let mut version = ctx.command("cargo-deny");
    version.arg("--version");
    ctx::output(&mut version).is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == format!("cargo-deny {CARGO_DENY}")
    })
}

/// The running install and how to show it.
struct DenyInstall {
    child: std::process::Child,
    shown: String,
}

fn start_cargo_deny_install(ctx: &Ctx) -> Result<DenyInstall> {
    let mut cmd = ctx.cargo();
    cmd.args([
        "install",
        "cargo-deny",
        "--locked",
        "--force",
        "--version",
        CARGO_DENY,
    ]);
    let shown = ctx::display(&cmd);
    eprintln!("setup: installing cargo-deny in the background, it compiles for a few minutes ({shown})");
    let child = cmd.spawn().with_context(|| format!("cannot start `{shown}`"))?;
    Ok(DenyInstall { child, shown })
}

fn finish_cargo_deny_install(ctx: &Ctx, mut install: DenyInstall) -> Result<()> {
    let shown = &install.shown;
    let status = install
        .child
        .wait()
        .with_context(|| format!("wait for `{shown}`"))?;
    if !status.success() || !cargo_deny_runs(ctx) {
        bail!("cargo-deny {CARGO_DENY} missing: `{shown}` failed ({status})");
    }
    Ok(())
}

// ---- bpffs -------------------------------------------------------------------

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next(), f.next(), f.next());
        dir == Some(BPFFS) && fstype == Some("bpf")
    }))
}

fn mount_bpffs(ctx: &Ctx) -> Result<()> {
    let fix = format!("mount -t bpf bpf {BPFFS}");
    eprintln!("setup: mounting bpffs at {BPFFS}");
    if !Path::new(BPFFS).is_dir() {
        fs::create_dir_all(BPFFS)
            .with_context(|| format!("cannot create {BPFFS} for bpffs (fix: mkdir -p {BPFFS} && {fix})"))?;
    }
    let mut cmd = ctx.command("mount");
    cmd.args(["-t", "bpf", "bpf", BPFFS]);
    ctx::run(&mut cmd).with_context(|| format!("bpffs not mounted (fix: {fix})"))?;
    if !bpffs_mounted()? {
        bail!("bpffs still not mounted at {BPFFS} after mounting (fix: {fix})");
    }
    Ok(())
}
