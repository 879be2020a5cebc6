//! `lb`: the daemon and its CLI in one binary.

use clap::FromArgMatches;
use lb_userspace::cli::{self, Cli, Command};

fn main() {
    let cli = cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let json_logs =
        matches!(&cli, Ok(Cli { command: Command::Daemon { log_format, .. }, .. }) if log_format == "json");
    // Colour (the text log's levels) as env_logger's auto-color decides it: only when standard
    // error is a terminal, never when NO_COLOR is set (tests/tests/cli.rs checks both).
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
            eprintln!("{}", usage_error(&e.to_string()));
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
            lb_userspace::failpoints::from_env()?;
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

/// Clap's error on one line: its first paragraph, which says what is wrong and, for missing
/// arguments, names them on the lines beneath (the usage and tips after it are left out).
fn usage_error(text: &str) -> String {
    let line = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if line.is_empty() {
        "error: invalid arguments".to_string()
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn error_of(args: &[&str]) -> String {
        usage_error(&Cli::try_parse_from(args).expect_err("refused").to_string())
    }

    #[test]
    fn usage_errors_are_one_line_naming_what_is_missing() {
        assert_eq!(
            error_of(&["lb", "backend", "add", "web", "b1"]),
            "error: the following required arguments were not provided: --address <ADDRESS>"
        );
        assert_eq!(
            error_of(&["lb", "backend", "add"]),
            "error: the following required arguments were not provided: --address <ADDRESS> <SERVICE> <ID>"
        );
        assert_eq!(
            error_of(&["lb", "status", "--bogus"]),
            "error: unexpected argument '--bogus' found"
        );
    }
}
