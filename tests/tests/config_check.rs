//! `lb config check FILE` without a daemon: the daemon's errors in the daemon's words (the
//! file's own, then the files it names and the interfaces), the warnings about legal but
//! suspect settings, `--json`, and the exit statuses (0 valid, 1 invalid, 2 unreadable). The
//! end-to-end suites also run it on every config file a daemon refuses (e2e, e2e_api).

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use lb_userspace::config::Config;

/// A directory of its own per test, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-config-check-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check(path: &Path, json: bool) -> Output {
    let mut cmd = std::process::Command::new(lb_tests::lb_bin());
    if json {
        cmd.arg("--json");
    }
    cmd.args(["config", "check"]).arg(path).output().expect("run lb")
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

const DAEMON: &str = "[daemon]\ninterfaces = [\"lo\"]\n";

fn service(extra: &str) -> String {
    format!(
        "[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n{extra}\n[[service.backend]]\nid = \"b1\"\naddress = \"10.0.1.1\"\n"
    )
}

#[test]
fn a_valid_file_passes_with_status_0() {
    let dir = Dir::new("valid");
    let path = dir.write("lb.toml", &format!("{DAEMON}{}", service("")));
    let out = check(&path, false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: valid (0 warnings)", path.display())
    );
    let json: serde_json::Value = serde_json::from_slice(&check(&path, true).stdout).expect("JSON");
    assert_eq!(json["valid"], true, "{json}");
    assert_eq!(json["errors"], serde_json::json!([]), "{json}");
}

/// Errors of the file itself: exactly the daemon's (`Config::load`, what `lb daemon` and a
/// reload refuse with), one line, status 1.
#[test]
fn the_files_errors_are_the_daemons_with_status_1() {
    let dir = Dir::new("invalid");
    let cases = [
        // a service
        service("table_size = 100"),
        format!("{}{}", service(""), service("")),
        // a strategy
        service("strategy = \"fastest\""),
        service("strategy = \"geo\""),
        // a health check
        service("[service.health]\nkind = \"http\""),
        service("[service.health]\ninterval = 1.0\ntimeout = 2.0"),
        service("[service.health]\nkind = \"http\"\npath = \"/\"\ntls_ca = \"/etc/ca.pem\""),
        // a port range
        "[daemon.nat]\nports = \"3000-2000\"\n".to_string(),
        // TLS keys that do not go together
        "[daemon.api]\ncert_file = \"/etc/cert.pem\"\n".to_string(),
        // TOML itself
        "[[service]\n".to_string(),
    ];
    for (i, extra) in cases.iter().enumerate() {
        let path = dir.write(&format!("{i}.toml"), &format!("{DAEMON}{extra}"));
        let daemon = Config::load(&path).expect_err(extra).to_string();
        let out = check(&path, false);
        assert_eq!(out.status.code(), Some(1), "{extra}: {out:?}");
        assert_eq!(stderr_lines(&out), vec![format!("error: {daemon}")], "{extra}");
        assert!(out.stdout.is_empty(), "{extra}: {out:?}");
    }
}

/// What the daemon reads besides the file, each failure on its own line: the interfaces,
/// token files, the API's certificate, the geo data and the checks' CA file.
#[test]
fn named_files_and_interfaces_are_checked_each_on_a_line() {
    let dir = Dir::new("files");
    let geo = dir.write("geo.csv", "10.0.0.0/8,eu\n10.0.0.0/33,eu\n");
    let ca = dir.write("ca.pem", "not a certificate\n");
    let token = dir.write("token", "secret\n");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let text = format!(
        "[daemon]\ninterfaces = [\"lo\", \"nosuch0\"]\n\
         [daemon.api]\nlisten = \"127.0.0.1:9\"\ntoken_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [daemon.geo]\ndefault_region = \"eu\"\ndata = \"{}\"\n{}",
        token.display(),
        dir.0.join("cert.pem").display(),
        dir.0.join("key.pem").display(),
        geo.display(),
        service(&format!(
            "[service.health]\nkind = \"http\"\npath = \"/\"\nhttps = true\ntls_ca = \"{}\"",
            ca.display()
        ))
    );
    let path = dir.write("lb.toml", &text);
    Config::load(&path).expect("the file itself is valid");
    let out = check(&path, false);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = stderr_lines(&out);
    let want = [
        "error: unknown interface nosuch0".to_string(),
        format!(
            "error: token file {} is readable by others (mode 644; fix: chmod 600 {})",
            token.display(),
            token.display()
        ),
        format!(
            "error: cannot read certificates from {}",
            dir.0.join("cert.pem").display()
        ),
        format!("error: geo data {}: line 2", geo.display()),
        format!(
            "error: service web: health tls_ca {}: no CA certificate",
            ca.display()
        ),
    ];
    assert_eq!(lines.len(), want.len(), "{lines:#?}");
    for (line, want) in lines.iter().zip(&want) {
        assert!(
            line.starts_with(want.as_str()),
            "{line:?} should start with {want:?}"
        );
    }
}

/// Legal but suspect: said, and the file is still valid (status 0).
#[test]
fn suspect_settings_are_warnings_with_status_0() {
    let dir = Dir::new("warnings");
    let token = dir.join_secret("token");
    let mut text = format!(
        "{DAEMON}[daemon.api]\nlisten = \"0.0.0.0:9443\"\nallow_plaintext = true\ntoken_file = \"{}\"\n",
        token.display()
    );
    text.push_str(&service(
        "[service.health]\nkind = \"http\"\npath = \"/\"\nhttps = true\ninterval = 1.0\ntimeout = 0.9",
    ));
    // 251 table entries over 100 backends: some hold 3 where 2.51 is fair.
    text.push_str(
        "[[service]]\nname = \"wide\"\nvip = \"10.0.0.2\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 251\n",
    );
    for i in 0..100 {
        text.push_str(&format!(
            "[[service.backend]]\nid = \"w{i}\"\naddress = \"10.0.2.{}\"\n",
            i + 1
        ));
    }
    let path = dir.write("lb.toml", &text);
    let out = check(&path, false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = stderr_lines(&out);
    let want = [
        "warning: daemon.api.listen 0.0.0.0:9443 is not loopback and has no TLS",
        "warning: service web: health https = true without tls_ca",
        "warning: service web: health timeout 0.9 is 90% of the interval 1",
        "warning: service wide: table_size 251 for 100 backends: one may take 19.5% more than its share",
    ];
    assert_eq!(lines.len(), want.len(), "{lines:#?}");
    for want in want {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "{want:?} not in {lines:#?}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: valid (4 warnings)", path.display())
    );
    let json: serde_json::Value = serde_json::from_slice(&check(&path, true).stdout).expect("JSON");
    assert_eq!(json["valid"], true, "{json}");
    assert_eq!(json["warnings"].as_array().map(Vec::len), Some(4), "{json}");
    // The same settings within bounds: no warning.
    let calm = text
        .replace("0.0.0.0:9443", "127.0.0.1:9443")
        .replace("https = true\n", "")
        .replace("timeout = 0.9", "timeout = 0.5")
        .replace("table_size = 251", "table_size = 65537");
    let out = check(&dir.write("calm.toml", &calm), false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unreadable_file_is_status_2_and_an_invalid_one_1() {
    let dir = Dir::new("unreadable");
    for path in [dir.0.join("missing.toml"), dir.0.clone()] {
        let out = check(&path, false);
        assert_eq!(out.status.code(), Some(2), "{}: {out:?}", path.display());
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(&format!("error: invalid config: cannot read {}", path.display())),
            "{lines:?}"
        );
        let json: serde_json::Value = serde_json::from_slice(&check(&path, true).stdout).expect("JSON");
        assert_eq!(
            (&json["valid"], &json["readable"]),
            (&false.into(), &false.into()),
            "{json}"
        );
    }
    let out = check(&dir.write("bad.toml", "not toml ["), true);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (&json["valid"], &json["readable"]),
        (&false.into(), &true.into()),
        "{json}"
    );
    assert_eq!(json["errors"].as_array().map(Vec::len), Some(1), "{json}");
}

impl Dir {
    /// A token file as the daemon wants it: mode 600.
    fn join_secret(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        lb_tests::write_secret(&path, "token-of-the-test-0123456789abcdef0123\n").expect("token");
        path
    }
}

/// `[service.discovery]`: its settings refused in the daemon's words (status 1); the file it
/// names read as the source reads it, a file it cannot use and each entry it would skip said
/// as warnings (status 0: the daemon starts, the service waits for its file).
#[test]
fn a_discovery_source_is_checked_and_its_file_read() {
    let dir = Dir::new("discovery");
    let source = |extra: &str| {
        format!(
            "{DAEMON}[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n[service.discovery]\n{extra}\n"
        )
    };
    let list = dir.0.join("web.json");
    for (i, (text, needle)) in [
        (source("kind = \"file\""), "needs a path"),
        (source("kind = \"file\"\npath = \"web.json\""), "must be absolute"),
        (
            source(&format!(
                "kind = \"file\"\npath = \"{}\"\nname = \"x\"",
                list.display()
            )),
            "discovery.name is for kind = \"dns\"",
        ),
        (
            source(&format!(
                "kind = \"file\"\npath = \"{}\"\ndrain_before_remove = -1.0",
                list.display()
            )),
            "drain_before_remove -1 is out of range",
        ),
        (source("kind = \"zookeeper\""), "unknown variant `zookeeper`"),
        (source("kind = \"etcd\""), "reads [cluster]'s etcd"),
        (
            source("kind = \"dns\"\nname = \"_web._tcp.x\"\nport = 80"),
            "an SRV record names its port",
        ),
        (
            source(&format!("kind = \"file\"\npath = \"{}\"", list.display()))
                + "[[service.backend]]\nid = \"b1\"\naddress = \"10.0.1.1\"\n",
            "declare none here",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.write(&format!("bad{i}.toml"), &text);
        let daemon = Config::load(&path).expect_err(&text).to_string();
        assert!(daemon.contains(needle), "{daemon:?} should mention {needle:?}");
        let out = check(&path, false);
        assert_eq!(out.status.code(), Some(1), "{text}: {out:?}");
        assert_eq!(stderr_lines(&out), vec![format!("error: {daemon}")], "{text}");
    }
    let path = dir.write(
        "lb.toml",
        &source(&format!("kind = \"file\"\npath = \"{}\"", list.display())),
    );
    let out = check(&path, false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with(&format!(
            "warning: service web: discovery: cannot read {}",
            list.display()
        )) && lines[0].ends_with("(the service has no backends until it can be read)"),
        "{lines:#?}"
    );
    std::fs::write(
        &list,
        r#"[{"id": "a", "address": "10.0.1.1"}, {"id": "b", "address": "10.0.1.300"}, {"id": "c", "address": "10.0.1.3", "port": 0}]"#,
    )
    .expect("write the list");
    let lines = stderr_lines(&check(&path, false));
    assert_eq!(
        lines,
        [
            "warning: service web: discovery: b: address \"10.0.1.300\" is not an IP address: would be skipped (bad-address)",
            "warning: service web: discovery: c: port 0: would be skipped (bad-port)",
        ],
        "{lines:#?}"
    );
    std::fs::write(&list, r#"[{"id": "a", "address": "10.0.1.1"}]"#).expect("write the list");
    let out = check(&path, false);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// What a change would be warned about, the file says too: a service whose backends all have
/// weight 0, and a port-0 service over a VIP another service uses (status 0). A VIP that is
/// an address of this host is the daemon's error, in its words (status 1).
#[test]
fn dangerous_services_are_warned_about_and_an_own_address_refused() {
    let dir = Dir::new("dangerous");
    let text = format!(
        "{DAEMON}{}[[service]]\nname = \"all\"\nvip = \"10.0.0.1\"\nport = 0\nprotocol = \"tcp\"\n",
        service("").replace("address = \"10.0.1.1\"\n", "address = \"10.0.1.1\"\nweight = 0\n")
    );
    let out = check(&dir.write("lb.toml", &text), false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        [
            "warning: service web: every backend has weight 0: its new flows are dropped (drop_no_backend), established ones stay (fix: give a backend a weight above 0)",
            "warning: service all: port 0 takes every other tcp port of 10.0.0.1, which web (port 80) also uses: flows to any other port of that VIP now go to all's backends",
        ]
    );
    // 127.0.0.1 is an address of every host (lo).
    let own = dir.write(
        "own.toml",
        &format!("{DAEMON}{}", service("").replace("10.0.0.1", "127.0.0.1")),
    );
    let out = check(&own, false);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        [
            "error: service web: VIP 127.0.0.1 is an address of this host: its port 80/tcp would go to the backends, not to this host's own services (fix: another VIP, or allow_own_address = true (lb service add --allow-own-address) if that is meant)"
        ]
    );
    let allowed = dir.write(
        "allowed.toml",
        &format!(
            "{DAEMON}{}",
            service("allow_own_address = true").replace("10.0.0.1", "127.0.0.1")
        ),
    );
    assert_eq!(check(&allowed, false).status.code(), Some(0));
}

/// With BGP set up, a VIP whose family no peer carries is never announced: said per family.
#[test]
fn a_vip_no_bgp_peer_can_carry_is_a_warning() {
    let dir = Dir::new("bgp-family");
    let mut text = format!(
        "{DAEMON}[daemon.bgp]\nlocal_as = 65001\nrouter_id = \"10.0.0.2\"\n[[daemon.bgp.peer]]\naddress = \"10.0.9.1\"\nas = 65000\n"
    );
    text.push_str(&service(""));
    text.push_str(
        "[[service]]\nname = \"web6\"\nvip = \"2001:db8::1\"\nport = 80\nprotocol = \"tcp\"\n[[service.backend]]\nid = \"b1\"\naddress = \"2001:db8:1::1\"\n",
    );
    let path = dir.write("lb.toml", &text);
    let out = check(&path, false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        vec![
            "warning: service web6: IPv6 VIP and no IPv6 [[daemon.bgp.peer]]: never announced (fix: add a peer of that family)"
                .to_string()
        ]
    );
    // An IPv6 peer as well: nothing to say.
    let both = text.replace(
        "[[service]]\nname = \"web\"",
        "[[daemon.bgp.peer]]\naddress = \"fd00:9::1\"\nas = 65000\n[[service]]\nname = \"web\"",
    );
    let out = check(&dir.write("both.toml", &both), false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `[cluster]`'s etcd over TLS and with a user: settings that do not go together are the
/// file's errors; the files they name are read and checked as each connect reads them, each
/// problem one line; a plaintext endpoint off this host is a warning.
#[test]
fn etcd_tls_and_auth_settings_and_files_are_checked_each_in_one_line() {
    use rcgen::{CertificateParams, KeyPair};
    let dir = Dir::new("etcd");
    let cluster = |lines: &str| format!("{DAEMON}[cluster]\nname = \"edge\"\nnode = \"n1\"\n{lines}");
    // The file's own errors: the daemon's line, status 1.
    let refused = [
        (
            "etcd = [\"https://10.0.0.1:2379\"]\n",
            "is https:// but cluster.etcd_ca is not set",
        ),
        (
            "etcd = [\"https://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\netcd_ca = \"/ca.pem\"\n",
            "mixes http:// and https://",
        ),
        (
            "etcd = [\"http://10.0.0.1:2379\"]\netcd_ca = \"/ca.pem\"\n",
            "etcd_ca is set but",
        ),
        (
            "etcd = [\"https://10.0.0.1:2379\"]\netcd_ca = \"/ca.pem\"\netcd_cert = \"/c.pem\"\n",
            "etcd_cert and etcd_key go together",
        ),
        (
            "etcd = [\"http://127.0.0.1:2379\"]\netcd_user = \"lb\"\n",
            "etcd_user and etcd_password_file go together",
        ),
    ];
    for (i, (lines, said)) in refused.iter().enumerate() {
        let path = dir.write(&format!("refused{i}.toml"), &cluster(lines));
        let daemon = Config::load(&path).expect_err(lines).to_string();
        assert!(daemon.contains(said), "{daemon}");
        let out = check(&path, false);
        assert_eq!(out.status.code(), Some(1), "{lines}: {out:?}");
        assert_eq!(stderr_lines(&out), vec![format!("error: {daemon}")], "{lines}");
    }

    // The files: a CA, a client certificate and its key, another key, a password file.
    let ca_key = KeyPair::generate().expect("key");
    let ca = dir.write(
        "ca.pem",
        &CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .self_signed(&ca_key)
            .expect("CA")
            .pem(),
    );
    let key = dir.join_secret("key.pem");
    std::fs::write(&key, ca_key.serialize_pem()).expect("key");
    let other_key = dir.join_secret("other-key.pem");
    std::fs::write(&other_key, KeyPair::generate().expect("key").serialize_pem()).expect("key");
    let password = dir.join_secret("password");
    let open_password = dir.write("open-password", "secret\n");
    std::fs::set_permissions(
        &open_password,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let empty_password = dir.join_secret("empty-password");
    std::fs::write(&empty_password, "\n").expect("empty");
    let junk = dir.write("junk.pem", "not a certificate\n");
    let missing = dir.0.join("missing.pem");
    let tls = |ca: &Path, cert: &Path, key: &Path, password: &Path| {
        cluster(&format!(
            "etcd = [\"https://10.0.0.1:2379\"]\netcd_ca = \"{}\"\netcd_cert = \"{}\"\netcd_key = \"{}\"\netcd_user = \"lb\"\netcd_password_file = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display(),
            password.display()
        ))
    };
    let good = dir.write("good.toml", &tls(&ca, &ca, &key, &password));
    let out = check(&good, false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let cases = [
        (
            tls(&missing, &ca, &key, &password),
            format!("error: cluster.etcd_ca: cannot read {}", missing.display()),
        ),
        (
            tls(&junk, &ca, &key, &password),
            format!("error: cluster.etcd_ca: no certificate in {}", junk.display()),
        ),
        (
            tls(&ca, &missing, &key, &password),
            format!("error: cluster.etcd_cert: cannot read {}", missing.display()),
        ),
        (
            tls(&ca, &ca, &junk, &password),
            format!("error: cluster.etcd_key: no private key in {}", junk.display()),
        ),
        (
            tls(&ca, &ca, &other_key, &password),
            format!("error: cluster.etcd_key {} does not fit", other_key.display()),
        ),
        (
            tls(&ca, &ca, &key, &missing),
            format!(
                "error: cluster.etcd_password_file: cannot read {}",
                missing.display()
            ),
        ),
        (
            tls(&ca, &ca, &key, &open_password),
            format!(
                "error: cluster.etcd_password_file {} is readable by others",
                open_password.display()
            ),
        ),
        (
            tls(&ca, &ca, &key, &empty_password),
            format!(
                "error: cluster.etcd_password_file {} is empty",
                empty_password.display()
            ),
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.write(&format!("files{i}.toml"), text);
        Config::load(&path).expect("the file itself is valid");
        let out = check(&path, false);
        assert_eq!(out.status.code(), Some(1), "{want}: {out:?}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].starts_with(want.as_str()),
            "{:?} should start with {want:?}",
            lines[0]
        );
    }

    // Plaintext off this host: a warning; on loopback, none.
    let plain = dir.write(
        "plain.toml",
        &cluster("etcd = [\"http://10.0.0.1:2379\", \"http://127.0.0.1:2379\"]\n"),
    );
    let out = check(&plain, false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        vec!["warning: cluster.etcd http://10.0.0.1:2379 is plaintext and not on this host: the cluster's state crosses the network in clear (fix: an https:// endpoint with etcd_ca)".to_string()]
    );
    let local = dir.write("local.toml", &cluster("etcd = [\"http://[::1]:2379\"]\n"));
    let out = check(&local, false);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}
