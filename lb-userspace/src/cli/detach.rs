//! `lb detach`: remove an instance from this host: its daemon stopped, BIRD stopped, XDP
//! detached, its pins, check path and state file removed.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use crate::{api, bgp, config, dataplane};

pub fn run(run_dir: &Path, instance: &str, json: bool) -> anyhow::Result<i32> {
    let socket = config::socket_path(run_dir, instance);
    if socket.exists() && api::call(&socket, &api::Request::Shutdown, Duration::from_secs(5)).is_ok() {
        wait_gone(&socket);
    }
    // Withdraw first: BIRD's sessions close and the routers stop sending here before
    // the program goes.
    let bird = bgp::bird::Paths::new(run_dir, instance);
    if bgp::bird::stop(&bird).map_err(|e| anyhow::anyhow!("{e}"))? {
        log::info!("stopped BIRD: this node's VIPs are withdrawn");
    }
    let mut removed = dataplane::detach_instance(instance)?;
    // A daemon that stopped without closing it leaves its check path behind.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if rt.block_on(dataplane::steer::remove_instance(instance)) {
        removed.push(dataplane::steer::device_names(instance).0);
    }
    let _ = std::fs::remove_file(config::state_path(run_dir, instance));
    if json {
        println!("{}", serde_json::json!({ "removed": removed }));
    } else {
        println!("detached instance {} ({} pins removed)", instance, removed.len());
    }
    Ok(0)
}

/// Waits (bounded) for a stopping daemon to remove its socket.
fn wait_gone(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
