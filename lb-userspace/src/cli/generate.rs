//! `lb generate man|completions DIR`: the man pages and the shell completions, made from this
//! binary's own command definition so they always describe the CLI they ship with. `cargo
//! xtask package` runs it for the Debian package; a host installed from source runs it too.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use clap::{Args, ValueEnum};
use clap_complete::{Generator, Shell};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to write.
    pub what: Generated,
    /// The directory to write into (created if missing).
    pub dir: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generated {
    /// `lb.8`, and a page per verb and sub-verb: `lb-service.8`, `lb-service-add.8`...
    Man,
    /// `lb.bash`, `_lb` (zsh) and `lb.fish`.
    Completions,
}

/// The man pages' section: system administration commands and daemons.
pub const MAN_SECTION: &str = "8";

/// Shells the completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes what `args` asks for, from `cmd` (the CLI as `lb` runs it); prints each file written.
pub fn run(args: &GenerateArgs, cmd: clap::Command) -> anyhow::Result<i32> {
    fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let written = match args.what {
        Generated::Man => man_pages(cmd, &args.dir)?,
        Generated::Completions => completions(cmd, &args.dir)?,
    };
    for path in written {
        println!("{}", path.display());
    }
    Ok(0)
}

/// One page for `cmd` and one for each of its visible subcommands, at every depth; a page's
/// name is its command line joined by dashes, as git's and cargo's are.
fn man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn page(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            page(sub, dir, written)?;
        }
        let man = clap_mangen::Man::new(cmd)
            .section(MAN_SECTION)
            .source(format!("lb {}", env!("CARGO_PKG_VERSION")))
            .manual("lb manual");
        let path = dir.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text)?;
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        written.push(path);
        Ok(())
    }
    // Built once at the root, so each subcommand's display name is its whole command line
    // (`lb-service-add`) and the global options are on every page.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    page(cmd, dir, &mut written)?;
    Ok(written)
}

fn completions(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    cmd.set_bin_name(&name);
    cmd.build();
    SHELLS
        .iter()
        .map(|shell| {
            let path = dir.join(shell.file_name(&name));
            let mut text = Vec::new();
            shell.try_generate(&cmd, &mut text)?;
            fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// Every verb and sub-verb says what it does: that line is its man page's NAME (lintian's
    /// `bad-whatis-entry` without it) and its line in `--help`.
    #[test]
    fn every_verb_has_a_description() {
        fn check(cmd: &clap::Command, path: &str, bare: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    bare.push(path.clone());
                }
                check(sub, &path, bare);
            }
        }
        let mut bare = Vec::new();
        check(&super::super::command(), "lb", &mut bare);
        assert!(bare.is_empty(), "verbs without a description: {bare:?}");
    }
}
