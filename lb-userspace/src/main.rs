//! `lb`: the daemon and its CLI in one binary.

use clap::Parser;
use lb_userspace::{
    cli::{BackendHostCmd, Cli, Command, run_client},
    config, dataplane,
};

fn main() {
    let cli = Cli::try_parse();
    let json_logs =
        matches!(&cli, Ok(Cli { command: Command::Daemon { log_format, .. }, .. }) if log_format == "json");
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if json_logs {
        logger.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    logger.init();
    let cli = match cli {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line: clap's first line says what is wrong.
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid arguments"));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: &Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Daemon { config, .. } => {
            // Start-up on this thread alone; then only what the daemon keeps, before the
            // runtime's threads exist (they inherit it).
            let prepared = lb_userspace::daemon::prepare(config.clone())?;
            let kept = lb_userspace::privileges::drop_to_runtime(&prepared.keeps())?;
            log::info!(
                "capabilities kept: {}",
                kept.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(lb_userspace::daemon::run(prepared))?;
            Ok(0)
        }
        Command::Detach => {
            let socket = config::socket_path(&cli.run_dir, &cli.instance);
            if socket.exists()
                && lb_userspace::api::call(
                    &socket,
                    &lb_userspace::api::Request::Shutdown,
                    std::time::Duration::from_secs(5),
                )
                .is_ok()
            {
                wait_gone(&socket);
            }
            // Withdraw first: BIRD's sessions close and the routers stop sending here before
            // the program goes.
            let bird = lb_userspace::bgp::bird::Paths::new(&cli.run_dir, &cli.instance);
            if lb_userspace::bgp::bird::stop(&bird).map_err(|e| anyhow::anyhow!("{e}"))? {
                log::info!("stopped BIRD: this node's VIPs are withdrawn");
            }
            let mut removed = dataplane::detach_instance(&cli.instance)?;
            // A daemon that stopped without closing it leaves its check path behind.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if rt.block_on(dataplane::steer::remove_instance(&cli.instance)) {
                removed.push(dataplane::steer::device_names(&cli.instance).0);
            }
            let _ = std::fs::remove_file(config::state_path(&cli.run_dir, &cli.instance));
            if cli.json {
                println!("{}", serde_json::json!({ "removed": removed }));
            } else {
                println!(
                    "detached instance {} ({} pins removed)",
                    cli.instance,
                    removed.len()
                );
            }
            Ok(0)
        }
        Command::BackendHost(cmd) => backend_host(cmd, cli.json),
        _ => run_client(cli),
    }
}

fn backend_host(cmd: &BackendHostCmd, json: bool) -> anyhow::Result<i32> {
    use lb_userspace::backend_host as host;
    match cmd {
        BackendHostCmd::Setup(a) => {
            let trust = host::Trust::new(&a.sources, &a.addresses);
            let changed = host::setup(&a.interface, &a.vips, a.gue_port, &trust)?;
            if json {
                println!("{}", serde_json::json!({ "changed": changed }));
            } else if changed.is_empty() {
                println!("{}: already set up", a.interface);
            } else {
                for c in changed {
                    println!("{c}");
                }
            }
            Ok(0)
        }
        BackendHostCmd::Check(a) => {
            let trust = host::Trust::new(&a.sources, &a.addresses);
            let findings = host::check(&a.interface, &a.vips, a.gue_port, &trust)?;
            let bad = findings.iter().filter(|f| !f.ok).count();
            if json {
                println!("{}", serde_json::json!({ "ok": bad == 0, "findings": findings }));
            } else {
                for f in &findings {
                    match &f.fix {
                        Some(fix) if !f.ok => println!("FAIL {} (fix: {fix})", f.what),
                        _ => println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.what),
                    }
                }
            }
            Ok(if bad == 0 { 0 } else { 1 })
        }
        BackendHostCmd::Teardown { interface } => {
            let removed = host::teardown(interface)?;
            if json {
                println!("{}", serde_json::json!({ "removed": removed }));
            } else if removed {
                println!("{interface}: decapsulator detached");
            } else {
                println!("{interface}: no decapsulator was set up");
            }
            Ok(0)
        }
    }
}

/// Waits (bounded) for a stopping daemon to remove its socket.
fn wait_gone(socket: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}
