//! `[daemon.geo]`: the regions, their failover order, the data file and the default region;
//! and one prefix of the data, as the data plane's tries take it. The data's parsers are
//! `strategy::geo`.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use lb_common::geo::MAX_REGIONS;
use serde::{Deserialize, Serialize};

/// `[geo]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeoSettings {
    /// The client prefix → region data: a CSV of `prefix,region` lines, or (by its `.mmdb`
    /// extension) a MaxMind country or city database read through `countries` and `continents`.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// MaxMind data: ISO country code → region (checked first).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub countries: BTreeMap<String, String>,
    /// MaxMind data: continent code (EU, NA, AS, ...) → region, for countries not listed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub continents: BTreeMap<String, String>,
    /// Where clients of no known prefix go.
    pub default_region: String,
    /// Every region, each with the regions that take its clients, in order, when it has no
    /// healthy backend.
    #[serde(default)]
    pub failover: BTreeMap<String, Vec<String>>,
}

impl GeoSettings {
    /// Every region, sorted: a region's id is its index.
    pub fn regions(&self) -> Vec<&str> {
        let mut r: Vec<&str> = self
            .failover
            .iter()
            .flat_map(|(k, v)| std::iter::once(k.as_str()).chain(v.iter().map(String::as_str)))
            .chain(std::iter::once(self.default_region.as_str()))
            .chain(
                self.countries
                    .values()
                    .chain(self.continents.values())
                    .map(String::as_str),
            )
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// Where a geo service's backend serves: its region when that is one of these, else its
    /// zone when that is (so the regions may name zones: clients' subnets per zone), else none.
    pub fn place<'a>(&self, region: Option<&'a str>, zone: Option<&'a str>) -> Option<&'a str> {
        let regions = self.regions();
        [region, zone].into_iter().flatten().find(|p| regions.contains(p))
    }

    pub fn id(&self, region: &str) -> Option<u32> {
        self.regions().iter().position(|r| *r == region).map(|i| i as u32)
    }

    pub fn validate(&self) -> Result<(), String> {
        let regions = self.regions();
        for r in &regions {
            crate::model::validate_name("region", r, 64).map_err(|e| format!("geo: {e}"))?;
        }
        if regions.len() > MAX_REGIONS as usize {
            return Err(format!("geo: {} regions, at most {MAX_REGIONS}", regions.len()));
        }
        for (r, order) in &self.failover {
            if order.contains(r) {
                return Err(format!("geo: region {r} lists itself in its failover"));
            }
        }
        Ok(())
    }

    /// The regions a region's clients try, in order: itself, then its failover list.
    fn chain<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a str> {
        std::iter::once(region).chain(
            self.failover
                .get(region)
                .into_iter()
                .flatten()
                .map(String::as_str),
        )
    }

    /// Which region serves `region`'s clients, given which regions have a backend that takes
    /// new flows: the first of its chain that has one; `None` when none has (then every
    /// backend that takes new flows serves them).
    pub fn serving<'a>(&'a self, region: &'a str, live: impl Fn(&str) -> bool) -> Option<&'a str> {
        self.chain(region).find(|r| live(r))
    }
}

/// One line of geo data: a prefix and its region's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeoPrefix {
    pub addr: IpAddr,
    pub len: u8,
    pub region: u32,
}
