//! What the announcer publishes: BIRD's state, each BGP session's, which VIPs this node
//! announces and why the others are not. Readers (`lb status`, metrics) take it from here.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BgpStatus {
    /// `[daemon.bgp]` is set.
    pub enabled: bool,
    /// BIRD answers on its control socket.
    pub bird_running: bool,
    /// Why BIRD is not running or refused its config (one line), if it is so.
    pub error: Option<String>,
    pub draining: bool,
    pub sessions: Vec<Session>,
    /// Each VIP this node announces.
    pub announced: Vec<IpAddr>,
    /// Each service, and whether its VIP is announced or why not.
    pub services: BTreeMap<String, Announcement>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Session {
    pub peer: IpAddr,
    /// BIRD's state of the protocol (`up`, `start`, `down`, ...), and the BGP state.
    pub state: String,
    pub bgp_state: String,
    /// BIRD's last error or info for it, if any.
    pub info: String,
    pub up: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Announcement {
    pub vip: IpAddr,
    pub announced: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
