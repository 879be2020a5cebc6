//! The Debian package (`cargo xtask package`), made from the debug `lb` this suite built, so no
//! release build: `dpkg-deb --contents` lists every file it promises, lintian has no error or
//! warning about it, and `dpkg -i` installs it into a throwaway root, whose `lb --version` runs
//! and whose example config passes `lb config check`.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Output},
    time::Instant,
};

/// A directory removed on drop, also when the test fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd`; its stdout, or a failure that shows what it said.
fn run(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The man page of `cmd` and of each visible subcommand at every depth, named as man pages
/// name them (`lb-service-add`): read from the CLI's definition, not from what was generated.
fn page_names(cmd: &clap::Command, prefix: &str, names: &mut Vec<String>) {
    let name = if prefix.is_empty() {
        cmd.get_name().to_string()
    } else {
        format!("{prefix}-{}", cmd.get_name())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page_names(sub, &name, names);
    }
    names.push(name);
}

#[test]
fn the_package_holds_what_it_promises_passes_lintian_and_installs() {
    let started = Instant::now();
    let (lb, xtask) = (lb_tests::lb_bin(), lb_tests::xtask_bin());
    for bin in [&lb, &xtask] {
        assert!(
            bin.is_file(),
            "{} not built (cargo build -p lb-userspace -p xtask)",
            bin.display()
        );
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("lb-package-{}", std::process::id())));
    let deb = PathBuf::from(
        run(Command::new(&xtask)
            .args(["package", "--fast", "--lb-bin"])
            .arg(&lb)
            .arg("--out")
            .arg(&scratch.0))
        .trim(),
    );
    let packaged = started.elapsed();

    // Every file promised.
    let listing: BTreeSet<String> = run(Command::new("dpkg-deb").arg("--contents").arg(&deb))
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let mut pages = Vec::new();
    page_names(&lb_userspace::cli::command(), "", &mut pages);
    for verb in ["lb", "lb-service", "lb-backend", "lb-config-check", "lb-generate"] {
        assert!(pages.iter().any(|p| p == verb), "{verb} in {pages:?}");
    }
    let promised: Vec<String> = [
        "/usr/sbin/lb",
        "/lib/systemd/system/lb.service",
        "/etc/lb/lb.toml",
        "/usr/share/bash-completion/completions/lb",
        "/usr/share/zsh/vendor-completions/_lb",
        "/usr/share/fish/vendor_completions.d/lb.fish",
        "/usr/share/doc/lb/copyright",
        "/usr/share/doc/lb/changelog.Debian.gz",
        "/usr/share/doc/lb/README.md",
        "/usr/share/doc/lb/docs/config.md",
        "/usr/share/doc/lb/docs/cli.md",
    ]
    .into_iter()
    .map(String::from)
    .chain(pages.iter().map(|p| format!("/usr/share/man/man8/{p}.8.gz")))
    .collect();
    let missing: Vec<&String> = promised.iter().filter(|p| !listing.contains(*p)).collect();
    assert!(missing.is_empty(), "missing from the package: {missing:?}");
    assert_eq!(
        run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles")),
        "/etc/lb/lb.toml\n"
    );

    // lintian: no error, no warning (its info tags are printed, not failed on).
    let linted = Instant::now();
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--display-info"])
        .arg(&deb)
        .output()
        .expect("lintian (Debian: lintian) is needed for this test");
    let tags = String::from_utf8_lossy(&out.stdout);
    println!("lintian ({:.1}s):\n{tags}", linted.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "lintian: {tags}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Installed into a throwaway root whose dpkg database holds this host's records of the
    // libraries the package depends on, so dpkg checks Depends against the versions here.
    let root = scratch.0.join("root");
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates"] {
        std::fs::create_dir_all(admin.join(dir)).expect("dpkg database");
    }
    let depends = run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg("Depends"));
    let libraries: Vec<&str> = depends
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .collect();
    assert!(libraries.contains(&"libc6"), "Depends: {depends}");
    let status = run(Command::new("dpkg-query").arg("--status").args(&libraries));
    std::fs::write(admin.join("status"), status).expect("dpkg status");
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .arg("--install")
        .arg(&deb));
    let record = run(Command::new("dpkg-query")
        .arg(format!("--admindir={}", admin.display()))
        .args(["--show", "--showformat=${Status}\n${Conffiles}\n", "lb"]));
    let fields: Vec<&str> = record.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(fields.first(), Some(&"install ok installed"), "{record}");
    assert!(
        fields
            .get(1)
            .and_then(|c| c.strip_prefix("/etc/lb/lb.toml "))
            .is_some_and(|md5| md5.len() == 32),
        "the conffile is registered: {record}"
    );

    let installed = |p: &str| root.join(p.trim_start_matches('/'));
    let version = run(Command::new(installed("/usr/sbin/lb")).arg("--version"));
    assert_eq!(version.trim_end(), format!("lb {}", lb_userspace::version()));

    // The unit starts the installed binary on the installed config.
    let unit = std::fs::read_to_string(installed("/lib/systemd/system/lb.service")).expect("unit");
    let exec: Vec<&str> = unit.lines().filter(|l| l.starts_with("ExecStart=")).collect();
    assert_eq!(exec, ["ExecStart=/usr/sbin/lb daemon --config /etc/lb/lb.toml"]);

    // The example config is valid but for an interface this host may not have.
    let check = Command::new(installed("/usr/sbin/lb"))
        .args(["config", "check", "--json"])
        .arg(installed("/etc/lb/lb.toml"))
        .output()
        .expect("lb config check");
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("JSON report");
    let errors = report["errors"].as_array().expect("errors");
    assert!(errors.iter().all(|e| e == "unknown interface eth0"), "{report}");
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");

    // bash loads the completion and completes `lb` with it.
    let bash = installed("/usr/share/bash-completion/completions/lb");
    let complete = run(Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p lb", bash.display())));
    assert!(complete.trim_end().ends_with(" lb"), "{complete}");
    println!(
        "packaged in {:.1}s, whole test {:.1}s",
        packaged.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
