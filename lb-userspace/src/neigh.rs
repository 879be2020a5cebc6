// TEMPORARY STUB (being replaced by the real resolver).
use std::{net::IpAddr, time::Duration};
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop { pub ifindex: u32, pub ifname: String, pub src_mac: [u8; 6], pub dst_mac: [u8; 6] }
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no route to {addr}")] NoRoute { addr: IpAddr },
    #[error("unresolved {addr} on {ifname}")] Unresolved { addr: IpAddr, ifname: String },
}
pub struct Resolver;
impl Resolver {
    pub fn new() -> Result<Self, ResolveError> { Ok(Self) }
    pub async fn resolve(&self, addr: IpAddr, _t: Duration) -> Result<NextHop, ResolveError> { Err(ResolveError::NoRoute { addr }) }
    pub async fn lookup(&self, addr: IpAddr) -> Result<NextHop, ResolveError> { Err(ResolveError::NoRoute { addr }) }
}
