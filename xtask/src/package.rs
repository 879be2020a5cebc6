//! `cargo xtask package`: the Debian package, built with dpkg's own tools from a tree staged
//! here as debhelper would lay it out (`debian/lb/...`): dpkg-shlibdeps computes Depends,
//! dpkg-deb builds the archive with every file owned by root.
//!
//! What goes in, and where, is [`layout`]; the man pages and completions come from the packaged
//! binary itself (`lb generate`), so they describe exactly the CLI that ships.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::ctx::{self, Ctx};

pub const NAME: &str = "lb";
/// The Debian revision: the package is built from upstream's tree, not a Debian source.
const REVISION: &str = "1";
/// Who answers for the package when DEBFULLNAME / DEBEMAIL (dch's variables) are not set: a
/// reserved domain, since the project has no address of its own yet; whoever publishes the
/// package sets theirs.
const MAINTAINER: &str = "lb developers <maintainers@lb.invalid>";
const SECTION: &str = "net";
const SYNOPSIS: &str = "layer-4 TCP/UDP load balancer with an XDP data plane";
const DESCRIPTION: &str = "\
lb balances TCP and UDP flows to backends in XDP, at the earliest point of
the Linux receive path: Maglev consistent hashing or one of seven other
strategies, and L2 DSR, IPIP, GUE or NAT per service. A daemon keeps the
data plane's tables, checks the backends' health, and serves a CLI, an
HTTP/JSON API and Prometheus metrics.
.
The service is installed but neither enabled nor started: edit
/etc/lb/lb.toml, check it with `lb config check`, then enable lb.service.";

/// Where each part goes in the installed system.
pub mod layout {
    pub const BINARY: &str = "usr/sbin/lb";
    /// Bookworm's systemd and debhelper still use /lib (the /usr move came after).
    pub const UNIT: &str = "lib/systemd/system/lb.service";
    pub const CONFIG: &str = "etc/lb/lb.toml";
    pub const MAN_DIR: &str = "usr/share/man/man8";
    pub const BASH: &str = "usr/share/bash-completion/completions/lb";
    pub const ZSH: &str = "usr/share/zsh/vendor-completions/_lb";
    pub const FISH: &str = "usr/share/fish/vendor_completions.d/lb.fish";
    pub const DOC_DIR: &str = "usr/share/doc/lb";
    pub const OVERRIDES: &str = "usr/share/lintian/overrides/lb";
}

/// The source files the package is made from, relative to the workspace root.
const UNIT_SOURCE: &str = "scripts/lb.service";
const CONFIG_SOURCE: &str = "scripts/lb.toml";
const COPYRIGHT_SOURCE: &str = "scripts/debian/copyright";
/// Tags that do not apply to this package, each with its reason (lintian reads them there).
const OVERRIDES_SOURCE: &str = "scripts/debian/lintian-overrides";
/// Documents copied under /usr/share/doc/lb as they are in the tree (so their links work).
const DOCS: &[&str] = &["README.md", "docs"];
/// The unit's ExecStart for a binary installed from source; the package's binary is elsewhere.
const SOURCE_EXEC: &str = "ExecStart=/usr/local/bin/lb ";

pub struct Options {
    /// Build and package the debug binary (quicker to build; the tests package theirs).
    pub debug: bool,
    /// Package this binary instead of building one.
    pub lb_bin: Option<PathBuf>,
    /// Where the staging tree and the .deb go (default: target/package).
    pub out: Option<PathBuf>,
    /// Compress lightly (xz -1): a debug binary at the default level takes half a minute.
    pub fast: bool,
}

/// Builds the package; returns the .deb's path.
pub fn package(ctx: &Ctx, opts: &Options, lb: &Path) -> Result<PathBuf> {
    for (tool, package) in [
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("strip", "binutils"),
        ("gzip", "gzip"),
        ("md5sum", "coreutils"),
    ] {
        if ctx.which(tool.as_ref()).is_none() {
            bail!("{tool} not found (fix: apt-get install {package}, or run `cargo xtask setup`)");
        }
    }
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| ctx.target_dir().join("package"));
    let work = out.join("work");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    // debian/lb is where dpkg-shlibdeps expects a package's files (it reads debian/control).
    let stage = work.join("debian").join(NAME);
    fs::create_dir_all(&stage).with_context(|| format!("create {}", stage.display()))?;
    write(&work.join("debian/control"), "", 0o644)?;

    let version = format!("{}-{REVISION}", env!("CARGO_PKG_VERSION"));
    let arch = stdout_of(ctx.command("dpkg").arg("--print-architecture"))?;

    let binary = stage.join(layout::BINARY);
    mkdir(binary.parent().expect("has a parent"))?;
    let mut strip = ctx.command("strip");
    // As dh_strip does for an executable.
    strip
        .args([
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
            "-o",
        ])
        .arg(&binary)
        .arg(lb);
    ctx::run(&mut strip)?;
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))?;

    generated(ctx, &binary, &work, &stage)?;
    unit(ctx, &stage)?;
    copy(&ctx.root.join(CONFIG_SOURCE), &stage.join(layout::CONFIG))?;
    copy(&ctx.root.join(OVERRIDES_SOURCE), &stage.join(layout::OVERRIDES))?;
    docs(ctx, &stage, &version)?;

    let depends = shlib_depends(ctx, &work)?;
    let control = control(&version, &arch, &depends, installed_size(&stage)?);
    let meta = stage.join("DEBIAN");
    write(&meta.join("control"), &control, 0o644)?;
    write(&meta.join("conffiles"), &format!("/{}\n", layout::CONFIG), 0o644)?;
    md5sums(ctx, &stage)?;
    directory_modes(&stage)?;

    let deb = out.join(format!("{NAME}_{version}_{arch}.deb"));
    let mut build = ctx.command("dpkg-deb");
    build.args(["--root-owner-group", "-Zxz"]);
    if opts.fast {
        build.arg("-z1");
    }
    build.arg("--build").arg(&stage).arg(&deb);
    let built = ctx::output(&mut build)?;
    if !built.status.success() {
        bail!(
            "`{}` failed: {}",
            ctx::display(&build),
            ctx::first_line(&built.stderr)
        );
    }
    Ok(deb)
}

/// The man pages and completions, written by the packaged binary from its own CLI definition.
fn generated(ctx: &Ctx, binary: &Path, work: &Path, stage: &Path) -> Result<()> {
    let made = work.join("generated");
    for what in ["man", "completions"] {
        let mut generate = ctx.command(binary);
        generate.args(["generate", what]).arg(made.join(what));
        let out = ctx::output(&mut generate)?;
        if !out.status.success() {
            bail!(
                "`{}` failed: {}",
                ctx::display(&generate),
                ctx::first_line(&out.stderr)
            );
        }
    }
    let man = stage.join(layout::MAN_DIR);
    mkdir(&man)?;
    let mut pages = Vec::new();
    for entry in fs::read_dir(made.join("man"))? {
        let page = entry?.path();
        let dest = man.join(page.file_name().expect("a file"));
        copy(&page, &dest)?;
        pages.push(dest);
    }
    if pages.is_empty() {
        bail!("`lb generate man` wrote no page");
    }
    gzip(ctx, &pages)?;
    for (file, dest) in [
        ("lb.bash", layout::BASH),
        ("_lb", layout::ZSH),
        ("lb.fish", layout::FISH),
    ] {
        copy(&made.join("completions").join(file), &stage.join(dest))?;
    }
    Ok(())
}

/// The systemd unit, its ExecStart pointed at the packaged binary.
fn unit(ctx: &Ctx, stage: &Path) -> Result<()> {
    let source = ctx.root.join(UNIT_SOURCE);
    let text = fs::read_to_string(&source).with_context(|| format!("read {}", source.display()))?;
    let execs = text.lines().filter(|l| l.starts_with(SOURCE_EXEC)).count();
    if execs != 1 {
        bail!(
            "{UNIT_SOURCE}: expected one line starting with `{SOURCE_EXEC}`, found {execs} (the package points it at /{})",
            layout::BINARY
        );
    }
    let packaged = text.replace(SOURCE_EXEC, &format!("ExecStart=/{} ", layout::BINARY));
    write(&stage.join(layout::UNIT), &packaged, 0o644)
}

/// /usr/share/doc/lb: the project's docs, its copyright, and the Debian changelog lintian asks
/// of every package.
fn docs(ctx: &Ctx, stage: &Path, version: &str) -> Result<()> {
    let doc = stage.join(layout::DOC_DIR);
    for item in DOCS {
        copy_tree(&ctx.root.join(item), &doc.join(item))?;
    }
    copy(&ctx.root.join(COPYRIGHT_SOURCE), &doc.join("copyright"))?;
    let (commit, date) = commit_and_date(ctx)?;
    let changelog = doc.join("changelog.Debian");
    write(
        &changelog,
        &format!(
            "{NAME} ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask package` from commit {commit}.\n\n -- {}  {date}\n",
            maintainer()
        ),
        0o644,
    )?;
    gzip(ctx, &[changelog])
}

/// The commit built and its date in RFC 2822 (the changelog's date, so a rebuild of one commit
/// gives the same file); `SOURCE_DATE_EPOCH` wins, as reproducible builds set it.
fn commit_and_date(ctx: &Ctx) -> Result<(String, String)> {
    let mut log = ctx.command("git");
    log.args(["log", "-1", "--format=%h %ct"]);
    let out = ctx::output(&mut log).ok().filter(|o| o.status.success());
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let (commit, committed) = match text.as_deref().and_then(|t| t.split_once(' ')) {
        Some((c, t)) => (c.to_string(), t.to_string()),
        None => ("unknown".to_string(), "0".to_string()),
    };
    let epoch = std::env::var("SOURCE_DATE_EPOCH").unwrap_or(committed);
    let date = stdout_of(
        ctx.command("date")
            .env("LC_ALL", "C")
            .args(["-u", "-R", "-d"])
            .arg(format!("@{epoch}")),
    )?;
    Ok((commit, date))
}

fn maintainer() -> String {
    match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(email)) if !name.is_empty() && !email.is_empty() => format!("{name} <{email}>"),
        _ => MAINTAINER.to_string(),
    }
}

/// Depends for the binary's shared libraries, as dpkg-shlibdeps finds them.
fn shlib_depends(ctx: &Ctx, work: &Path) -> Result<String> {
    let mut shlibdeps = ctx.command("dpkg-shlibdeps");
    shlibdeps.current_dir(work).arg("-O").arg(format!(
        "-e{}",
        Path::new("debian").join(NAME).join(layout::BINARY).display()
    ));
    let line = stdout_of(&mut shlibdeps)?;
    line.strip_prefix("shlibs:Depends=")
        .map(str::to_string)
        .with_context(|| format!("dpkg-shlibdeps said {line:?}, not shlibs:Depends=..."))
}

fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    let description: String = DESCRIPTION.lines().map(|l| format!(" {l}\n")).collect();
    format!(
        "Package: {NAME}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {}\n\
         Installed-Size: {installed_kib}\nDepends: {depends}\nSection: {SECTION}\nPriority: optional\n\
         Description: {SYNOPSIS}\n{description}",
        maintainer()
    )
}

/// As dpkg-gencontrol counts it: each file's size in KiB rounded up, one for each directory.
fn installed_size(stage: &Path) -> Result<u64> {
    let mut kib = 0;
    for path in walk(stage)? {
        let meta = fs::symlink_metadata(&path)?;
        kib += if meta.is_file() {
            meta.len().div_ceil(1024)
        } else {
            1
        };
    }
    Ok(kib)
}

/// DEBIAN/md5sums: every file but the conffile (dpkg keeps conffiles' sums itself).
fn md5sums(ctx: &Ctx, stage: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = walk(stage)?
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| p.strip_prefix(stage).ok().map(Path::to_path_buf))
        .filter(|p| !p.starts_with("DEBIAN") && p != Path::new(layout::CONFIG))
        .collect();
    files.sort();
    let mut md5 = ctx.command("md5sum");
    md5.current_dir(stage).arg("--").args(&files);
    let sums = ctx::output(&mut md5)?;
    if !sums.status.success() {
        bail!("`md5sum` failed: {}", ctx::first_line(&sums.stderr));
    }
    write(
        &stage.join("DEBIAN/md5sums"),
        &String::from_utf8_lossy(&sums.stdout),
        0o644,
    )
}

/// Every path under `dir` (not `dir` itself), depth first.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        found.push(path.clone());
        if fs::symlink_metadata(&path)?.is_dir() {
            found.extend(walk(&path)?);
        }
    }
    Ok(found)
}

/// gzip -9n, in place (no name, no timestamp: the same input gives the same bytes).
fn gzip(ctx: &Ctx, files: &[PathBuf]) -> Result<()> {
    let mut gzip = ctx.command("gzip");
    gzip.args(["-9n", "--"]).args(files);
    ctx::run(&mut gzip)
}

fn stdout_of(cmd: &mut std::process::Command) -> Result<String> {
    let out = ctx::output(cmd)?;
    if !out.status.success() {
        bail!("`{}` failed: {}", ctx::display(cmd), ctx::first_line(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))
}

/// Directories 0755 whatever the umask they were made under.
fn directory_modes(stage: &Path) -> Result<()> {
    for path in std::iter::once(stage.to_path_buf()).chain(walk(stage)?) {
        if fs::symlink_metadata(&path)?.is_dir() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    mkdir(path.parent().expect("has a parent"))?;
    fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies one file, mode 0644.
fn copy(from: &Path, to: &Path) -> Result<()> {
    mkdir(to.parent().expect("has a parent"))?;
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if !from.is_dir() {
        return copy(from, to);
    }
    for entry in fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let path = entry?.path();
        copy_tree(&path, &to.join(path.file_name().expect("an entry")))?;
    }
    Ok(())
}
