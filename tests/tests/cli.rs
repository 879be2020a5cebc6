//! The CLI without a daemon: usage errors on one line that name what is missing;
//! `LB_INSTANCE` / `LB_RUN_DIR` standing in for `--instance` / `--run-dir` (the flags win);
//! `--version` naming the commit and the eBPF object.

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
