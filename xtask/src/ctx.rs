//! Locations, the environment given to child processes, and running them.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, anyhow, bail};

/// Everything child processes need: where the workspace is, which cargo to
/// use, and a PATH that includes cargo's bin directory (for bpf-linker).
pub struct Ctx {
    pub root: PathBuf,
    cargo: OsString,
    pub cargo_bin: PathBuf,
    path: OsString,
}

impl Ctx {
    pub fn new() -> Result<Self> {
        let cargo = env::var_os("CARGO")
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "cargo".into());

        let cargo_home = match env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
            Some(home) => PathBuf::from(home),
            None => {
                let home = env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .context("neither CARGO_HOME nor HOME is set")?;
                PathBuf::from(home).join(".cargo")
            }
        };
        let cargo_bin = cargo_home.join("bin");

        // Prepend cargo's bin directory unless it is already on PATH, so that a
        // freshly installed bpf-linker is found by this and every child process.
        let old_path = env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = env::split_paths(&old_path).collect();
        if !dirs.iter().any(|d| d == &cargo_bin) {
            dirs.insert(0, cargo_bin.clone());
        }
        let path = env::join_paths(dirs).context("PATH contains an invalid entry")?;

        let mut ctx = Ctx {
            root: PathBuf::new(),
            cargo,
            cargo_bin,
            path,
        };
        ctx.root = ctx.find_root()?;
        Ok(ctx)
    }

    /// The workspace root: the parent of this crate's manifest directory, or
    /// what `cargo locate-project --workspace` says if that has moved.
    fn find_root(&self) -> Result<PathBuf> {
        let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        if let Some(parent) = manifest_dir.parent().filter(|p| p.join("Cargo.toml").is_file()) {
            return Ok(parent.to_path_buf());
        }
        let mut locate = self.command(&self.cargo);
        locate.args(["locate-project", "--workspace", "--message-format", "plain"]);
        let out = output(&mut locate)?;
        if !out.status.success() {
            bail!(
                "cannot find the workspace root: `{}` failed: {}",
                display(&locate),
                first_line(&out.stderr)
            );
        }
        let manifest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        manifest
            .parent()
            .map(Path::to_path_buf)
            .context("cannot find the workspace root")
    }

    /// A command run from the workspace root with the augmented PATH.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref();
        // Resolve bare names against our PATH ourselves, so lookup never
        // depends on the PATH this process was started with.
        let resolved = if Path::new(program).components().count() == 1 {
            self.which(program).map(PathBuf::into_os_string)
        } else {
            None
        };
        let mut cmd = Command::new(resolved.as_deref().unwrap_or(program));
        cmd.env("PATH", &self.path).current_dir(&self.root);
        cmd
    }

    /// A cargo command (the cargo that runs xtask, from $CARGO, if known).
    pub fn cargo(&self) -> Command {
        self.command(&self.cargo)
    }

    /// The first executable named `name` on the augmented PATH.
    pub fn which(&self, name: &OsStr) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        env::split_paths(&self.path).map(|dir| dir.join(name)).find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
    }

    /// Cargo's target directory ($CARGO_TARGET_DIR, else `<root>/target`).
    pub fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }
}

/// Human-readable form of a command: extra env vars (except PATH), program
/// name and arguments.
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "PATH")
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())))
        .collect();
    let program = Path::new(cmd.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    parts.push(name.to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

fn spawn_error(cmd: &Command, err: io::Error) -> anyhow::Error {
    let name = display_program(cmd);
    if err.kind() == io::ErrorKind::NotFound {
        anyhow!("`{name}` not found on PATH")
    } else {
        anyhow!("failed to start `{name}`: {err}")
    }
}

fn display_program(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// Run with inherited stdio; fail unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| spawn_error(cmd, e))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Run capturing stdout and stderr; the exit status is left to the caller.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().map_err(|e| spawn_error(cmd, e))
}

/// The first non-empty line of some output, for one-line error messages.
pub fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
        .to_string()
}

/// Totals of cargo test's `test result:` lines.
#[derive(Default, Clone, Copy)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// Runs a `cargo test` command, echoing its stdout and adding up its `test result:` lines.
pub fn run_tests(cmd: &mut Command, totals: &mut TestTotals) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        let _ = std::io::stdout().flush();
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => totals.passed += n,
                    "failed" => totals.failed += n,
                    "ignored" => totals.ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}
