//! The HTTP/JSON API end to end: tokens on TCP (none, wrong, read-only on a change: 401/403,
//! and nothing changed), bad input across the API, the CLI and the config file (one-line
//! errors, and the state byte-for-byte as before), schemathesis against the live API, and the
//! Python client running the seed's usage example as written.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use lb_tests::{Daemon, Topology, client::http_request, wait_until};

const API: &str = "127.0.0.1:8443";
const ADMIN: &str = "admin-token-7f3a-5c0e9d2b8a41f6037e";
const READER: &str = "read-token-91c2-6d8e0f3a7b52c4e190";

struct Api {
    topo: Topology,
    d: Daemon,
}

fn start() -> Api {
    start_with(|_| String::new())
}

/// As `start`, with more `[daemon.api]` keys, made from the run directory.
fn start_with(extra: impl FnOnce(&std::path::Path) -> String) -> Api {
    start_with_failpoints(extra, None)
}

fn start_with_failpoints(extra: impl FnOnce(&std::path::Path) -> String, failpoints: Option<&str>) -> Api {
    let topo = Topology::new(4).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let extra = extra(&run_dir);
    lb_tests::write_secret(&run_dir.join("admin.token"), &format!("{ADMIN}\n")).expect("token");
    lb_tests::write_secret(&run_dir.join("read.token"), &format!("{READER}\n")).expect("token");
    let api = format!(
        "[daemon.api]\nlisten = \"{API}\"\ntoken_file = \"{}\"\nread_token_file = \"{}\"\n{extra}",
        run_dir.join("admin.token").display(),
        run_dir.join("read.token").display()
    );
    let text = topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).replacen(
        "neighbour_refresh_ms = 500\n",
        &format!("neighbour_refresh_ms = 500\n{api}"),
        1,
    );
    let d = Daemon::start_with_failpoints(&topo.lb, &instance, &run_dir, &text, failpoints)
        .expect("daemon starts");
    d.wait_all_in_tables();
    Api { topo, d }
}

impl Api {
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let (status, text) =
            http_request(&self.topo.lb, API.parse().unwrap(), method, path, token, body).expect("request");
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text:?}"));
        (status, json)
    }

    fn state_file(&self) -> PathBuf {
        self.d.run_dir.join(format!("{}.state.json", self.d.instance))
    }

    /// Everything a change could touch: the state file, and services with backends, weights
    /// and table slots as the daemon reports them.
    fn dump(&self) -> String {
        let state = std::fs::read_to_string(self.state_file()).expect("state file");
        let list = self.d.json(&["service", "list"]);
        format!("{state}\n{list}")
    }
}

fn error_line(v: &serde_json::Value) -> String {
    let detail = v["detail"].as_str().unwrap_or_default().to_string();
    assert!(
        v["error"].is_string() && !detail.is_empty(),
        "a JSON error with a detail: {v}"
    );
    assert!(!detail.contains('\n'), "one line: {detail:?}");
    detail
}

#[test]
fn tokens_guard_tcp_and_refused_calls_change_nothing() {
    let a = start();
    let before = a.dump();
    let body = r#"{"id": "x9", "address": "10.99.0.14"}"#;
    let change = [
        ("POST", "/v1/services/web4/instances", Some(body)),
        (
            "PUT",
            "/v1/services/web4/instances/b1/weight",
            Some(r#"{"weight": 1}"#),
        ),
        ("DELETE", "/v1/services/web4", None),
        ("POST", "/v1/shutdown", None),
        ("POST", "/v1/reload", None),
        ("POST", "/v1/services/web4/instances/b1/drain", None),
    ];
    for (method, path, body) in change {
        for (token, want) in [(None, 401), (Some("wrong-token"), 401), (Some(READER), 403)] {
            let (status, v) = a.call(method, path, token, body);
            assert_eq!(status, want, "{method} {path} with {token:?}: {v}");
            error_line(&v);
        }
    }
    for (token, want) in [
        (None, 401),
        (Some("nope"), 401),
        (Some(READER), 200),
        (Some(ADMIN), 200),
    ] {
        let (status, v) = a.call("GET", "/v1/services", token, None);
        assert_eq!(status, want, "{v}");
    }
    assert_eq!(a.dump(), before, "refused calls changed the state");
    // The admin token may change things.
    let (status, v) = a.call(
        "PUT",
        "/v1/services/web4/instances/b1/weight",
        Some(ADMIN),
        Some(r#"{"weight": 50}"#),
    );
    assert_eq!(status, 200, "{v}");
    assert_ne!(a.dump(), before);
}

const REPORTER: &str = "report-token-5e1b-9c3d7a20f4e86b1d52";

/// The report scope: a backend's own reports for the services it is given, nothing else;
/// reads never look up a client's flow by its tuple; every change and every refusal is an
/// audit line; SIGHUP reads the tokens again (and a refused token file keeps the old ones).
#[test]
fn scopes_audit_lines_and_tokens_read_again_on_sighup() {
    let a = start_with(|dir| {
        lb_tests::write_secret(&dir.join("report.token"), &format!("{REPORTER}\n")).expect("token");
        format!(
            "report_token_file = \"{}\"\nreport_services = [\"web4\"]\n",
            dir.join("report.token").display()
        )
    });
    let b = a.topo.backend("b4").v4;
    let add = format!(r#"{{"id": "b4", "address": "{b}"}}"#);
    let before = a.dump();
    // What a reporter may not do: read, change weights or services, report for another service.
    let refused = [
        ("GET", "/v1/services".to_string(), None),
        (
            "PUT",
            "/v1/services/web4/instances/b1/weight".into(),
            Some(r#"{"weight": 1}"#.to_string()),
        ),
        ("DELETE", "/v1/services/web4".into(), None),
        ("POST", "/v1/reload".into(), None),
        // Draining is the operator's, not a backend's report about itself.
        ("POST", "/v1/services/web4/instances/b1/drain".into(), None),
        ("POST", "/v1/services/dns4/instances".into(), Some(add.clone())),
        (
            "PUT",
            "/v1/services/dns4/instances/b1/health".into(),
            Some(r#"{"score": 0.5}"#.into()),
        ),
    ];
    for (method, path, body) in &refused {
        let (status, v) = a.call(method, path, Some(REPORTER), body.as_deref());
        assert_eq!(status, 403, "{method} {path}: {v}");
        error_line(&v);
    }
    assert_eq!(a.dump(), before, "refused reports changed the state");
    // What it may: register, report health and load, deregister, for web4.
    let allowed = [
        (
            "POST",
            "/v1/services/web4/instances".to_string(),
            Some(add.clone()),
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b4/health".into(),
            Some(r#"{"score": 0.5}"#.to_string()),
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b4/load".into(),
            Some(r#"{"cpu": 0.5}"#.into()),
        ),
        ("DELETE", "/v1/services/web4/instances/b4".into(), None),
    ];
    for (method, path, body) in &allowed {
        let (status, v) = a.call(method, path, Some(REPORTER), body.as_deref());
        assert_eq!(status, 200, "{method} {path}: {v}");
    }
    // A heartbeat that renews is counted, not audited (a thousand a second at scale); a
    // refused one is audited.
    let ttl = format!(r#"{{"id": "hb", "address": "{b}", "ttl": 30}}"#);
    let (status, v) = a.call("POST", "/v1/services/web4/instances", Some(REPORTER), Some(&ttl));
    assert_eq!(status, 200, "{v}");
    for id in ["hb", "hb", "nope"] {
        let path = format!("/v1/services/web4/instances/{id}/heartbeat");
        let (status, v) = a.call("PUT", &path, Some(REPORTER), None);
        assert_eq!(status, if id == "hb" { 200 } else { 404 }, "{path}: {v}");
    }
    let (status, v) = a.call("DELETE", "/v1/services/web4/instances/hb", Some(REPORTER), None);
    assert_eq!(status, 200, "{v}");
    // A reader may not look up who talks to whom; the admin may.
    let tuple = [
        "/v1/lookup?protocol=tcp&src=10.99.0.1:5&dst=10.100.0.1:8080",
        "/v1/services/web4/pick?src=10.99.0.1:5",
    ];
    for path in tuple {
        let (status, v) = a.call("GET", path, Some(READER), None);
        assert_eq!(status, 403, "{path}: {v}");
        assert!(error_line(&v).contains("admin"), "{v}");
        let (status, v) = a.call("GET", path, Some(ADMIN), None);
        assert!(status != 401 && status != 403, "{path} as admin: {status} {v}");
    }
    // The audit trail: changes and refusals, with the scope and the peer.
    let log = a.d.log();
    for line in [
        "POST /v1/services/web4/instances 200 transport=tcp scope=report peer=127.0.0.1",
        "DELETE /v1/services/web4/instances/b4 200 transport=tcp scope=report peer=127.0.0.1",
        "PUT /v1/services/web4/instances/b1/weight 403 transport=tcp scope=report peer=127.0.0.1",
        "GET /v1/lookup 403 transport=tcp scope=read peer=127.0.0.1",
        "PUT /v1/services/web4/instances/nope/heartbeat 404 transport=tcp scope=report peer=127.0.0.1",
        "DELETE /v1/services/web4/instances/hb 200 transport=tcp scope=report peer=127.0.0.1",
    ] {
        assert!(log.contains(line), "no audit line {line:?} in:\n{log}");
    }
    assert!(
        !log.contains("/instances/hb/heartbeat"),
        "a renewing heartbeat was audited:\n{log}"
    );
    let cli = a.d.cli(&["backend", "weight", "web4", "b1", "7"]);
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert!(
        a.d.log().contains(
            "PUT /v1/services/web4/instances/b1/weight 200 transport=socket scope=admin peer=local"
        ),
        "the socket's changes are audited too"
    );

    // SIGHUP: a new admin token replaces the old one; a refused file (world-readable) does not.
    let pid = a.d.pid().expect("pid").to_string();
    let token_file = a.d.run_dir.join("admin.token");
    let fresh = "admin-token-rotated-0b6f4e2a9d17c385ff";
    lb_tests::write_secret(&token_file, &format!("{fresh}\n")).expect("token");
    lb_tests::netns::run(std::process::Command::new("kill").args(["-HUP", &pid])).expect("SIGHUP");
    assert!(
        wait_until(Duration::from_secs(10), || a
            .call("GET", "/v1/status", Some(fresh), None)
            .0
            == 200),
        "the new token was not taken"
    );
    assert_eq!(
        a.call("GET", "/v1/status", Some(ADMIN), None).0,
        401,
        "the old token still works"
    );
    std::fs::write(&token_file, "admin-token-world-readable-000000000000\n").expect("token");
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("mode");
    lb_tests::netns::run(std::process::Command::new("kill").args(["-HUP", &pid])).expect("SIGHUP");
    assert!(
        wait_until(Duration::from_secs(10), || a
            .d
            .log()
            .contains("API tokens kept as they were")),
        "{}",
        a.d.log()
    );
    assert_eq!(
        a.call("GET", "/v1/status", Some(fresh), None).0,
        200,
        "a refused file kept the tokens"
    );
}

#[test]
fn bad_input_over_api_cli_and_config_gets_one_line_errors_and_changes_nothing() {
    let a = start();
    let before = a.dump();
    let spec = |extra: &str| {
        format!(r#"{{"name": "new", "vip": "10.100.0.9", "port": 80, "protocol": "tcp"{extra}}}"#)
    };
    let api: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            "/v1/services".into(),
            Some("{".into()),
            400,
            "malformed request body",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some("[]".into()),
            400,
            "malformed request body",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name": "x"}"#.into()),
            400,
            "missing field",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(spec(r#", "colour": "red""#)),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(spec(r#", "table_size": 65536"#)),
            400,
            "prime",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(spec(r#", "forwarding": "teleport""#)),
            400,
            "unknown variant",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(spec(r#", "snat": true"#)),
            400,
            "snat needs",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(spec(r#", "health": {"kind": "http"}"#)),
            400,
            "needs a path",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(spec(r#", "health": {"timeout": 9.0, "interval": 1.0}"#)),
            400,
            "longer than the interval",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(spec(r#", "health": {"error_threshold": 0}"#)),
            400,
            "out of range",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name": "web4", "vip": "10.100.0.9", "port": 80, "protocol": "tcp"}"#.into()),
            409,
            "already exists",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name": "dup", "vip": "10.100.0.1", "port": 8080, "protocol": "tcp"}"#.into()),
            400,
            "duplicates VIP",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name": "bad name", "vip": "10.100.0.9", "port": 80, "protocol": "tcp"}"#.into()),
            400,
            "invalid service name",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name": "v", "vip": "300.1.1.1", "port": 80, "protocol": "tcp"}"#.into()),
            400,
            "malformed request body",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name": "v", "vip": "10.100.0.9", "port": 70000, "protocol": "tcp"}"#.into()),
            400,
            "malformed request body",
        ),
        (
            "POST",
            "/v1/services".into(),
            Some(r#"{"name": "v", "vip": "224.0.0.1", "port": 80, "protocol": "tcp"}"#.into()),
            400,
            "invalid VIP",
        ),
        (
            "DELETE",
            "/v1/services/nosuch".into(),
            None,
            404,
            "unknown service",
        ),
        ("GET", "/v1/services/nosuch".into(), None, 404, "unknown service"),
        (
            "POST",
            "/v1/services/nosuch/instances".into(),
            Some(r#"{"id": "a", "address": "10.99.0.14"}"#.into()),
            404,
            "unknown service",
        ),
        (
            "POST",
            "/v1/services/web4/instances".into(),
            Some(r#"{"id": "b1", "address": "10.99.0.14"}"#.into()),
            409,
            "already has a backend b1",
        ),
        (
            "POST",
            "/v1/services/web4/instances".into(),
            Some(r#"{"id": "z", "address": "fd99::14"}"#.into()),
            400,
            "same IP family",
        ),
        (
            "POST",
            "/v1/services/web4/instances".into(),
            Some(r#"{"id": "z", "address": "127.0.0.1"}"#.into()),
            400,
            "invalid address",
        ),
        (
            "POST",
            "/v1/services/web4/instances".into(),
            Some(r#"{"id": "z", "address": "10.99.0.14", "weight": 20000}"#.into()),
            400,
            "out of range",
        ),
        (
            "POST",
            "/v1/services/web4/instances".into(),
            Some(r#"{"id": "z", "address": "10.99.0.14", "weight": -1}"#.into()),
            400,
            "malformed request body",
        ),
        (
            "POST",
            "/v1/services/web4/instances".into(),
            Some(r#"{"id": "z", "address": "10.99.0.14", "health": {"panic_threshold": 0.5}}"#.into()),
            400,
            "service settings",
        ),
        (
            "POST",
            "/v1/services/web4/instances".into(),
            Some(r#"{"id": "z", "address": "10.99.0.11"}"#.into()),
            400,
            "duplicates address",
        ),
        (
            "DELETE",
            "/v1/services/web4/instances/nosuch".into(),
            None,
            404,
            "has no backend",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b1/weight".into(),
            Some(r#"{"weight": 100001}"#.into()),
            400,
            "out of range",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b1/weight".into(),
            Some(r#"{"weight": "heavy"}"#.into()),
            400,
            "malformed request body",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b1/weight".into(),
            Some(r#"{}"#.into()),
            400,
            "missing field",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/nosuch/weight".into(),
            Some(r#"{"weight": 5}"#.into()),
            404,
            "has no backend",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b1/health".into(),
            Some(r#"{"score": 1.5}"#.into()),
            400,
            "out of range",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b1/health".into(),
            Some(r#"{"score": -0.5}"#.into()),
            400,
            "out of range",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b1/health".into(),
            Some(r#"{"score": 0.5, "ttl": 0}"#.into()),
            400,
            "ttl",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/b1/health".into(),
            Some(r#"{"score": 0.5, "ttl": -3}"#.into()),
            400,
            "ttl",
        ),
        (
            "PUT",
            "/v1/services/web4/instances/nosuch/health".into(),
            Some(r#"{"score": 0.5}"#.into()),
            404,
            "has no backend",
        ),
        (
            "PUT",
            "/v1/services/nosuch/instances/b1/health".into(),
            Some(r#"{"score": 0.5}"#.into()),
            404,
            "unknown service",
        ),
        (
            "GET",
            "/v1/services/web4/pick?src=nonsense".into(),
            None,
            400,
            "malformed query",
        ),
        (
            "GET",
            "/v1/services/web4/pick?dst=10.100.0.2:8080".into(),
            None,
            400,
            "not service web4's VIP",
        ),
        (
            "GET",
            "/v1/services/nosuch/pick".into(),
            None,
            404,
            "unknown service",
        ),
        (
            "GET",
            "/v1/lookup?protocol=sctp&src=1.2.3.4:5&dst=10.100.0.1:8080".into(),
            None,
            400,
            "malformed query",
        ),
        (
            "GET",
            "/v1/lookup?protocol=tcp&src=[fd00::1]:5&dst=10.100.0.1:8080".into(),
            None,
            400,
            "different IP families",
        ),
        (
            "GET",
            "/v1/lookup?protocol=tcp&src=1.2.3.4:5&dst=10.100.0.7:8080".into(),
            None,
            404,
            "no service",
        ),
        (
            "GET",
            "/v1/health?service=nosuch".into(),
            None,
            404,
            "unknown service",
        ),
        (
            "GET",
            "/v1/health?colour=red".into(),
            None,
            400,
            "malformed query",
        ),
        ("GET", "/v1/nothing-here".into(), None, 404, "no such resource"),
        ("PATCH", "/v1/services".into(), None, 405, "method not allowed"),
    ];
    for (method, path, body, want, needle) in &api {
        let (status, v) = a.call(method, path, Some(ADMIN), body.as_deref());
        assert_eq!(status, *want, "{method} {path} {body:?}: {v}");
        let detail = error_line(&v);
        assert!(
            detail.contains(needle),
            "{method} {path}: {detail:?} should mention {needle:?}"
        );
        assert_eq!(a.dump(), before, "{method} {path} {body:?} changed the state");
    }

    let cli: &[(&[&str], &str)] = &[
        (&["backend", "health", "web4", "b1", "2"], "out of range"),
        (&["backend", "health", "web4", "b1", "0.5", "--ttl=-1"], "ttl"),
        (&["backend", "weight", "web4", "b1", "-4"], "unexpected argument"),
        (
            &[
                "service",
                "add",
                "n",
                "--vip",
                "10.100.0.9",
                "--port",
                "80",
                "--forwarding",
                "warp",
            ],
            "unknown forwarding mode",
        ),
        (
            &["lookup", "--src", "1.2.3.4", "--dst", "10.100.0.1:8080"],
            "invalid",
        ),
        (&["health", "nosuch"], "unknown service"),
    ];
    for (args, needle) in cli {
        let out = a.d.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert_eq!(a.dump(), before, "{args:?} changed the state");
    }

    // A bad config file on reload is refused whole, over every way in.
    let good = std::fs::read_to_string(&a.d.config).expect("config");
    let bad_files = [
        (good.replace("weight = 100", "weight = 100000"), "out of range"),
        (good.replace("protocol = \"tcp\"", "protocol = \"sctp\""), "line"),
        (good.replace("[daemon]", "[daemon]\ncolour = 1"), "unknown field"),
        (
            format!("{good}\n[service.health]\nkind = \"http\"\n"),
            "needs a path",
        ),
        (
            good.replacen("forwarding = \"dsr\"", "forwarding = \"dsr\"\nsnat = true", 1),
            "snat needs",
        ),
        ("not toml at all [".to_string(), "invalid config"),
    ];
    for (text, needle) in &bad_files {
        std::fs::write(&a.d.config, text).expect("write config");
        let (status, v) = a.call("POST", "/v1/reload", Some(ADMIN), None);
        assert_eq!(status, 400, "{v}");
        assert!(error_line(&v).contains(needle), "{v} should mention {needle:?}");
        let out = a.d.cli(&["reload"]);
        assert!(!out.status.success());
        let refused = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        assert!(refused.contains(needle));
        assert_eq!(a.dump(), before, "a bad file changed the state");
        // `lb config check` refuses the file with the daemon's words, and no daemon.
        let config = a.d.config.to_str().expect("path");
        let check = a
            .topo
            .lb
            .command(lb_tests::lb_bin())
            .args(["config", "check", config])
            .output()
            .expect("lb");
        assert_eq!(check.status.code(), Some(1), "{check:?}");
        assert_eq!(
            String::from_utf8_lossy(&check.stderr).trim_end(),
            refused,
            "config check"
        );
    }
    // SIGHUP with a bad file: refused, logged, nothing changed.
    let pid = a.d.pid().expect("pid");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    assert!(wait_until(Duration::from_secs(5), || a
        .d
        .log()
        .contains("SIGHUP: reload refused")));
    assert_eq!(a.dump(), before);
    std::fs::write(&a.d.config, &good).expect("restore config");
    let total = api.len() + cli.len() + 2 * bad_files.len() + 1;
    println!("{total} bad inputs refused with one line, state unchanged after each");
    assert!(total >= 50, "{total}");
}

/// `lb config show` prints the running config as a file: every default of `[daemon]` filled
/// in, and the services as they run (a change through the API included). The file it prints
/// passes `lb config check` and parses to the daemon's own settings; a read token may ask.
#[test]
fn config_show_prints_the_effective_config_as_a_valid_file() {
    let a = start();
    let out = a.d.cli(&["backend", "weight", "web4", "b1", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = a.d.cli(&["config", "show"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    // Defaults the test's file does not set are there.
    for key in [
        "conntrack_size = ",
        "gue_port = ",
        "[daemon.nat]",
        "[daemon.http]",
        "max_connections = ",
    ] {
        assert!(shown.contains(key), "{key:?} missing:\n{shown}");
    }
    let file = a.d.run_dir.join("shown.toml");
    std::fs::write(&file, &shown).expect("write");
    let check = a
        .topo
        .lb
        .command(lb_tests::lb_bin())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("lb");
    assert_eq!(check.status.code(), Some(0), "{check:?}\n{shown}");
    let shown = lb_userspace::config::Config::parse(&shown).expect("parses");
    let written = lb_userspace::config::Config::load(&a.d.config).expect("the test's file");
    assert_eq!(shown.daemon, written.daemon, "the daemon's settings");
    let weight = |c: &lb_userspace::config::Config| {
        c.services
            .iter()
            .find(|s| s.name == "web4")
            .and_then(|s| s.backends.iter().find(|b| b.id == "b1"))
            .map(|b| b.weight)
    };
    assert_eq!(weight(&shown), Some(7), "the running weight, not the file's");
    assert_eq!(shown.services.len(), written.services.len());
    // Read scope; the same tables as JSON.
    let (status, v) = a.call("GET", "/v1/config", Some(READER), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"]["daemon"]["instance"], a.d.instance.as_str(), "{v}");
    assert_eq!(
        v["data"]["service"].as_array().map(Vec::len),
        Some(written.services.len()),
        "{v}"
    );
}

#[test]
fn schemathesis_finds_no_server_error_and_every_response_conforms() {
    let a = start();
    let st = lb_tests::python().with_file_name("schemathesis");
    assert!(
        st.exists(),
        "{} is missing: `cargo xtask setup` installs it",
        st.display()
    );
    let out = a
        .topo
        .lb
        .command(&st)
        // Its caches go to the test's run directory, not the source tree.
        .current_dir(&a.d.run_dir)
        .args([
            "run",
            &format!("http://{API}/v1/openapi.json"),
            "--header",
            &format!("Authorization: Bearer {ADMIN}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--exclude-path",
            "/v1/shutdown",
            "--max-examples",
            "25",
            "--seed",
            "7",
            "--workers",
            "1",
            "--no-color",
        ])
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("passed") || l.contains("failed") || l.contains("error"))
        .collect();
    println!("schemathesis: {}", summary.last().unwrap_or(&"(no summary)"));
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        a.d.log()
    );
    assert!(
        wait_until(Duration::from_secs(1), || a.d.pid().is_some()),
        "the daemon still runs"
    );
    let (status, _) = a.call("GET", "/v1/status", Some(READER), None);
    assert_eq!(status, 200, "the daemon still answers");
}

/// The client refuses `.`, `..` and control characters in any id before it sends anything
/// (`deregister_instance("web", "..")` used to become `DELETE /v1/services/web`), and
/// percent-encodes every other path segment; checked against the request httpx would send.
#[test]
fn the_python_client_refuses_dot_segment_ids_and_encodes_the_rest() {
    let python = lb_tests::python();
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../python/tests/test_ids.py"
    ));
    let out = std::process::Command::new(&python)
        .arg(&script)
        .output()
        .expect("run python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("test_ids: ok (httpx"), "{text}");
}

#[test]
fn the_python_client_runs_the_seeds_usage_example() {
    let a = start();
    let python = lb_tests::python();
    let script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../python/tests/seed_usage.py"
    ));
    let socket = a.d.run_dir.join(format!("{}.sock", a.d.instance));
    let b4 = a.topo.backend("b4").v4.to_string();
    let out = a
        .topo
        .lb
        .command(&python)
        .arg(&script)
        .arg(&socket)
        .arg("web4")
        .arg(&b4)
        .arg(format!("http://{API}"))
        .arg(READER)
        .output()
        .expect("run python");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().last().is_some_and(|l| l.ends_with("0 failed")),
        "{text}"
    );
    let _ = SocketAddr::from(([127, 0, 0, 1], 0));
}

#[test]
fn top_once_prints_a_frame_sorted_by_rate() {
    let a = start();
    let target = SocketAddr::new(
        std::net::IpAddr::V4(lb_tests::topology::VIP4),
        lb_tests::topology::PORT,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let ns = std::fs::File::open(a.topo.client.path()).expect("netns");
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let s = lb_tests::client::udp_socket(target, Duration::from_millis(100)).expect("udp");
            let mut buf = [0u8; 64];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.send(b"who");
                let _ = s.recv(&mut buf);
            }
        })
    };
    let out = a.d.cli(&["top", "--once"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().expect("sender");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("service") && header.contains("packets/s") && header.contains("breaker"),
        "{header}"
    );
    let rows: Vec<Vec<&str>> = lines
        .take_while(|l| !l.starts_with("drops/s"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 12, "4 services x 3 backends: {text}");
    let rates: Vec<f64> = rows.iter().map(|r| r[2].parse().expect("a rate")).collect();
    assert!(
        rates.windows(2).all(|w| w[0] >= w[1]),
        "sorted by rate: {rates:?}"
    );
    assert!(
        rows[0][0] == "dns4" && rates[0] > 10.0,
        "the UDP flow's backend leads: {text}"
    );
    assert!(rows.iter().all(|r| r[4] == "up"), "{text}");
    assert!(text.lines().last().is_some_and(|l| l.starts_with("drops/s:")));
}

#[test]
fn tls_on_tcp_serves_the_api_behind_the_tokens() {
    let mut cert = PathBuf::new();
    let a = start_with(|dir| {
        let (api, made) = tls_settings(dir);
        cert = made;
        api
    });
    // Plain HTTP to the TLS port gets no answer.
    let plain = http_request(
        &a.topo.lb,
        API.parse().unwrap(),
        "GET",
        "/v1/status",
        Some(READER),
        None,
    );
    assert!(
        plain.map_or(true, |(status, _)| status != 200),
        "plain HTTP was served"
    );
    let python = lb_tests::python();
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    let script = format!(
        r#"
import asyncio, sys
sys.path.insert(0, {client:?})
from lbclient import LoadBalancer, Unauthorized, Forbidden
async def main():
    async with LoadBalancer(url="https://{API}", token={READER:?}, verify={cert:?}) as lb:
        services = await lb.services()
        assert len(services) == 4, services
        try:
            await lb.set_weight("web4", "b1", 5)
            raise SystemExit("a read token changed something over TLS")
        except Forbidden:
            pass
    async with LoadBalancer(url="https://{API}", verify={cert:?}) as lb:
        try:
            await lb.services()
            raise SystemExit("no token was accepted over TLS")
        except Unauthorized:
            pass
    print("tls ok")
asyncio.run(main())
"#,
        cert = cert.display().to_string()
    );
    let out = a
        .topo
        .lb
        .command(&python)
        .args(["-c", &script])
        .output()
        .expect("python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("tls ok"),
        "{text}\n{}",
        a.d.log()
    );
    assert!(a.d.log().contains("control API on https://"));
}

/// A self-signed certificate for 127.0.0.1 in `dir`: the `[daemon.api]` lines naming it, and
/// the certificate's path.
fn tls_settings(dir: &std::path::Path) -> (String, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    lb_tests::self_signed(&cert, &key, "127.0.0.1", &["subjectAltName=IP:127.0.0.1"]);
    let api = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    (api, cert)
}

/// An accept loop whose every accept fails (a failpoint: "Too many open files", as when the
/// daemon is out of descriptors) backs off instead of spinning a runtime thread, says so in the
/// log, and leaves the other listeners working. Before the back-off, the TLS listener's loop
/// spun: about one CPU second per second.
#[test]
fn a_failing_tls_accept_backs_off_instead_of_spinning() {
    let a = start_with_failpoints(|dir| tls_settings(dir).0, Some("tls-accept=return"));
    assert!(
        wait_until(Duration::from_secs(10), || a
            .d
            .log()
            .contains("accept: Too many open files")),
        "no refusal logged: {}",
        a.d.log_tail(20)
    );
    let pid = a.d.pid().expect("daemon pid");
    // A window, not a wait: CPU spent over 2 s of failing accepts.
    let before = lb_tests::cpu_seconds(pid).expect("cpu time");
    std::thread::sleep(Duration::from_secs(2));
    let spent = lb_tests::cpu_seconds(pid).expect("cpu time") - before;
    println!("failing TLS accepts: {spent:.2} s of CPU in 2 s");
    assert!(spent < 0.4, "the accept loop spins: {spent:.2} s of CPU in 2 s");
    // The control socket still answers.
    let status = a.d.cli(&["status", "--json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}
