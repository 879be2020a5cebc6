use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    git_commit();
    quiet_ebpf_build();
    // The upgrade test's build carries its `FlowState` into the data plane too.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_FLOW_V2").is_some() {
        &["flow-v2"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

/// aya-build runs a second cargo for the eBPF crate and turns every line that cargo writes to
/// stderr into a `cargo:warning`, so its progress lines ("Compiling lb-ebpf", "Finished") show
/// up as warnings of this package on every build that compiles the eBPF crate. aya-build 0.2.0
/// has no option for that; the inner cargo inherits this process's environment, so cargo's own
/// `term.quiet` setting, as `CARGO_TERM_QUIET`, silences its status lines. Compiler errors and
/// warnings still come through (aya-build reads them from the JSON messages on stdout and a
/// failed build still fails this script). `CARGO_TERM_VERBOSE=true` keeps the progress lines
/// (cargo refuses quiet and verbose together, and a verbose build asked for them).
fn quiet_ebpf_build() {
    const QUIET: &str = "CARGO_TERM_QUIET";
    const VERBOSE: &str = "CARGO_TERM_VERBOSE";
    println!("cargo:rerun-if-env-changed={QUIET}");
    println!("cargo:rerun-if-env-changed={VERBOSE}");
    let verbose = std::env::var(VERBOSE).is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if !verbose && std::env::var_os(QUIET).is_none() {
        // SAFETY: a build script's main thread, before aya-build starts any thread or child;
        // nothing else reads or writes the environment concurrently.
        unsafe { std::env::set_var(QUIET, "true") };
    }
}

/// The commit this is built from, for `lb --version` (`LB_GIT_COMMIT`; "unknown" outside a git
/// checkout). Built again when HEAD moves (its reflog changes on every commit and checkout).
fn git_commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(log) = git(&["rev-parse", "--path-format=absolute", "--git-path", "logs/HEAD"]) {
        println!("cargo:rerun-if-changed={log}");
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LB_GIT_COMMIT={commit}");
}
