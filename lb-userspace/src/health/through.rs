//! Checks through the VIP (`through = "vip"`): what each one needs to leave by the check path.
//! The path is made when the first such check runs, and made again (at most every
//! `RETRY` after a failure) if making it failed.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::steer;
use log::warn;
use tokio::sync::{Mutex, watch};

use super::probe::Via;
use crate::{
    dataplane::{self, steer::CheckPath},
    model::BackendRef,
    snapshot::Snapshot,
};

/// Least time between two attempts to make the check path.
const RETRY: Duration = Duration::from_secs(10);

pub struct Steering {
    /// What making the check path needs: the instance's pins and its maps' sizes.
    data_plane: dataplane::Settings,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    path: Mutex<Path>,
}

#[derive(Default)]
struct Path {
    open: Option<CheckPath>,
    /// Set by `close`: a check still under way must not make the path again.
    closed: bool,
    /// The last failure to make it, and when.
    failed: Option<(Instant, String)>,
}

impl Steering {
    pub fn new(data_plane: dataplane::Settings, snapshot: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self {
            data_plane,
            snapshot,
            path: Mutex::new(Path::default()),
        }
    }

    /// The mark and source of a check of `backend` (at `address`) through the VIP.
    pub async fn via(&self, backend: &BackendRef, address: IpAddr) -> Result<Via, String> {
        {
            let mut path = self.path.lock().await;
            if path.closed {
                return Err("the daemon is stopping".into());
            }
            if path.open.is_none() {
                if let Some((at, why)) = &path.failed
                    && at.elapsed() < RETRY
                {
                    return Err(why.clone());
                }
                let attached = self.snapshot.borrow().attachments.clone();
                match CheckPath::open(&self.data_plane, &attached).await {
                    Ok(p) => {
                        path.open = Some(p);
                        path.failed = None;
                    }
                    Err(why) => {
                        warn!("checks through the VIP fail until this is fixed: {why}");
                        path.failed = Some((Instant::now(), why.clone()));
                        return Err(why);
                    }
                }
            }
        }
        let slot = {
            let snap = self.snapshot.borrow();
            // The data plane cannot reach it yet either: no MAC to send to.
            if !snap.hops.contains_key(&address) {
                return Err(format!("next hop of {address} not resolved yet"));
            }
            snap.assignments
                .slot_of(backend)
                .map(|s| s.slot)
                .ok_or_else(|| format!("backend {backend} has no slot in the data plane yet"))?
        };
        let mark = steer::mark(slot).ok_or_else(|| format!("slot {slot} does not fit a check mark"))?;
        let source = crate::dataplane::steer::source_toward(address)
            .map_err(|e| format!("no route to backend {address}: {e}"))?;
        Ok(Via { mark, source })
    }

    /// Removes the check path, if it was made.
    pub async fn close(&self) {
        let open = {
            let mut path = self.path.lock().await;
            path.closed = true;
            path.open.take()
        };
        if let Some(p) = open {
            p.close().await;
        }
    }
}
