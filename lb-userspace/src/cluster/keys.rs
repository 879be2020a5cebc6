//! The cluster's keys and values. Pure: bytes in, services out; a value that is not a valid
//! service is counted and left out (a valid earlier version of its key stays), never fatal.

use std::collections::BTreeMap;

use etcd_client::{Event, EventType};
use log::warn;

use crate::{
    config::ServiceSpec,
    model::{BackendRef, Service},
    status::cluster::NodeEntry,
};

/// The services as the cluster holds them, by key, each with its mod revision.
#[derive(Debug, Default)]
pub struct Services {
    pub by_key: BTreeMap<String, (Service, i64)>,
    /// Values refused while loading.
    pub invalid: u64,
}

/// A value under `services/` as a service: JSON of the config file's service spec, whose name
/// must be the key's last segment. Checked as a service added through the API would be.
pub fn decode(key: &str, value: &[u8]) -> Result<Service, String> {
    let spec: ServiceSpec =
        serde_json::from_slice(value).map_err(|e| format!("{key}: not a service: {e}"))?;
    let name = key.rsplit('/').next().unwrap_or_default();
    if spec.name != name {
        return Err(format!("{key}: names service {:?}", spec.name));
    }
    let service = Service::from(spec);
    service.validate().map_err(|e| format!("{key}: {e}"))?;
    crate::model::health_settings::validate_service(&service).map_err(|e| format!("{key}: {e}"))?;
    Ok(service)
}

pub fn encode(service: &Service) -> Vec<u8> {
    serde_json::to_vec(&ServiceSpec::from(service)).expect("a spec serializes")
}

impl Services {
    pub fn insert(&mut self, key: &str, value: &[u8], revision: i64) {
        match decode(key, value) {
            Ok(s) => {
                self.by_key.insert(key.to_string(), (s, revision));
            }
            Err(e) => {
                warn!("cluster: {e}; left out");
                self.invalid += 1;
            }
        }
    }

    /// The services, in key order (the same on every node).
    pub fn services(&self) -> Vec<Service> {
        self.by_key.values().map(|(s, _)| s.clone()).collect()
    }
}

/// The nodes' keys (`nodes/<node>`, each under its node's lease), by key. A value that does not
/// parse (written by something else) is no node.
#[derive(Debug, Default)]
pub struct Nodes {
    pub by_key: BTreeMap<String, NodeEntry>,
}

impl Nodes {
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        let key = String::from_utf8_lossy(key).into_owned();
        match serde_json::from_slice(value) {
            Ok(n) => {
                self.by_key.insert(key, n);
            }
            Err(e) => {
                warn!("cluster: {key}: not a node entry ({e}); left out");
                self.by_key.remove(&key);
            }
        }
    }

    pub fn entries(&self) -> Vec<NodeEntry> {
        self.by_key.values().cloned().collect()
    }
}

/// External health scores (`lb backend health`) as the cluster holds them: the key
/// `scores/<service>/<id>`, the value `{"score": 0..1}`, under a lease when it has a ttl.
#[derive(Debug, Default)]
pub struct Scores {
    pub by_backend: BTreeMap<BackendRef, f64>,
    /// Values refused.
    pub invalid: u64,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreValue {
    pub score: f64,
}

impl Scores {
    fn backend(rest: &[u8]) -> Option<BackendRef> {
        let rest = std::str::from_utf8(rest).ok()?;
        let (service, id) = rest.split_once('/')?;
        (!service.is_empty() && !id.is_empty() && !id.contains('/')).then(|| BackendRef::new(service, id))
    }

    /// `rest` is the key after `scores/`.
    fn put(&mut self, key: &str, rest: &[u8], value: &[u8]) {
        let parsed = serde_json::from_slice::<ScoreValue>(value)
            .map_err(|e| e.to_string())
            .and_then(|v| {
                if v.score.is_finite() && (0.0..=1.0).contains(&v.score) {
                    Ok(v.score)
                } else {
                    Err(format!("score {} is out of range 0..=1", v.score))
                }
            });
        match (Self::backend(rest), parsed) {
            (Some(b), Ok(score)) => {
                self.by_backend.insert(b, score);
            }
            (None, _) => {
                warn!("cluster: {key}: not scores/<service>/<id>; left out");
                self.invalid += 1;
            }
            (Some(b), Err(e)) => {
                warn!("cluster: {key}: not a score ({e}); left out");
                self.by_backend.remove(&b);
                self.invalid += 1;
            }
        }
    }
}

/// The cluster's keys as one node reads them, routed by their directory under the prefix.
#[derive(Debug, Default)]
pub struct Tree {
    prefix: String,
    pub services: Services,
    pub nodes: Nodes,
    pub scores: Scores,
}

/// Which part of the tree a key touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Services,
    Nodes,
    Scores,
    /// A key this build does not read.
    Other,
}

impl Tree {
    pub fn new(prefix: String) -> Self {
        Self {
            prefix,
            ..Default::default()
        }
    }

    /// Which part a key belongs to, and the rest of the key after its directory.
    fn part<'k>(&self, key: &'k [u8]) -> (Part, &'k [u8]) {
        let rest = key.strip_prefix(self.prefix.as_bytes()).unwrap_or_default();
        for (dir, part) in [
            (&b"services/"[..], Part::Services),
            (b"nodes/", Part::Nodes),
            (b"scores/", Part::Scores),
        ] {
            if let Some(rest) = rest.strip_prefix(dir) {
                return (part, rest);
            }
        }
        (Part::Other, rest)
    }

    pub fn put(&mut self, key: &[u8], value: &[u8], revision: i64) -> Part {
        let (part, rest) = self.part(key);
        match part {
            Part::Services => self
                .services
                .insert(&String::from_utf8_lossy(key), value, revision),
            Part::Nodes => self.nodes.put(key, value),
            Part::Scores => self.scores.put(&String::from_utf8_lossy(key), rest, value),
            Part::Other => {}
        }
        part
    }

    /// Values refused so far, of every kind.
    pub fn invalid(&self) -> u64 {
        self.services.invalid + self.scores.invalid
    }

    /// One watch event; which part it touched.
    pub fn apply(&mut self, e: &Event) -> Part {
        let Some(kv) = e.kv() else { return Part::Other };
        match e.event_type() {
            EventType::Put => self.put(kv.key(), kv.value(), kv.mod_revision()),
            EventType::Delete => {
                let (part, rest) = self.part(kv.key());
                let key = String::from_utf8_lossy(kv.key());
                match part {
                    Part::Services => drop(self.services.by_key.remove(key.as_ref())),
                    Part::Nodes => drop(self.nodes.by_key.remove(key.as_ref())),
                    Part::Scores => {
                        if let Some(b) = Scores::backend(rest) {
                            self.scores.by_backend.remove(&b);
                        }
                    }
                    Part::Other => {}
                }
                part
            }
        }
    }
}

/// A watch answer's events, grouped by the revision that made them, in order: a node applies
/// every revision in turn, as every other node does, so all pass through the same tables and
/// keep the same previous one for second chance.
pub fn by_revision(events: &[Event]) -> Vec<(i64, &[Event])> {
    let rev = |e: &Event| e.kv().map_or(0, |kv| kv.mod_revision());
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=events.len() {
        if i == events.len() || rev(&events[i]) != rev(&events[start]) {
            out.push((rev(&events[start]), &events[start..i]));
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Protocol};

    fn web() -> Service {
        Service {
            backends: vec![Backend::new("b1", "10.0.1.1".parse().unwrap())],
            ..Service::new("web", "10.0.0.1".parse().unwrap(), 80, Protocol::Tcp)
        }
    }

    #[test]
    fn scores_are_read_by_backend_and_bad_ones_counted() {
        let mut t = Tree::new("/lb/edge/".into());
        assert_eq!(
            t.put(b"/lb/edge/scores/web/b1", br#"{"score":0.25}"#, 3),
            Part::Scores
        );
        assert_eq!(t.scores.by_backend[&BackendRef::new("web", "b1")], 0.25);
        // Out of range, not JSON, a key without an id: counted, and a bad value drops the
        // backend's score rather than keeping a stale one.
        t.put(b"/lb/edge/scores/web/b1", br#"{"score":2}"#, 4);
        t.put(b"/lb/edge/scores/web/b2", b"zero", 5);
        t.put(b"/lb/edge/scores/web", br#"{"score":0}"#, 6);
        assert_eq!(t.invalid(), 3);
        assert!(t.scores.by_backend.is_empty());
        assert_eq!(t.put(b"/lb/edge/other/x", b"", 7), Part::Other);
    }

    #[test]
    fn a_service_round_trips_and_bad_values_are_counted_and_left_out() {
        let mut s = Services::default();
        s.insert("/lb/edge/services/web", &encode(&web()), 7);
        assert_eq!(s.services(), vec![web()]);
        // Not JSON, the wrong name, an invalid service: each counted, none taken, the valid
        // version of the key kept.
        s.insert("/lb/edge/services/web", b"{not json", 8);
        s.insert("/lb/edge/services/api", &encode(&web()), 9);
        let mut bad = web();
        bad.table_size = 4;
        s.insert("/lb/edge/services/web", &encode(&bad), 10);
        assert_eq!(s.invalid, 3);
        assert_eq!(s.services(), vec![web()]);
        assert_eq!(s.by_key["/lb/edge/services/web"].1, 7);
    }
}
