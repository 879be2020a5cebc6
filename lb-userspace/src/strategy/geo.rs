//! Geographic routing's data: the file's parsers (a CSV of `prefix,region`, or a MaxMind
//! `.mmdb` whose countries and continents map to regions). Pure: text in, prefixes out; the
//! writer loads them into the data plane's tries. Per-client lookups are never logged or
//! exported, only per-region counts. The settings are `model::geo_settings`.

use std::{collections::BTreeMap, net::IpAddr};

use crate::model::geo_settings::{GeoPrefix, GeoSettings};

/// Largest geo data file read: a MaxMind city database is about 70 MiB, a country one or a
/// CSV of every routed prefix well under that.
pub const MAX_DATA: u64 = 256 * crate::files::MIB;

/// The data file at `path`, parsed as its extension says (`.mmdb`: MaxMind; else CSV).
/// Blocking.
pub fn load(path: &std::path::Path, geo: &GeoSettings) -> Result<Vec<GeoPrefix>, String> {
    let bytes = crate::files::read_regular(path, MAX_DATA)?;
    let parsed = if path.extension().is_some_and(|e| e == "mmdb") {
        parse_mmdb(bytes, geo)
    } else {
        String::from_utf8(bytes)
            .map_err(|e| format!("not UTF-8 text: {e}"))
            .and_then(|text| parse_csv(&text, geo))
    };
    parsed.map_err(|e| format!("{}: {e}", path.display()))
}

/// `[daemon.geo] data` loaded as the daemon loads it, the error as it says it. Blocking.
pub fn load_configured(path: &std::path::Path, geo: &GeoSettings) -> Result<Vec<GeoPrefix>, String> {
    load(path, geo).map_err(|e| format!("geo data {e}"))
}

/// How many prefixes each region has: what status shows (never a client's).
pub fn per_region(prefixes: &[GeoPrefix], geo: &GeoSettings) -> BTreeMap<String, usize> {
    let regions = geo.regions();
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for p in prefixes {
        *out.entry(regions[p.region as usize].to_string()).or_default() += 1;
    }
    out
}

/// A MaxMind database's networks, each given the region of its country (`countries`) or else
/// its continent (`continents`); networks of neither stay out (their clients get the default
/// region).
pub fn parse_mmdb(bytes: Vec<u8>, geo: &GeoSettings) -> Result<Vec<GeoPrefix>, String> {
    use maxminddb::geoip2::Country;
    let reader = maxminddb::Reader::from_source(bytes).map_err(|e| format!("not a MaxMind database: {e}"))?;
    let mut out = Vec::new();
    let networks = reader
        .networks(Default::default())
        .map_err(|e| format!("MaxMind database: {e}"))?;
    for item in networks {
        let item = item.map_err(|e| format!("MaxMind database: {e}"))?;
        let net = item.network().map_err(|e| format!("MaxMind database: {e}"))?;
        let Some(rec) = item
            .decode::<Country<'_>>()
            .map_err(|e| format!("MaxMind record of {net}: {e}"))?
        else {
            continue;
        };
        let region = rec
            .country
            .iso_code
            .and_then(|c| geo.countries.get(c))
            .or_else(|| rec.continent.code.and_then(|c| geo.continents.get(c)));
        let Some(region) = region.and_then(|r| geo.id(r)) else {
            continue;
        };
        out.push(GeoPrefix {
            addr: net.network(),
            len: net.prefix(),
            region,
        });
        if out.len() > lb_common::geo::MAX_GEO_PREFIXES as usize {
            return Err(format!(
                "more than {} mapped networks",
                lb_common::geo::MAX_GEO_PREFIXES
            ));
        }
    }
    Ok(out)
}

/// Parses `prefix,region` lines (`#` comments and blank lines skipped). A bad line is refused
/// with its number; regions must be in `[geo]`.
pub fn parse_csv(text: &str, geo: &GeoSettings) -> Result<Vec<GeoPrefix>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        let (prefix, region) = line
            .split_once(',')
            .ok_or_else(|| at("expected prefix,region".into()))?;
        let (prefix, region) = (prefix.trim(), region.trim());
        let (addr, len) = match prefix.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (prefix, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| at(format!("{addr:?} is not an IP address")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| at(format!("prefix length {l:?} is not 0..={max}")))?,
            None => max,
        };
        if masked(addr, len) != addr {
            return Err(at(format!("{prefix} has host bits set")));
        }
        let region = geo.id(region).ok_or_else(|| {
            at(format!(
                "region {region:?} is not in [geo] (failover or default_region)"
            ))
        })?;
        out.push(GeoPrefix { addr, len, region });
    }
    if out.len() > lb_common::geo::MAX_GEO_PREFIXES as usize {
        return Err(format!(
            "{} prefixes, at most {}",
            out.len(),
            lb_common::geo::MAX_GEO_PREFIXES
        ));
    }
    Ok(out)
}

fn masked(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> GeoSettings {
        GeoSettings {
            data: None,
            default_region: "eu".into(),
            failover: [
                ("eu".to_string(), vec!["us".to_string()]),
                ("us".to_string(), vec!["eu".to_string(), "ap".to_string()]),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn regions_have_stable_ids_and_failover_in_order() {
        let g = geo();
        assert_eq!(g.regions(), vec!["ap", "eu", "us"]);
        assert_eq!(g.id("us"), Some(2));
        assert_eq!(g.serving("us", |r| r != "us"), Some("eu"));
        assert_eq!(g.serving("us", |r| r == "ap"), Some("ap"));
        assert_eq!(g.serving("eu", |r| r == "ap"), None);
        assert!(g.validate().is_ok());
        let mut bad = g.clone();
        bad.failover.insert("ap".into(), vec!["ap".into()]);
        bad.countries.insert("DE".into(), "eu".into());
        assert!(bad.validate().unwrap_err().contains("lists itself"));
    }

    #[test]
    fn csv_lines_parse_or_name_the_bad_line() {
        let g = geo();
        let p = parse_csv(
            "# clients\n10.0.0.0/8,eu\n\n2001:db8::/32, us\n192.0.2.7,ap\n",
            &g,
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[0],
            GeoPrefix {
                addr: "10.0.0.0".parse().unwrap(),
                len: 8,
                region: 1
            }
        );
        assert_eq!(p[2].len, 32);
        for (text, needle) in [
            ("10.0.0.0/8,eu\n10.0.0.0/33,eu", "line 2: prefix length \"33\""),
            ("10.0.0.1/8,eu", "line 1: 10.0.0.1/8 has host bits set"),
            ("10.0.0.0/8,mars", "line 1: region \"mars\" is not in [geo]"),
            ("nonsense", "line 1: expected prefix,region"),
            (
                "10.0.0.0/8,eu\n\nfoo/8,eu",
                "line 3: \"foo\" is not an IP address",
            ),
        ] {
            let e = parse_csv(text, &g).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e = parse_mmdb(b"not a database".to_vec(), &g).unwrap_err();
        assert!(e.starts_with("not a MaxMind database"), "{e}");
    }

    #[test]
    fn load_reads_only_a_regular_file_of_at_most_max_data() {
        let g = geo();
        for path in ["/dev/zero", "/dev/zero.mmdb"] {
            // (/dev/zero.mmdb does not exist: refused by open, not read.)
            let e = load(std::path::Path::new(path), &g).unwrap_err();
            assert!(e.starts_with(path) && !e.contains('\n'), "{e}");
        }
        assert!(
            load(std::path::Path::new("/dev/zero"), &g)
                .unwrap_err()
                .ends_with("not a regular file")
        );
        let dir = std::env::temp_dir().join(format!("lb-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("geo.csv");
        std::fs::write(&good, "10.0.0.0/8,eu\n").unwrap();
        assert_eq!(load(&good, &g).unwrap().len(), 1);
        // Sparse: its size is over the limit without the disk holding it.
        let big = dir.join("big.csv");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_DATA + 1)
            .unwrap();
        let e = load(&big, &g).unwrap_err();
        assert!(e.contains("big.csv: larger than the limit of 256 MiB"), "{e}");
        std::fs::write(&good, b"\xff\n").unwrap();
        assert!(load(&good, &g).unwrap_err().contains("geo.csv: not UTF-8"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
