//! `lb config`: check a config file as the daemon would, without one; show the running
//! daemon's effective config.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::Value;

use crate::{
    config::ConfigFile,
    preflight::{self, Report},
};

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate a config file whole, as the daemon would (no daemon, no root): each error and
    /// each suspect setting on a line of its own. Exit status 0 valid (warnings allowed),
    /// 1 invalid, 2 unreadable.
    Check { file: PathBuf },
    /// Print the running daemon's effective config as TOML: every default filled in, the
    /// services as they run now.
    Show,
}

/// Exit status of a file that cannot be read (an invalid one: 1).
const UNREADABLE: i32 = 2;

/// `lb config check`; returns the exit status.
pub fn check(file: &Path, json: bool) -> anyhow::Result<i32> {
    let (report, code) = match preflight::check(file) {
        Ok(report) => {
            let code = i32::from(!report.errors.is_empty());
            (report, code)
        }
        Err(unreadable) => (
            Report {
                errors: vec![unreadable.0],
                warnings: Vec::new(),
            },
            UNREADABLE,
        ),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "file": file,
                "valid": code == 0,
                "readable": code != UNREADABLE,
                "errors": report.errors,
                "warnings": report.warnings,
            }))?
        );
        return Ok(code);
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if code == 0 {
        println!("{}: valid ({} warnings)", file.display(), report.warnings.len());
    }
    Ok(code)
}

/// `lb config show`: the daemon's answer (the file's tables as JSON) as TOML.
pub fn print(data: &Value) -> anyhow::Result<()> {
    let file: ConfigFile = serde_json::from_value(data.clone())?;
    print!("{}", toml::to_string(&file)?);
    Ok(())
}
