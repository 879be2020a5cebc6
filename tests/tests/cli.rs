//! The CLI without a daemon: usage errors on one line that name what is missing;
//! `LB_INSTANCE` / `LB_RUN_DIR` standing in for `--instance` / `--run-dir` (the flags win);
//! `--version` naming the commit and the eBPF object; colour only on a terminal, and never with
//! `NO_COLOR`.

use std::process::{Command, Output};

fn lb(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(lb_tests::lb_bin());
    cmd.env_remove("LB_INSTANCE").env_remove("LB_RUN_DIR");
    cmd.envs(env.iter().copied()).args(args).output().expect("run lb")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim_end().to_string()
}

#[test]
fn a_missing_argument_is_named_on_one_line() {
    let out = lb(&[], &["backend", "add", "web", "b1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        stderr(&out),
        "error: the following required arguments were not provided: --address <ADDRESS>"
    );
    let out = lb(&[], &["config", "check"]);
    assert_eq!(
        stderr(&out),
        "error: the following required arguments were not provided: <FILE>"
    );
}

#[test]
fn the_environment_names_the_instance_and_run_dir_and_flags_win() {
    let socket_of = |out: &Output| {
        let err = stderr(out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        err.split_once("cannot reach the daemon at ")
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(socket, _)| socket.to_string())
            .unwrap_or_else(|| panic!("{err}"))
    };
    let dir = "/nonexistent-lb-run";
    let env = [("LB_INSTANCE", "edge-1"), ("LB_RUN_DIR", dir)];
    assert_eq!(socket_of(&lb(&env, &["status"])), format!("{dir}/edge-1.sock"));
    assert_eq!(
        socket_of(&lb(
            &env,
            &[
                "--instance",
                "edge-2",
                "--run-dir",
                "/nonexistent-other",
                "status"
            ]
        )),
        "/nonexistent-other/edge-2.sock"
    );
    assert_eq!(
        socket_of(&lb(&[], &["--run-dir", dir, "status"])),
        format!("{dir}/default.sock")
    );
    // Checked as the flag is.
    let out = lb(&[("LB_INSTANCE", "../x")], &["status"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("invalid instance \"../x\""),
        "{}",
        stderr(&out)
    );
}

/// `lb --version`: the version, the commit built and the embedded data plane's hash, as the
/// library this test is built with computes them.
#[test]
fn version_names_the_commit_and_the_ebpf_object() {
    for flag in ["--version", "-V"] {
        let out = lb(&[], &[flag]);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        assert_eq!(text, format!("lb {}", lb_userspace::version()));
        let (commit, object) = text
            .strip_prefix(&format!("lb {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.split_once(", eBPF object "))
            .unwrap_or_else(|| panic!("{text}"));
        let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
        assert!(hex(commit, 12) || commit == "unknown", "{text}");
        assert!(hex(object, 16), "{text}");
    }
}

/// A clean environment for the colour checks: none of the variables that force or forbid
/// colour (CI, CLICOLOR, CLICOLOR_FORCE, RUST_LOG_STYLE, NO_COLOR) unless given, and a TERM
/// that supports it.
fn plain_env(cmd: &mut Command, env: &[(&str, &str)]) {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "xterm-256color")
        .envs(env.iter().copied());
}

/// Runs lb on a pseudo-terminal (util-linux's `script`, in every Debian system); what it
/// wrote there, standard output and error together.
fn on_a_terminal(env: &[(&str, &str)], args: &[&str]) -> String {
    let line = std::iter::once(lb_tests::lb_bin().display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .map(|a| {
            assert!(!a.contains('\''), "{a}");
            format!("'{a}'")
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    plain_env(&mut cmd, env);
    let out = cmd
        .args(["--quiet", "--command", &line, "/dev/null"])
        .output()
        .expect("script (Debian: bsdutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Colour (the daemon's log levels) only on a terminal, and not there when `NO_COLOR` is set;
/// `lb top`'s live view, which draws with escape codes, refuses a pipe in one line.
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    const ESC: char = '\u{1b}';
    let dir = std::env::temp_dir().join(format!("lb-colour-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // A daemon that logs a line at start, then stops at its interface, which does not exist.
    let config = dir.join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\ninstance = \"colour\"\ninterfaces = [\"lbnocolour0\"]\nrun_dir = \"{}\"\n",
            dir.join("run").display()
        ),
    )
    .expect("config");
    let daemon = ["daemon", "--config", config.to_str().expect("path")];

    let shown = on_a_terminal(&[], &daemon);
    let with_no_color = on_a_terminal(&[("NO_COLOR", "1")], &daemon);
    let mut piped = Command::new(lb_tests::lb_bin());
    plain_env(&mut piped, &[]);
    let piped = piped.args(daemon).output().expect("run lb");
    let _ = std::fs::remove_dir_all(&dir);

    assert!(shown.contains("unknown interface lbnocolour0"), "{shown:?}");
    assert!(shown.contains(ESC), "a terminal gets colour: {shown:?}");
    assert!(with_no_color.contains(" INFO "), "{with_no_color:?}");
    assert!(!with_no_color.contains(ESC), "NO_COLOR: {with_no_color:?}");
    let piped_err = stderr(&piped);
    assert!(piped_err.contains(" INFO "), "{piped_err:?}");
    assert!(!piped_err.contains(ESC), "a pipe: {piped_err:?}");

    let mut top = Command::new(lb_tests::lb_bin());
    plain_env(&mut top, &[]);
    let top = top
        .args(["--run-dir", "/nonexistent-lb-run", "top"])
        .output()
        .expect("run lb");
    assert_eq!(top.status.code(), Some(1), "{top:?}");
    assert_eq!(
        stderr(&top),
        "error: lb top draws on a terminal and standard output is not one (fix: `lb top --once` prints a frame as plain text)"
    );
    assert!(top.stdout.is_empty(), "{top:?}");
}
