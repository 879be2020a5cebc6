//! Developer tasks for the load balancer workspace, run as `cargo xtask <command>`.
//!
//! This crate depends on nothing from the workspace so that `cargo xtask setup`
//! builds on a fresh machine, before bpf-linker or the nightly toolchain exist.

mod ctx;
mod package;
mod page;
mod setup;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};

use crate::ctx::Ctx;

/// Developer tasks for the XDP load balancer workspace.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing build and test prerequisites (Debian 12)
    ///
    /// Checks, and installs when missing: the LLVM 22 dev packages that
    /// bpf-linker links against, iproute2 and ethtool, the nightly toolchain's
    /// rust-src, bpf-linker itself (cargo install, several minutes), and a
    /// bpffs mount at /sys/fs/bpf. Idempotent: takes about a second when
    /// everything is present. Installing Debian packages and mounting bpffs
    /// require root.
    Setup,
    /// Run setup, build all workspace targets, run all tests
    ///
    /// Builds the upgrade test's second `lb` (feature flow-v2, copied to target/debug/lb-flow-v2),
    /// runs `cargo build --all-targets`, the host unit tests of the eBPF
    /// crate's parser (`cargo test -p lb-ebpf --lib`), then `cargo test
    /// -- --test-threads=1` over the default members (integration tests share
    /// kernel state, so one thread), then two lanes two at a time: the golden
    /// packets and the data-plane fuzzer, then the cluster labs. Needs root.
    Test {
        /// Extra arguments for the test binaries, e.g. `cargo xtask test -- --nocapture NAME`
        #[arg(last = true, value_name = "TEST_ARGS")]
        args: Vec<OsString>,
    },
    /// Run setup, then cargo deny over the dependency tree (deny.toml)
    ///
    /// Licenses, bans and sources always; advisories from the RustSec database when it can
    /// be fetched from GitHub, and a line saying they were skipped, and why, when it cannot.
    /// `cargo xtask test` runs this as its second step.
    Deny,
    /// Run setup, build the demo and the daemon, run the end-to-end demo
    ///
    /// Builds `lb-demo` (lb-tests) and `lb` (lb-userspace), then runs lb-demo
    /// with LB_BIN set to the `lb` binary. The demo creates network namespaces,
    /// runs the daemon, drives traffic, prints the results and tears down.
    /// Exits with the demo's exit code. Needs root.
    Demo,
    /// Run setup, build in release, run the benchmarks
    ///
    /// Builds `lb-bench` (lb-tests) and `lb` (lb-userspace) in release and
    /// runs lb-bench: data-plane cost per packet through BPF_PROG_TEST_RUN
    /// (Katran beside ours when ../shared/katran is there, and the scale
    /// configuration), end-to-end forwarding through veth against nftables and
    /// HAProxy, control-plane speed, health and the spread of long-lived
    /// connections. Prints a table and writes to target/bench: results.json,
    /// results.md (the run's machine, kernel, commit, date and a table per part)
    /// and dataplane.svg. About 4 minutes once built (2 vCPUs); `--quick` is
    /// the CI smoke test, no thresholds. Only `--page` changes files outside
    /// target/. Needs root.
    Bench {
        /// Short runs: fewer repeats and shorter windows
        #[arg(long)]
        quick: bool,
        /// Run only this part (repeatable): dataplane, e2e, control, health, spread, cluster,
        /// discovery (not in --quick unless named: about 4 minutes)
        #[arg(long, value_name = "PART")]
        only: Vec<String>,
        /// Then put the run on BENCHMARKS.md: results.md between its `results:begin`
        /// and `results:end` markers, the chart as docs/bench-dataplane.svg. A full
        /// run only (no --quick, no --only), from a checkout whose tracked files
        /// match its commit (the page names the commit it measured); checked before
        /// the run starts
        #[arg(long, conflicts_with_all = ["quick", "only"])]
        page: bool,
    },
    /// Run setup, then the fuzzers with more cases than the test command runs
    ///
    /// Generated frames through the balancer with BPF_PROG_TEST_RUN, each checked against the
    /// model, in L2 DSR, IPIP, GUE, NAT and SNAT modes and through the decapsulator, at once
    /// (tests/tests/fuzz_dataplane.rs); then config files, CLI arguments, service bodies,
    /// agent replies and geo data, each for `--input-seconds` (tests/tests/fuzz_inputs.rs).
    /// Prints the seeds; `--seed` replays a run. Needs root. A million frames take about 3
    /// minutes.
    Fuzz {
        /// Number of generated frames per mode
        #[arg(long, default_value_t = 1_000_000)]
        cases: u32,
        /// Seconds per input target (config, CLI, service body, agent, geo CSV, geo mmdb)
        #[arg(long, default_value_t = 60)]
        input_seconds: u32,
        /// Replay a run's seed
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run setup, then the chaos run for `--minutes` (tests/tests/chaos.rs)
    ///
    /// Steady traffic through the daemon in namespaces (240 long-lived TCP connections asking
    /// every 50 ms, 50 new connections a second, 40 UDP flows) while a seeded schedule of faults
    /// runs: servers stopped and started, links down and up, backends removed and added,
    /// weights, strategies, reloads, the daemon SIGKILLed and restarted. Checks that no flow
    /// whose backend stayed healthy and in its service fails, new connections >= 99.9 %
    /// successful, active-flow counts, the table pool and the counters. Prints the seed (random
    /// unless given) and, on a failure, the fault timeline; `--seed` replays it. `cargo xtask
    /// test` runs a 2-minute one with a fixed seed. Needs root.
    Chaos {
        /// Length of the run
        #[arg(long, default_value_t = 2)]
        minutes: u32,
        /// Replay a run's seed (default: a random one, printed)
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run setup, then the soak for `--minutes` (tests/tests/soak.rs)
    ///
    /// One daemon process under the chaos lab's steady traffic (240 long-lived TCP connections,
    /// 40 UDP flows, 20 new connections a second) while its control plane churns every second
    /// (the spare backend in and out of a service, a weight halved and back, a whole service
    /// added and removed) and `/metrics`, `/v1/status` and `lb status` are scraped. Every 10 s
    /// it samples the daemon's RSS, descriptors and threads, the connection, embryonic and NAT
    /// tables' entries, the flows counted, the table pool's free space and the live flows;
    /// writes target/soak/samples.csv, soak.svg and summary.txt and prints the summary. Fails
    /// when, after the warm-up (a sixth of the run, 1 to 10 minutes), the least-squares line
    /// of RSS rises 5 % or more, or that of descriptors by more than 2, or when the connection
    /// table's counted flows differ from the live ones at the end. `cargo xtask test` runs a
    /// 3-minute one. Needs root.
    Soak {
        /// Length of the run (the goal is judged over 60)
        #[arg(long, default_value_t = 60)]
        minutes: u32,
    },
    /// Build the Debian package: target/package/lb_<version>-1_<arch>.deb
    ///
    /// Runs setup and builds `lb` in release (unless `--lb-bin`), then stages the package as
    /// debhelper would and builds it with dpkg-deb: the stripped binary in /usr/sbin, the
    /// systemd unit (installed, not enabled), /etc/lb/lb.toml as a commented conffile, man pages
    /// lb(8) and one per verb and bash, zsh and fish completions (written by the binary itself,
    /// `lb generate`), the docs, copyright and changelog under /usr/share/doc/lb. Depends comes
    /// from dpkg-shlibdeps. Prints the package's path. `lintian` checks it
    /// (tests/tests/package.rs does, and installs it into a throwaway root).
    Package {
        /// Build and package the debug binary instead (quick to build, large)
        #[arg(long, conflicts_with = "lb_bin")]
        debug: bool,
        /// Package this already-built `lb` binary: no setup, no build
        #[arg(long, value_name = "PATH")]
        lb_bin: Option<PathBuf>,
        /// Directory for the package and its staging tree [default: target/package]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Compress lightly (xz -1 instead of -6): seconds instead of half a minute for a
        /// debug binary
        #[arg(long)]
        fast: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: print as usual.
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        // Usage errors: one line, exit code 1 like every other failure.
        Err(err) => {
            let rendered = err.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("error: {line} (see `cargo xtask --help`)");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` joins the context chain on one line: "outer: inner: cause".
            let msg = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {}", msg.trim());
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx::new()?;
    match cli.command {
        Command::Setup => setup::setup(&ctx),
        Command::Test { args } => test(&ctx, args),
        Command::Deny => {
            setup::setup(&ctx)?;
            deny(&ctx)
        }
        Command::Demo => demo(&ctx),
        Command::Bench { quick, only, page } => bench(&ctx, quick, &only, page),
        Command::Fuzz {
            cases,
            input_seconds,
            seed,
        } => fuzz(&ctx, cases, input_seconds, seed),
        Command::Chaos { minutes, seed } => chaos(&ctx, minutes, seed),
        Command::Soak { minutes } => soak(&ctx, minutes),
        Command::Package {
            debug,
            lb_bin,
            out,
            fast,
        } => package(
            &ctx,
            &package::Options {
                debug,
                lb_bin,
                out,
                fast,
            },
        ),
    }
}

fn package(ctx: &Ctx, opts: &package::Options) -> Result<()> {
    let lb = match &opts.lb_bin {
        Some(path) if path.is_file() => path.clone(),
        Some(path) => bail!("--lb-bin {}: no such file", path.display()),
        None => {
            header(1, 3, "setup");
            setup::setup(ctx)?;
            let mut build = ctx.cargo();
            build.args(["build", "--package", "lb-userspace", "--bin", "lb"]);
            if !opts.debug {
                build.arg("--release");
            }
            header(2, 3, &ctx::display(&build));
            ctx::run(&mut build)?;
            let lb = ctx
                .target_dir()
                .join(if opts.debug { "debug" } else { "release" })
                .join("lb");
            if !lb.is_file() {
                bail!("{} was not produced by the build", lb.display());
            }
            header(3, 3, "stage and build the package");
            lb
        }
    };
    let deb = package::package(ctx, opts, &lb)?;
    println!("{}", deb.display());
    Ok(())
}

fn fuzz(ctx: &Ctx, cases: u32, input_seconds: u32, seed: Option<u64>) -> Result<()> {
    const STEPS: usize = 3;
    header(1, STEPS, "setup");
    setup::setup(ctx)?;
    let mut run = ctx.cargo();
    run.args([
        "test",
        "--release",
        "-p",
        "lb-tests",
        "--test",
        "fuzz_dataplane",
        "--",
        "--nocapture",
    ]);
    run.env("LB_FUZZ_CASES", cases.to_string());
    if let Some(seed) = seed {
        run.env("LB_FUZZ_SEED", seed.to_string());
    }
    header(2, STEPS, &format!("LB_FUZZ_CASES={cases} {}", ctx::display(&run)));
    ctx::run(&mut run)?;
    let mut inputs = ctx.cargo();
    inputs.args([
        "test",
        "--release",
        "-p",
        "lb-tests",
        "--test",
        "fuzz_inputs",
        "--",
        "--nocapture",
        "--test-threads=1",
    ]);
    inputs.env("LB_FUZZ_INPUT_SECONDS", input_seconds.to_string());
    if let Some(seed) = seed {
        inputs.env("LB_FUZZ_SEED", seed.to_string());
    }
    header(
        3,
        STEPS,
        &format!("LB_FUZZ_INPUT_SECONDS={input_seconds} {}", ctx::display(&inputs)),
    );
    ctx::run(&mut inputs)
}

fn chaos(ctx: &Ctx, minutes: u32, seed: Option<u64>) -> Result<()> {
    const STEPS: usize = 3;
    if minutes == 0 {
        bail!("--minutes 0: a run needs at least a minute");
    }
    header(1, STEPS, "setup");
    setup::setup(ctx)?;
    // A random seed unless given: from the clock, printed so the run replays.
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
    });
    eprintln!(
        "chaos: seed={seed} minutes={minutes} (replay: cargo xtask chaos --minutes {minutes} --seed {seed})"
    );
    // The second build the schedule's program upgrades switch to, then the plain `lb` back.
    build_flow_v2(ctx, |what| header(2, STEPS, what))?;
    let mut plain = ctx.cargo();
    plain.args(["build", "--package", "lb-userspace", "--bin", "lb"]);
    header(2, STEPS, &ctx::display(&plain));
    ctx::run(&mut plain)?;
    let mut run = long_run(ctx, "chaos");
    run.env("LB_CHAOS_SEED", seed.to_string())
        .env("LB_CHAOS_SECONDS", (u64::from(minutes) * 60).to_string());
    header(3, STEPS, &ctx::display(&run));
    ctx::run(&mut run)
}

fn soak(ctx: &Ctx, minutes: u32) -> Result<()> {
    const STEPS: usize = 2;
    // The judge needs 6 samples after the warm-up (60 s): 2 minutes is the shortest run.
    if minutes < 2 {
        bail!("--minutes {minutes}: a soak needs at least 2 minutes (1 of warm-up)");
    }
    header(1, STEPS, "setup");
    setup::setup(ctx)?;
    let seconds = u64::from(minutes) * 60;
    let mut run = long_run(ctx, "soak");
    run.arg("soak_memory_and_descriptors_stay_flat_under_churn");
    run.env("LB_SOAK_SECONDS", seconds.to_string());
    header(2, STEPS, &ctx::display(&run));
    ctx::run(&mut run)
}

/// `cargo test` of lb-tests' test binary `name` (a chaos or soak run): its output as it goes,
/// one test at a time.
fn long_run(ctx: &Ctx, name: &str) -> std::process::Command {
    let mut run = ctx.cargo();
    run.args([
        "test",
        "-p",
        "lb-tests",
        "--test",
        name,
        "--",
        "--nocapture",
        "--test-threads=1",
    ]);
    run
}

/// The upgrade test's and the chaos lab's second `lb` (tests/tests/e2e_upgrade.rs): the same
/// binary name with feature flow-v2, copied aside as lb-flow-v2. The caller's next build of
/// `lb` puts the plain one back.
fn build_flow_v2(ctx: &Ctx, header: impl Fn(&str)) -> Result<()> {
    let mut flow_v2 = ctx.cargo();
    flow_v2.args([
        "build",
        "--package",
        "lb-userspace",
        "--bin",
        "lb",
        "--features",
        "lb-userspace/flow-v2",
    ]);
    header(&ctx::display(&flow_v2));
    ctx::run(&mut flow_v2)?;
    let debug = ctx.target_dir().join("debug");
    std::fs::copy(debug.join("lb"), debug.join("lb-flow-v2")).context("copy lb to lb-flow-v2")?;
    Ok(())
}

fn header(step: usize, total: usize, what: &str) {
    eprintln!("==> [{step}/{total}] {what}");
}

/// Tests whose names hold this run two at a time, after the rest: each builds a lab of its
/// own (router, nodes, etcd) and mostly waits on BGP and etcd, so a second one costs little.
const TWO_AT_A_TIME: &str = "cluster_lab::";

/// Test binaries whose tests are the verifier's and BPF_PROG_TEST_RUN's work, with nothing
/// timed and nothing shared (each in a network namespace of its own), and the name each of
/// their tests holds: they run two at a time, one per core, after the rest.
const CPU_LANE: [(&str, &str); 2] = [
    ("golden", "golden_"),
    ("fuzz_dataplane", "generated_frames_match_the_model"),
];

/// cargo deny: licenses, bans and sources from deny.toml (offline), then advisories if the
/// RustSec database can be fetched (it lives on GitHub, which not every host reaches).
fn deny(ctx: &Ctx) -> Result<()> {
    let mut check = ctx.command("cargo-deny");
    check
        .current_dir(&ctx.root)
        .args(["--locked", "check", "bans", "licenses", "sources"]);
    ctx::run(&mut check)?;
    let mut fetch = ctx.command("cargo-deny");
    fetch.current_dir(&ctx.root).args(["fetch", "db"]);
    let fetched = ctx::output(&mut fetch)?;
    if !fetched.status.success() {
        let why = String::from_utf8_lossy(&fetched.stderr)
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no output")
            .to_string();
        eprintln!("deny: advisories skipped: the RustSec database could not be fetched ({why})");
        return Ok(());
    }
    let mut advisories = ctx.command("cargo-deny");
    advisories
        .current_dir(&ctx.root)
        .args(["--locked", "check", "--disable-fetch", "advisories"]);
    ctx::run(&mut advisories)
}

fn test(ctx: &Ctx, extra: Vec<OsString>) -> Result<()> {
    const STEPS: usize = 7;

    header(1, STEPS, "setup");
    setup::setup(ctx)?;

    header(2, STEPS, "cargo deny (deny.toml)");
    deny(ctx)?;

    build_flow_v2(ctx, |what| header(3, STEPS, what))?;

    let mut build = ctx.cargo();
    // Not --workspace: lb-ebpf only builds for the bpf target (lb-userspace's build.rs does that).
    build.args(["build", "--all-targets"]);
    header(3, STEPS, &ctx::display(&build));
    ctx::run(&mut build)?;

    let mut parser = ctx.cargo();
    parser.args(["test", "-p", "lb-ebpf", "--lib"]);
    header(4, STEPS, &ctx::display(&parser));
    let mut totals = ctx::TestTotals::default();
    ctx::run_tests(&mut parser, &mut totals)?;

    let mut test = ctx.cargo();
    test.args(["test", "--"]);
    // Respect an explicit --test-threads from the caller; default to one thread.
    let has_threads = extra
        .iter()
        .any(|a| a.to_string_lossy().starts_with("--test-threads"));
    // Without the caller's own filters or threads, the lab tests go in a lane of their own.
    let lanes = extra.is_empty();
    if !has_threads {
        test.arg("--test-threads=1");
    }
    if lanes {
        test.args(["--skip", TWO_AT_A_TIME]);
        for (_, name) in CPU_LANE {
            test.args(["--skip", name]);
        }
    }
    test.args(&extra);
    header(5, STEPS, &ctx::display(&test));
    let mut result = ctx::run_tests(&mut test, &mut totals);
    if lanes && result.is_ok() {
        let mut cpu = ctx.cargo();
        cpu.args(["test", "-p", "lb-tests"]);
        for (binary, _) in CPU_LANE {
            cpu.args(["--test", binary]);
        }
        cpu.args(["--", "--test-threads=2"]);
        header(6, STEPS, &ctx::display(&cpu));
        result = ctx::run_tests(&mut cpu, &mut totals);
    }
    if lanes && result.is_ok() {
        let mut labs = ctx.cargo();
        labs.args([
            "test",
            "-p",
            "lb-tests",
            "--test",
            "e2e_cluster",
            "--",
            "--test-threads=2",
            TWO_AT_A_TIME,
        ]);
        header(7, STEPS, &ctx::display(&labs));
        result = ctx::run_tests(&mut labs, &mut totals);
    }
    // One summary over every test binary, as the last line.
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    result?;

    eprintln!("==> all steps passed");
    Ok(())
}

fn bench(ctx: &Ctx, quick: bool, only: &[String], page: bool) -> Result<()> {
    let steps = if page { 4 } else { 3 };
    // What the build below compiles: the page and results.md name it.
    let checkout = page::Checkout::detect(ctx);
    if page {
        // Before the run, not after it.
        page::check(ctx, checkout.as_ref().map_err(|e| anyhow!("{e:#}"))?)?;
    }

    header(1, steps, "setup");
    setup::setup(ctx)?;

    let (bench_bin, lb_bin) = build_with_lb(ctx, "lb-bench", true, 2, steps)?;
    let out = ctx.target_dir().join("bench");
    let mut bench = ctx.command(&bench_bin);
    bench.env("LB_BIN", &lb_bin).arg("--out").arg(&out);
    if let Ok(checkout) = &checkout {
        bench.envs(checkout.env());
    }
    if quick {
        bench.arg("--quick");
    }
    for part in only {
        bench.args(["--only", part]);
    }
    header(3, steps, &ctx::display(&bench));
    ctx::run(&mut bench)?;

    if page {
        header(4, steps, &format!("{} and {}", page::PAGE, page::CHART));
        page::update(ctx, &out)?;
    }
    Ok(())
}

/// Builds lb-tests' binary `tool` and the `lb` binary (in release or debug, as step `step` of
/// `steps`); returns their paths.
fn build_with_lb(
    ctx: &Ctx,
    tool: &str,
    release: bool,
    step: usize,
    steps: usize,
) -> Result<(PathBuf, PathBuf)> {
    let mut build = ctx.cargo();
    build.arg("build");
    if release {
        build.arg("--release");
    }
    build.args([
        "--package",
        "lb-tests",
        "--bin",
        tool,
        "--package",
        "lb-userspace",
        "--bin",
        "lb",
    ]);
    header(step, steps, &ctx::display(&build));
    ctx::run(&mut build)?;

    let dir = ctx.target_dir().join(if release { "release" } else { "debug" });
    let (tool_bin, lb_bin) = (dir.join(tool), dir.join("lb"));
    for bin in [&tool_bin, &lb_bin] {
        if !bin.is_file() {
            bail!("{} was not produced by the build", bin.display());
        }
    }
    Ok((tool_bin, lb_bin))
}

fn demo(ctx: &Ctx) -> Result<()> {
    const STEPS: usize = 4;

    header(1, STEPS, "setup");
    setup::setup(ctx)?;

    let (demo_bin, lb_bin) = build_with_lb(ctx, "lb-demo", false, 2, STEPS)?;

    let mut demo = ctx.command(&demo_bin);
    demo.env("LB_BIN", &lb_bin);
    header(
        3,
        STEPS,
        &format!("LB_BIN={} {}", lb_bin.display(), demo_bin.display()),
    );
    // Replace this process with the demo: its exit code and its handling of
    // Ctrl-C (teardown) then apply directly, with no xtask in between.
    let err = demo.exec();
    Err(err).with_context(|| format!("failed to run {}", demo_bin.display()))
}
