//! The one way the writer changes the maps it owns: backends, service values, fragment and geo
//! values, the VIP filter and addresses, shed limits, TX ports, table regions and counters.
//! `DataPlane` implements it through its mirror (`mirror`); the writer's order tests record it.

use lb_common::{AddrKey, Backend, ServiceKey, ServiceValue, VipFilter, geo::GeoKey};

use crate::error::Result;

pub trait MapWrites {
    fn backend(&mut self, slot: u32) -> Result<Backend>;
    fn set_backend(&mut self, slot: u32, entry: Backend) -> Result<()>;
    /// A slot given to a new backend starts with no traffic and no active flows.
    fn reset_backend_slot(&mut self, slot: u32) -> Result<()>;
    /// Sets a bucket's new-flow limit (`rate` per second, 0: none), keeping its running window
    /// when unchanged.
    fn set_shed(&mut self, index: u32, rate: u32) -> Result<()>;
    /// Makes `ifindex` a redirect target (`name` for the error).
    fn ensure_tx_port(&mut self, ifindex: u32, name: &str) -> Result<()>;

    fn service_value(&mut self, key: &ServiceKey) -> Option<ServiceValue>;
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn service_keys(&mut self) -> Vec<ServiceKey>;
    fn reset_service_traffic(&mut self, id: u32) -> Result<()>;

    fn fragment_value(&mut self, key: &ServiceKey) -> Option<ServiceValue>;
    fn set_fragment(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()>;
    fn remove_fragment(&mut self, key: &ServiceKey) -> Result<()>;
    fn fragment_keys(&mut self) -> Vec<ServiceKey>;

    fn geo_value(&mut self, key: &GeoKey) -> Option<ServiceValue>;
    fn set_geo_value(&mut self, key: GeoKey, value: ServiceValue) -> Result<()>;
    fn remove_geo_value(&mut self, key: &GeoKey) -> Result<()>;

    fn vip_filter(&mut self) -> Result<VipFilter>;
    fn set_vip_filter(&mut self, filter: VipFilter) -> Result<()>;
    fn add_vip_addr(&mut self, addr: AddrKey) -> Result<()>;
    fn remove_vip_addr(&mut self, addr: &AddrKey) -> Result<()>;
    fn vip_addr_keys(&mut self) -> Vec<AddrKey>;

    /// The table pool's size in slots.
    fn pool_slots(&self) -> u32;
    fn read_table(&self, offset: u32, len: u32) -> Option<Vec<u16>>;
    fn write_table(&mut self, offset: u32, table: &[u16]) -> Result<()>;
}
