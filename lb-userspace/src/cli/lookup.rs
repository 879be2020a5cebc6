//! `lb lookup`: which backend a flow gets.

use std::net::SocketAddr;

use clap::Args;
use serde_json::Value;

use super::shared::fmt_ip;
use crate::{api::Request, config::Protocol};

#[derive(Args, Debug)]
pub struct LookupArgs {
    #[arg(long, short = 'p', default_value = "tcp")]
    pub protocol: Protocol,
    /// Client address and port, e.g. 10.0.0.1:40000 or [fd00::1]:40000.
    #[arg(long)]
    pub src: SocketAddr,
    /// VIP and port.
    #[arg(long)]
    pub dst: SocketAddr,
}

pub fn request(args: &LookupArgs) -> Request {
    Request::Lookup {
        protocol: args.protocol,
        src: args.src,
        dst: args.dst,
    }
}

pub fn print(data: &Value) {
    println!(
        "{} -> {} ({}) via {}",
        data["service"].as_str().unwrap_or_default(),
        data["backend"].as_str().unwrap_or_default(),
        fmt_ip(&data["address"]),
        data["source"].as_str().unwrap_or_default()
    );
}
