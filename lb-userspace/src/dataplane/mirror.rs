//! What the reconciler last wrote to (or read from) the maps that it alone writes: backends,
//! service values, fragment values, VIP addresses, shed limits, TX ports. A pass reads and
//! writes through the mirror, so one backend's change costs the syscalls of that backend, not
//! one per entry of every service (16,384 backends made each pass 100 ms of syscalls). Empty
//! after a load or an adoption: the first reads fill it, and the first listing of a map's keys
//! finds what an earlier daemon left.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData},
};
use lb_common::{AddrKey, Backend, ServiceKey, ServiceValue, VipFilter, geo::GeoKey};

use super::{DataPlane, MapWrites, zeroed_per_cpu};
use crate::error::{Error, Result};

#[derive(Default)]
pub struct Mirror {
    backends: HashMap<u32, Backend>,
    shed: HashMap<u32, u32>,
    tx_ports: HashSet<u32>,
    services: Known<ServiceKey, ServiceValue>,
    fragments: Known<ServiceKey, ServiceValue>,
    vip_addrs: Known<AddrKey, u32>,
}

/// A hash map's entries as far as known; `complete` once its keys were listed (a key not
/// known then is absent).
struct Known<K, V> {
    entries: HashMap<K, V>,
    complete: bool,
}

impl<K, V> Default for Known<K, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            complete: false,
        }
    }
}

impl<K: Pod + Eq + Hash, V: Pod + PartialEq> Known<K, V> {
    fn get(&mut self, map: &BpfHashMap<MapData, K, V>, key: &K) -> Option<V> {
        if let Some(v) = self.entries.get(key) {
            return Some(*v);
        }
        if self.complete {
            return None;
        }
        let v = map.get(key, 0).ok()?;
        self.entries.insert(*key, v);
        Some(v)
    }

    fn insert(&mut self, map: &mut BpfHashMap<MapData, K, V>, key: K, value: V) -> Result<()> {
        if self.get(map, &key) == Some(value) {
            return Ok(());
        }
        map.insert(key, value, 0).map_err(Error::dataplane)?;
        self.entries.insert(key, value);
        Ok(())
    }

    fn remove(&mut self, map: &mut BpfHashMap<MapData, K, V>, key: &K) -> Result<()> {
        map.remove(key).map_err(Error::dataplane)?;
        self.entries.remove(key);
        Ok(())
    }

    fn keys(&mut self, map: &BpfHashMap<MapData, K, V>) -> Vec<K> {
        if !self.complete {
            let keys: Vec<K> = map.keys().filter_map(|k| k.ok()).collect();
            for k in keys {
                if let Ok(v) = map.get(&k, 0) {
                    self.entries.insert(k, v);
                }
            }
            self.complete = true;
        }
        self.entries.keys().copied().collect()
    }
}

impl MapWrites for DataPlane {
    fn backend(&mut self, slot: u32) -> Result<Backend> {
        if let Some(b) = self.mirror.backends.get(&slot) {
            return Ok(*b);
        }
        let b = self.backends.get(&slot, 0).map_err(Error::dataplane)?;
        self.mirror.backends.insert(slot, b);
        Ok(b)
    }

    fn set_backend(&mut self, slot: u32, entry: Backend) -> Result<()> {
        if self.mirror.backends.get(&slot) == Some(&entry) {
            return Ok(());
        }
        self.backends.set(slot, entry, 0).map_err(Error::dataplane)?;
        self.mirror.backends.insert(slot, entry);
        Ok(())
    }

    /// Sets a bucket's new-flow limit (`rate` per second, 0: none), keeping its running window
    /// when unchanged.
    fn set_shed(&mut self, index: u32, rate: u32) -> Result<()> {
        if self.mirror.shed.get(&index) == Some(&rate) {
            return Ok(());
        }
        let want = lb_common::shed::ShedBucket::for_rate(rate);
        let current = self.shed.get(&index, 0).map_err(Error::dataplane)?;
        if !current.same_limit(&want) {
            self.shed.set(index, want, 0).map_err(Error::dataplane)?;
        }
        self.mirror.shed.insert(index, rate);
        Ok(())
    }

    /// Makes `ifindex` a redirect target (`name` for the error).
    fn ensure_tx_port(&mut self, ifindex: u32, name: &str) -> Result<()> {
        if self.mirror.tx_ports.contains(&ifindex) {
            return Ok(());
        }
        if self.tx_ports.get(ifindex, 0).is_err() {
            self.tx_ports
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| Error::dataplane(format!("add {name} to TX_PORTS: {e}")))?;
        }
        self.mirror.tx_ports.insert(ifindex);
        Ok(())
    }

    fn service_value(&mut self, key: &ServiceKey) -> Option<ServiceValue> {
        self.mirror.services.get(&self.services, key)
    }

    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.mirror.services.insert(&mut self.services, key, value)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.mirror.services.remove(&mut self.services, key)
    }

    fn service_keys(&mut self) -> Vec<ServiceKey> {
        self.mirror.services.keys(&self.services)
    }

    fn fragment_value(&mut self, key: &ServiceKey) -> Option<ServiceValue> {
        self.mirror.fragments.get(&self.fragment_services, key)
    }

    fn set_fragment(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.mirror
            .fragments
            .insert(&mut self.fragment_services, key, value)
    }

    fn remove_fragment(&mut self, key: &ServiceKey) -> Result<()> {
        self.mirror.fragments.remove(&mut self.fragment_services, key)
    }

    fn fragment_keys(&mut self) -> Vec<ServiceKey> {
        self.mirror.fragments.keys(&self.fragment_services)
    }

    fn add_vip_addr(&mut self, addr: AddrKey) -> Result<()> {
        self.mirror.vip_addrs.insert(&mut self.vip_addrs, addr, 1)
    }

    fn remove_vip_addr(&mut self, addr: &AddrKey) -> Result<()> {
        self.mirror.vip_addrs.remove(&mut self.vip_addrs, addr)
    }

    fn vip_addr_keys(&mut self) -> Vec<AddrKey> {
        self.mirror.vip_addrs.keys(&self.vip_addrs)
    }

    fn reset_service_traffic(&mut self, id: u32) -> Result<()> {
        let zeros = zeroed_per_cpu()?;
        self.service_stats.set(id, zeros, 0).map_err(Error::dataplane)
    }

    fn reset_backend_slot(&mut self, slot: u32) -> Result<()> {
        self.active.set(slot, 0, 0).map_err(Error::dataplane)?;
        let zeros = zeroed_per_cpu()?;
        self.backend_stats.set(slot, zeros, 0).map_err(Error::dataplane)
    }

    fn geo_value(&mut self, key: &GeoKey) -> Option<ServiceValue> {
        self.geo_services.get(key, 0).ok()
    }

    fn set_geo_value(&mut self, key: GeoKey, value: ServiceValue) -> Result<()> {
        self.geo_services.insert(key, value, 0).map_err(Error::dataplane)
    }

    fn remove_geo_value(&mut self, key: &GeoKey) -> Result<()> {
        self.geo_services.remove(key).map_err(Error::dataplane)
    }

    fn vip_filter(&mut self) -> Result<VipFilter> {
        self.vip_filter.get(&0, 0).map_err(Error::dataplane)
    }

    fn set_vip_filter(&mut self, filter: VipFilter) -> Result<()> {
        self.vip_filter.set(0, filter, 0).map_err(Error::dataplane)
    }

    fn pool_slots(&self) -> u32 {
        self.pool.slots()
    }

    fn read_table(&self, offset: u32, len: u32) -> Option<Vec<u16>> {
        self.pool.read(offset, len)
    }

    fn write_table(&mut self, offset: u32, table: &[u16]) -> Result<()> {
        self.pool.write(offset, table)
    }
}
