//! `cargo xtask bench --page`: BENCHMARKS.md quotes the run's results.md between two markers,
//! and shows the run's chart from docs/bench-dataplane.svg.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::ctx::{self, Ctx};

pub const PAGE: &str = "BENCHMARKS.md";
pub const CHART: &str = "docs/bench-dataplane.svg";
const BEGIN: &str = "<!-- results:begin -->";
const END: &str = "<!-- results:end -->";

/// The commit a run measures and the tracked files that differ from it (the page's own
/// files left out): taken before the build, since that is what the bench runs.
pub struct Checkout {
    pub commit: String,
    pub changed: Vec<String>,
}

impl Checkout {
    pub fn detect(ctx: &Ctx) -> Result<Self> {
        let commit = git(ctx, &["rev-parse", "--short=7", "HEAD"])?;
        let changed = git(ctx, &["status", "--porcelain", "--untracked-files=no"])?
            .lines()
            .filter_map(|l| l.get(3..))
            .filter(|path| ![PAGE, CHART].contains(path))
            .map(str::to_string)
            .collect();
        Ok(Self { commit, changed })
    }

    /// For lb-bench, which writes them into results.json and results.md.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("LB_BENCH_COMMIT", self.commit.clone()),
            ("LB_BENCH_DIRTY", u8::from(!self.changed.is_empty()).to_string()),
        ]
    }
}

/// Before a run with `--page`: the page has its markers, and the checkout has no uncommitted
/// changes outside the page's own files (the page names the commit it measured, so that
/// commit must be what ran).
pub fn check(ctx: &Ctx, checkout: &Checkout) -> Result<()> {
    let page = ctx.root.join(PAGE);
    let text = fs::read_to_string(&page).with_context(|| format!("read {}", page.display()))?;
    splice(&text, "").with_context(|| format!("{}", page.display()))?;
    if !checkout.changed.is_empty() {
        bail!(
            "--page measures a commit, but these files have uncommitted changes: {}; commit or \
             stash them first",
            checkout.changed.join(", ")
        );
    }
    Ok(())
}

/// A git command's trimmed stdout in the workspace. The bench runs as root, maybe in someone
/// else's checkout, so the directory is declared safe for this command.
fn git(ctx: &Ctx, args: &[&str]) -> Result<String> {
    let mut cmd = ctx.command("git");
    cmd.arg("-c")
        .arg(format!("safe.directory={}", ctx.root.display()))
        .args(args);
    let out = ctx::output(&mut cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            ctx::display(&cmd),
            ctx::first_line(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// After a run: the results between the page's markers, and the chart beside it.
pub fn update(ctx: &Ctx, bench_dir: &Path) -> Result<()> {
    let results_md = bench_dir.join("results.md");
    let results =
        fs::read_to_string(&results_md).with_context(|| format!("read {}", results_md.display()))?;
    let page = ctx.root.join(PAGE);
    let text = fs::read_to_string(&page).with_context(|| format!("read {}", page.display()))?;
    let text = splice(&text, &results).with_context(|| format!("{}", page.display()))?;
    fs::write(&page, text).with_context(|| format!("write {}", page.display()))?;

    let svg = bench_dir.join("dataplane.svg");
    let chart = ctx.root.join(CHART);
    fs::copy(&svg, &chart).with_context(|| format!("copy {} to {}", svg.display(), chart.display()))?;
    eprintln!("==> wrote {PAGE} (between {BEGIN} and {END}) and {CHART}");
    Ok(())
}

/// `page` with what stands between its markers replaced by `results`; the markers stay.
fn splice(page: &str, results: &str) -> Result<String> {
    let (Some(begin), Some(end)) = (page.find(BEGIN), page.find(END)) else {
        bail!("no `{BEGIN}` … `{END}` markers");
    };
    if page.matches(BEGIN).count() != 1 || page.matches(END).count() != 1 || end < begin {
        bail!("`{BEGIN}` and `{END}` must appear once each, in that order");
    }
    let results = results.trim_end();
    let mut out = String::with_capacity(page.len() + results.len());
    out.push_str(&page[..begin + BEGIN.len()]);
    out.push('\n');
    if !results.is_empty() {
        out.push_str(results);
        out.push('\n');
    }
    out.push_str(&page[end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_what_is_between_the_markers() {
        let page = format!("# Benchmarks\n\nintro\n\n{BEGIN}\nold\nfigures\n{END}\n\nhistory\n");
        let out = splice(&page, "## This run\n\n| a |\n\n").unwrap();
        assert_eq!(
            out,
            format!("# Benchmarks\n\nintro\n\n{BEGIN}\n## This run\n\n| a |\n{END}\n\nhistory\n")
        );
        // Twice gives the same page.
        assert_eq!(splice(&out, "## This run\n\n| a |\n").unwrap(), out);
        assert_eq!(
            splice(&page, "").unwrap(),
            format!("# Benchmarks\n\nintro\n\n{BEGIN}\n{END}\n\nhistory\n")
        );
    }

    #[test]
    fn splice_refuses_a_page_without_exactly_one_pair_of_markers() {
        assert!(splice("no markers", "x").is_err());
        assert!(splice(&format!("{END}\n{BEGIN}"), "x").is_err());
        assert!(splice(&format!("{BEGIN}\n{END}\n{BEGIN}\n{END}"), "x").is_err());
        assert!(splice(&format!("{BEGIN} only"), "x").is_err());
    }
}
