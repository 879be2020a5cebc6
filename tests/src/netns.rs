//! Named network namespaces with guaranteed removal.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace from `ip netns add`, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Unique per process and call, so parallel or aborted runs never collide.
    pub fn new(tag: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("lbt-{}-{n}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs inside this namespace (setns before exec; /sys stays as it is, so
    /// /sys/fs/bpf stays visible, unlike `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let file = File::open(self.path()).expect("netns file");
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// A veth pair: `name` here, `peer_name` in `peer`, both up.
    pub fn veth(&self, name: &str, peer: &NetNs, peer_name: &str) -> Result<()> {
        self.sh(&format!(
            "ip link add {name} type veth peer name {peer_name} netns {} && ip link set {name} up",
            peer.name
        ))?;
        peer.sh(&format!("ip link set {peer_name} up"))?;
        Ok(())
    }

    /// Waits (bounded) until no IPv6 address here is tentative: neighbour discovery needs fresh
    /// links' addresses out of duplicate address detection first. Says whether they are.
    pub fn wait_dad(&self, timeout: std::time::Duration) -> bool {
        crate::wait_until(timeout, || {
            self.sh("ip -6 addr show tentative")
                .is_ok_and(|o| o.trim().is_empty())
        })
    }

    /// Runs a shell command line in the namespace; fails with its stderr.
    pub fn sh(&self, line: &str) -> Result<String> {
        let out = run(self.command("sh").args(["-c", line]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// Moves the calling thread into the network namespace `file` names (a `/run/netns` or
/// `/proc/.../ns/net` file).
pub fn enter(file: &File) -> std::io::Result<()> {
    // SAFETY: setns on this thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread of its own, named `name`, that has entered `ns`, and returns at once
/// (`in_ns` waits): for traffic that runs while the test goes on.
pub fn spawn_in<T: Send + 'static>(
    ns: &NetNs,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = File::open(ns.path()).expect("netns file");
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            enter(&file).expect("setns");
            f()
        })
        .expect("spawn a thread")
}

/// Runs `f` on a fresh thread that has entered `ns`. Sockets made there stay in `ns`. The thread
/// is scoped, so `f` may borrow (to attach a program it does not own, for example).
pub fn in_ns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(ns.path()).expect("netns file");
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(&file).expect("setns");
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    })
}
