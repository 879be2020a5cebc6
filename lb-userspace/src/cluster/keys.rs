//! The cluster's keys and values. Pure: bytes in, services out; a value that is not a valid
//! service is counted and left out (a valid earlier version of its key stays), never fatal.

use std::collections::BTreeMap;

use etcd_client::{Event, EventType};
use log::warn;

use crate::{config::ServiceSpec, model::Service};

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

    /// Applies a watch response's events; returns how many values were refused.
    pub fn update(&mut self, events: &[Event]) -> u64 {
        let before = self.invalid;
        for e in events {
            let Some(kv) = e.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match e.event_type() {
                EventType::Put => self.insert(&key, kv.value(), kv.mod_revision()),
                EventType::Delete => {
                    self.by_key.remove(&key);
                }
            }
        }
        self.invalid - before
    }

    /// The services, in key order (the same on every node).
    pub fn services(&self) -> Vec<Service> {
        self.by_key.values().map(|(s, _)| s.clone()).collect()
    }
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
