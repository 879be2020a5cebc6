//! The `etcd` source: each instance registers itself as the key
//! `/lb/<cluster>/instances/<service>/<id>`, its value JSON `{address, port, weight, zone,
//! region, labels}` (only `address` required), put under a lease of its own that it keeps
//! alive. A lease that ends (the instance died, or stopped renewing) makes etcd delete the
//! key: a deregistration, which the writer drains, then removes.
//!
//! The etcd is the cluster's (`[cluster] etcd` and `name`, with its TLS and user) unless the
//! source names its own, which it reaches in plaintext without a user.
//! The source reads the service's directory whole, then watches it from the revision read,
//! handing the writer the whole set after every revision; when etcd cannot be reached it says
//! so (the writer keeps the last set) and starts over, reading the directory again.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde::Deserialize;

use super::Reporter;
use crate::{
    cluster::connection::{Connection, Security},
    status::discovery::{Entry, ErrorReason, Malformed, SourceError},
};

/// The first wait after a failed session; doubled up to `MAX_BACKOFF`.
const BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The directory of a service's instances.
pub fn dir(cluster: &str, service: &str) -> String {
    format!("/lb/{cluster}/instances/{service}/")
}

/// Reads and watches the service's directory until the writer is gone.
pub async fn run(reporter: Reporter, endpoints: Vec<String>, security: Security, cluster: String) {
    let etcd = Connection::new(endpoints, security);
    let dir = dir(&cluster, &reporter.service);
    let mut backoff = BACKOFF;
    loop {
        let mut read_once = false;
        match session(&etcd, &dir, &reporter, &mut read_once).await {
            Ok(()) => return,
            Err(e) => {
                let e = SourceError::new(ErrorReason::Unavailable, format!("etcd: {e}"));
                if !reporter.send(Err(e)).await {
                    return;
                }
            }
        }
        backoff = if read_once {
            BACKOFF
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        tokio::time::sleep(backoff).await;
    }
}

/// One connection's reads: `Ok` once the writer is gone, else why it ended.
async fn session(
    etcd: &Connection,
    dir: &str,
    reporter: &Reporter,
    read_once: &mut bool,
) -> Result<(), String> {
    let prefix = dir.to_string();
    let resp = etcd
        .call(|mut c| async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })
        .await?;
    let mut set = BTreeMap::new();
    for kv in resp.kvs() {
        if let Some((id, entry)) = decode(dir, kv.key(), kv.value()) {
            set.insert(id, entry);
        }
    }
    if !reporter.send(Ok(set.values().cloned().collect())).await {
        return Ok(());
    }
    *read_once = true;
    let from = resp.header().map_or(0, |h| h.revision()) + 1;
    let (prefix, options) = (
        dir.to_string(),
        WatchOptions::new().with_prefix().with_start_revision(from),
    );
    let mut watch = etcd
        .call(|mut c| async move { c.watch(prefix, Some(options)).await })
        .await?;
    loop {
        let resp = watch
            .message()
            .await
            .map_err(|e| format!("watch: {e}"))?
            .ok_or("etcd closed the watch")?;
        if resp.canceled() {
            return Err(format!(
                "etcd cancelled the watch (compacted at {})",
                resp.compact_revision()
            ));
        }
        let mut changed = false;
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            match e.event_type() {
                EventType::Put => {
                    if let Some((id, entry)) = decode(dir, kv.key(), kv.value()) {
                        set.insert(id, entry);
                        changed = true;
                    }
                }
                EventType::Delete => {
                    if let Some(id) = key_id(dir, kv.key()) {
                        changed |= set.remove(&id).is_some();
                    }
                }
            }
        }
        if changed && !reporter.send(Ok(set.values().cloned().collect())).await {
            return Ok(());
        }
    }
}

/// An instance's value as its registrant writes it: the id is the key's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Value {
    address: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The id a key names in `dir` (the rest of the key); `None` for a key not directly in it.
fn key_id(dir: &str, key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(dir.as_bytes())?;
    let rest = String::from_utf8_lossy(rest).into_owned();
    (!rest.is_empty()).then_some(rest)
}

/// A key and its value as an entry of the set, by its id; a value that is not an instance is
/// a malformed entry (the writer skips and counts it).
pub fn decode(dir: &str, key: &[u8], value: &[u8]) -> Option<(String, Result<Entry, Malformed>)> {
    let id = key_id(dir, key)?;
    let entry = serde_json::from_slice::<Value>(value)
        .map(|v| Entry {
            id: id.clone(),
            address: v.address,
            port: v.port,
            weight: v.weight,
            zone: v.zone,
            region: v.region,
            labels: v.labels,
        })
        .map_err(|e| Malformed {
            at: id.clone(),
            why: format!("not an instance: {e}"),
        });
    Some((id, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_an_instance_by_its_id_and_a_bad_value_is_malformed() {
        let dir = dir("edge", "web");
        assert_eq!(dir, "/lb/edge/instances/web/");
        let (id, e) = decode(
            &dir,
            b"/lb/edge/instances/web/web-1",
            br#"{"address": "10.0.1.1", "port": 8080, "weight": 5, "zone": "z1", "region": "eu", "labels": {"role": "canary"}}"#,
        )
        .expect("in the directory");
        let e = e.expect("an instance");
        assert_eq!(id, "web-1");
        assert_eq!(
            (
                e.id.as_str(),
                e.address.as_str(),
                e.port,
                e.weight,
                e.zone.as_deref(),
                e.region.as_deref()
            ),
            ("web-1", "10.0.1.1", Some(8080), Some(5), Some("z1"), Some("eu"))
        );
        assert_eq!(e.labels["role"], "canary");
        for bad in [
            &b"{not json"[..],
            br#"{"address": "10.0.1.1", "colour": "blue"}"#,
            br#"{"port": 80}"#,
        ] {
            let (_, e) = decode(&dir, b"/lb/edge/instances/web/x", bad).unwrap();
            let m = e.unwrap_err();
            assert_eq!(m.at, "x");
            assert!(
                m.why.starts_with("not an instance") && !m.why.contains('\n'),
                "{}",
                m.why
            );
        }
        // The directory itself, or another service's: not an instance of this one.
        assert!(decode(&dir, b"/lb/edge/instances/web/", b"{}").is_none());
        assert!(decode(&dir, b"/lb/edge/instances/api/x", b"{}").is_none());
        // An id with a slash is kept as it is, for the writer to refuse as an id.
        assert_eq!(
            decode(&dir, b"/lb/edge/instances/web/a/b", b"{}").unwrap().0,
            "a/b"
        );
    }
}
