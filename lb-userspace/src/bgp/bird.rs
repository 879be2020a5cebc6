//! BIRD 2, run and driven by the daemon: its config rendered from `[daemon.bgp]` and the VIPs
//! to announce (pure), the process started or adopted, reconfigured with `birdc configure`,
//! and its protocols read with `birdc show protocols`. BIRD lives beside the daemon, not under
//! it: a restarted daemon adopts the BIRD that runs, so routes stay up as forwarding does.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::Command;

use crate::model::bgp_settings::{BgpPeer, BgpSettings};

/// How long one `birdc` or `bird` call may take.
const CALL: Duration = Duration::from_secs(3);

/// BIRD's files for one instance, in the run directory.
#[derive(Clone, Debug)]
pub struct Paths {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl Paths {
    pub fn new(run_dir: &Path, instance: &str) -> Self {
        let file = |ext: &str| run_dir.join(format!("{instance}.bird.{ext}"));
        Self {
            config: file("conf"),
            socket: file("ctl"),
            pid: file("pid"),
            log: file("log"),
        }
    }
}

/// The static protocol holding the announced IPv4 (and IPv6) VIPs.
const VIPS4: &str = "lb_vips4";
const VIPS6: &str = "lb_vips6";

/// BIRD's name for the session to `settings.peers[i]`.
pub fn protocol_name(i: usize) -> String {
    format!("lb_peer{}", i + 1)
}

/// The whole config: every VIP of `vips` as a host route in a static protocol, exported to
/// each peer of its family with this node as the next hop; nothing imported, nothing put in
/// this node's kernel tables. Pure.
pub fn render(settings: &BgpSettings, log: &Path, vips: &BTreeSet<IpAddr>) -> String {
    let mut c = String::from("# Written by lb from [daemon.bgp]; rewritten on every change.\n");
    if let Some(id) = settings.router_id {
        let _ = writeln!(c, "router id {id};");
    }
    let _ = writeln!(c, "log \"{}\" {{ info, warning, error, fatal }};", log.display());
    c.push_str("protocol device { scan time 10; }\n");
    if settings.peers.iter().any(|p| p.bfd) {
        c.push_str(
            "protocol bfd lb_bfd {\n  interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };\n}\n",
        );
    }
    for (name, v6) in [(VIPS4, false), (VIPS6, true)] {
        let _ = writeln!(
            c,
            "protocol static {name} {{\n  {};",
            if v6 { "ipv6" } else { "ipv4" }
        );
        for vip in vips.iter().filter(|v| v.is_ipv6() == v6) {
            let len = if v6 { 128 } else { 32 };
            let _ = writeln!(c, "  route {vip}/{len} blackhole;");
        }
        c.push_str("}\n");
    }
    for (i, p) in settings.peers.iter().enumerate() {
        peer(&mut c, settings, i, p);
    }
    c
}

fn peer(c: &mut String, s: &BgpSettings, i: usize, p: &BgpPeer) {
    let (family, statics) = if p.address.is_ipv6() {
        ("ipv6", VIPS6)
    } else {
        ("ipv4", VIPS4)
    };
    let _ = writeln!(c, "protocol bgp {} {{", protocol_name(i));
    let _ = writeln!(c, "  local port {} as {};", s.listen_port, s.local_as);
    let _ = writeln!(c, "  neighbor {} port {} as {};", p.address, p.port, p.asn);
    if s.hold_time == 0 {
        c.push_str("  hold time 0;\n");
    } else {
        let keepalive = (s.hold_time / 3).max(1);
        let _ = writeln!(c, "  hold time {}; keepalive time {keepalive};", s.hold_time);
    }
    // A session that failed is tried again soon: the router may be back in seconds.
    c.push_str("  connect retry time 5; error wait time 1, 10;\n");
    if p.bfd {
        c.push_str("  bfd on;\n");
    }
    let _ = writeln!(
        c,
        "  {family} {{ import none; export where proto = \"{statics}\"; next hop self; }};\n}}"
    );
}

/// A BGP session as `birdc show protocols` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProtocolState {
    pub name: String,
    /// `up`, `start`, `down`, ...
    pub state: String,
    /// The rest of the line: `Established`, `Active`, `Connect`, or an error.
    pub info: String,
}

/// Parses `birdc show protocols`: the BGP protocols' states. Pure.
pub fn parse_protocols(text: &str) -> Vec<ProtocolState> {
    text.lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let name = cols.next()?;
            let proto = cols.next()?;
            if proto != "BGP" {
                return None;
            }
            let _table = cols.next()?;
            let state = cols.next()?;
            // "since" is a time, or a date and a time.
            let rest: Vec<&str> = cols.collect();
            let skip = rest
                .iter()
                .take(2)
                .take_while(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
                .count();
            Some(ProtocolState {
                name: name.to_string(),
                state: state.to_string(),
                info: rest[skip..].join(" "),
            })
        })
        .collect()
}

/// BIRD's answer, as one line: its last line with text.
fn one_line(out: &std::process::Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("BIRD ") && *l != "Reading configuration from")
        .map(|l| l.chars().map(|c| if c.is_control() { ' ' } else { c }).collect())
        .next_back()
        .unwrap_or_else(|| format!("exit status {}", out.status))
}

async fn call(program: &Path, args: &[&std::ffi::OsStr]) -> Result<std::process::Output, String> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CALL, child).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{} not found (install BIRD 2: apt install bird2, or set daemon.bgp.bird)",
            program.display()
        )),
        Ok(Err(e)) => Err(format!("{}: {e}", program.display())),
        Err(_) => Err(format!("{} took longer than {CALL:?}", program.display())),
    }
}

/// A running BIRD, driven over its control socket.
pub struct Bird {
    pub paths: Paths,
    bird: PathBuf,
    birdc: PathBuf,
}

impl Bird {
    pub fn new(paths: Paths, settings: &BgpSettings) -> Self {
        Self {
            paths,
            bird: settings.bird.clone(),
            birdc: settings.birdc.clone(),
        }
    }

    async fn birdc(&self, args: &[&str]) -> Result<std::process::Output, String> {
        let mut all: Vec<&std::ffi::OsStr> = vec!["-s".as_ref(), self.paths.socket.as_os_str()];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        call(&self.birdc, &all).await
    }

    /// Writes `config` and makes BIRD run it: reconfigures the one that runs (`running`: it
    /// answered on its socket just now), or starts one.
    pub async fn apply(&self, config: &str, running: bool) -> Result<(), String> {
        crate::files::write_private(&self.paths.config, config.as_bytes())
            .map_err(|e| format!("write {}: {e}", self.paths.config.display()))?;
        if running {
            let out = self.birdc(&["configure"]).await?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("Reconfigured") || text.contains("Reconfiguration in progress") {
                return Ok(());
            }
            return Err(format!("BIRD refused its config: {}", one_line(&out)));
        }
        // A socket left by a BIRD that died would make the new one fail to start.
        let _ = std::fs::remove_file(&self.paths.socket);
        let out = call(
            &self.bird,
            &[
                "-c".as_ref(),
                self.paths.config.as_os_str(),
                "-s".as_ref(),
                self.paths.socket.as_os_str(),
                "-P".as_ref(),
                self.paths.pid.as_os_str(),
            ],
        )
        .await?;
        if !out.status.success() {
            return Err(format!("BIRD did not start: {}", one_line(&out)));
        }
        Ok(())
    }

    /// The BGP sessions' states (`None`: BIRD does not answer).
    pub async fn protocols(&self) -> Option<Vec<ProtocolState>> {
        let out = self.birdc(&["show", "protocols"]).await.ok()?;
        out.status
            .success()
            .then(|| parse_protocols(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Stops the BIRD of `paths`, if one runs: its sessions close, so every peer drops this node's
/// routes at once. Waits for it to go, at most 5 s. Blocking.
pub fn stop(paths: &Paths) -> Result<bool, String> {
    let pid = match pid_from_file(paths)? {
        Some(pid) => pid,
        // No pid file (removed by hand, or a BIRD started without `-P`): the process that
        // serves this instance's control socket is still ours to stop.
        None => match serving(&paths.socket) {
            Some(pid) => pid,
            None => return Ok(false),
        },
    };
    // SAFETY: kill with a checked pid and a constant signal.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(format!(
            "stop BIRD (pid {pid}): {}",
            std::io::Error::last_os_error()
        ));
    }
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while is_bird(pid) {
        if std::time::Instant::now() > until {
            return Err(format!("BIRD (pid {pid}) still runs 5 s after SIGTERM"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&paths.socket);
    let _ = std::fs::remove_file(&paths.pid);
    Ok(true)
}

/// The pid in `paths.pid` if it names a running BIRD; a stale file is removed.
fn pid_from_file(paths: &Paths) -> Result<Option<i32>, String> {
    let Ok(text) = std::fs::read_to_string(&paths.pid) else {
        return Ok(None);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Err(format!("{} holds no pid", paths.pid.display()));
    };
    if pid <= 1 {
        return Err(format!("{} holds pid {pid}", paths.pid.display()));
    }
    // Only a BIRD: a stale file may name a process that has nothing to do with it.
    if !is_bird(pid) {
        let _ = std::fs::remove_file(&paths.pid);
        return Ok(None);
    }
    Ok(Some(pid))
}

/// Whether `pid` is a live BIRD (a zombie has exited: its state is `Z`).
fn is_bird(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ...": comm may hold spaces, so split at the last ')'.
    let Some((head, tail)) = stat.rsplit_once(')') else {
        return false;
    };
    head.ends_with("(bird") && !tail.trim_start().starts_with(['Z', 'X'])
}

/// The BIRD whose command line names `socket` as its control socket (`-s`), if one runs.
fn serving(socket: &Path) -> Option<i32> {
    let want = socket.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        if pid <= 1 || !is_bird(pid) {
            return None;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let mut names_it = false;
        while let Some(arg) = args.next() {
            if arg == b"-s" && args.next() == Some(want) {
                names_it = true;
            }
        }
        names_it.then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::bgp_settings::BgpPeer;

    fn settings(bfd: bool) -> BgpSettings {
        BgpSettings {
            local_as: 65001,
            router_id: Some("10.0.0.2".parse().unwrap()),
            hold_time: 3,
            listen_port: 179,
            bird: "bird".into(),
            birdc: "birdc".into(),
            peers: vec![
                BgpPeer {
                    address: "10.0.0.1".parse().unwrap(),
                    asn: 65000,
                    bfd,
                    port: 179,
                },
                BgpPeer {
                    address: "fd00::1".parse().unwrap(),
                    asn: 65000,
                    bfd: false,
                    port: 179,
                },
            ],
        }
    }

    #[test]
    fn each_vip_goes_to_the_peers_of_its_family_as_a_host_route() {
        let vips: BTreeSet<IpAddr> = ["10.100.0.1", "10.100.0.2", "fd99::1"]
            .iter()
            .map(|v| v.parse().unwrap())
            .collect();
        let c = render(&settings(true), Path::new("/run/lb/x.bird.log"), &vips);
        assert!(c.contains("router id 10.0.0.2;"));
        assert!(c.contains("route 10.100.0.1/32 blackhole;"));
        assert!(c.contains("route 10.100.0.2/32 blackhole;"));
        assert!(c.contains("route fd99::1/128 blackhole;"));
        assert!(c.contains("neighbor 10.0.0.1 port 179 as 65000;"));
        assert!(c.contains("ipv4 { import none; export where proto = \"lb_vips4\"; next hop self; };"));
        assert!(c.contains("ipv6 { import none; export where proto = \"lb_vips6\"; next hop self; };"));
        assert!(c.contains("hold time 3; keepalive time 1;"));
        assert!(c.contains("protocol bfd lb_bfd"));
        assert_eq!(c.matches("bfd on;").count(), 1, "only the peer that asks for BFD");
        // Nothing announced: the static protocols are empty, the sessions stay.
        let none = render(&settings(false), Path::new("/x.log"), &BTreeSet::new());
        assert!(!none.contains("route "));
        assert!(!none.contains("bfd"));
        assert_eq!(none.matches("protocol bgp").count(), 2);
    }

    #[test]
    fn the_protocol_list_gives_each_sessions_state() {
        let text = "BIRD 2.0.12 ready.\n\
            Name       Proto      Table      State  Since         Info\n\
            device1    Device     ---        up     01:53:03.554  \n\
            lb_vips4   Static     master4    up     01:53:03.554  \n\
            lb_peer1   BGP        ---        up     01:53:14.285  Established   \n\
            lb_peer2   BGP        ---        start  2026-12-07 01:53:03  Active        Socket: Connection refused\n\
            lb_peer3   BGP        ---        down   01:53:03.563  Error: No listening socket\n";
        let p = parse_protocols(text);
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].name.as_str(), p[0].state.as_str(), p[0].info.as_str()),
            ("lb_peer1", "up", "Established")
        );
        assert_eq!(p[1].state, "start");
        assert_eq!(p[1].info, "Active Socket: Connection refused");
        assert_eq!(p[2].info, "Error: No listening socket");
    }

    /// `lb detach` stopped no BIRD whose pid file was gone; it stops the one serving the
    /// instance's socket, and never a process a stale pid file names.
    #[test]
    fn stop_finds_the_bird_of_the_socket_without_its_pid_file() {
        if std::process::Command::new("bird")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipping: no bird on PATH (cargo xtask setup installs bird2)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path(), "t");
        // No peers: this BIRD sends nothing anywhere.
        std::fs::write(&paths.config, "router id 10.9.9.9;\nprotocol device {}\n").unwrap();
        // Stopped whatever the test's outcome (it holds the test's descriptors, locks included).
        struct Kill(PathBuf);
        impl Drop for Kill {
            fn drop(&mut self) {
                if let Some(pid) = serving(&self.0) {
                    // SAFETY: the BIRD this test started, found by its socket.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _kill = Kill(paths.socket.clone());
        let started = std::process::Command::new("bird")
            .arg("-c")
            .arg(&paths.config)
            .arg("-s")
            .arg(&paths.socket)
            .arg("-P")
            .arg(&paths.pid)
            .status()
            .unwrap();
        assert!(started.success());
        // BIRD writes its pid file after it forks into the background.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        let pid: i32 = loop {
            let text = std::fs::read_to_string(&paths.pid).unwrap_or_default();
            if let Ok(pid) = text.trim().parse() {
                break pid;
            }
            assert!(std::time::Instant::now() < until, "BIRD wrote no pid file in 5 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(is_bird(pid));

        // A stale pid file naming another process: that process is left alone.
        std::fs::write(&paths.pid, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(pid_from_file(&paths), Ok(None));
        assert!(!paths.pid.exists(), "the stale pid file stays");

        assert_eq!(stop(&paths), Ok(true));
        assert!(!is_bird(pid), "BIRD {pid} still runs");
        assert!(!paths.socket.exists());
        assert_eq!(stop(&paths), Ok(false));
    }
}
