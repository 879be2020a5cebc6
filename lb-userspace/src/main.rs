//! `lb`: the daemon and its CLI in one binary.

use clap::Parser;
use lb_userspace::cli::{self, Cli, Command};

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
        _ => cli::run(cli),
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}
