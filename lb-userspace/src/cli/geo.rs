//! `lb geo`: the geographic data in use and which region serves each region's clients.

use clap::Subcommand;

use crate::api::Request;

#[derive(Subcommand, Debug)]
pub enum GeoCmd {
    /// The data set in use (prefixes per region) and, per geo service and region, the region
    /// whose backends serve it.
    Show,
    /// Read `[daemon.geo] data` again and swap it in whole; a bad file is refused (naming its
    /// line) and the running data stays.
    Reload,
}

pub fn request(cmd: &GeoCmd) -> Request {
    match cmd {
        GeoCmd::Show => Request::Geo,
        GeoCmd::Reload => Request::GeoReload,
    }
}
