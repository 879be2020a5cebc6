//! Golden packets through BPF_PROG_TEST_RUN: exact output bytes and verdict for each case, on
//! the real kernel with real maps. Each test runs in a fresh network namespace.
//!
//! One file per theme: L2 DSR forwarding and parsing (`dsr`), the tunnels out (`encapsulation`)
//! and in (`decapsulation`), ICMP errors and echo (`icmp`), NAT (`nat`) and the strategies
//! beside Maglev (`strategies`). What they share is here.

// Named `golden_*` so that `cargo xtask test` can run them in a lane of their own, two at a
// time (each test's cost is the verifier's, on its own core).
#[path = "decapsulation.rs"]
mod golden_decapsulation;
#[path = "dsr.rs"]
mod golden_dsr;
#[path = "encapsulation.rs"]
mod golden_encapsulation;
#[path = "icmp.rs"]
mod golden_icmp;
#[path = "nat.rs"]
mod golden_nat;
#[path = "strategies.rs"]
mod golden_strategies;

use lb_common::{ServiceKey, ServiceValue, service::FWD_DSR_L2};
use lb_tests::{
    NetNs,
    fixture::{Balancer, dsr_backend, routed_backend},
    in_ns,
    packets::{LB_MAC, VIP4, VIP6},
};

const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb2];
const GUE_PORT: u16 = lb_userspace::config::DEFAULT_GUE_PORT;

/// The golden tests' shorthand for filling the fixture's maps (a failed write panics).
trait Golden {
    /// An L2 DSR backend in `slot`, reached through `ifindex`.
    fn backend(&mut self, slot: u32, mac: [u8; 6], ifindex: u32);
    /// A service whose 13-slot table at `offset` names `slot` everywhere.
    fn service(&mut self, family: u8, proto: u8, addr: &[u8], port: u16, offset: u32, slot: u32);
    #[allow(clippy::too_many_arguments)]
    fn service_mode(
        &mut self,
        family: u8,
        proto: u8,
        addr: &[u8],
        port: u16,
        offset: u32,
        slot: u32,
        forward: u32,
    );
    /// A routed backend (IPIP, GUE) in `slot`.
    fn encap_backend(&mut self, slot: u32, addr: &[u8]);
}

impl Golden for Balancer {
    fn backend(&mut self, slot: u32, mac: [u8; 6], ifindex: u32) {
        self.backends
            .set(slot, dsr_backend(mac, ifindex), 0)
            .expect("set backend");
    }

    fn service(&mut self, family: u8, proto: u8, addr: &[u8], port: u16, offset: u32, slot: u32) {
        self.service_mode(family, proto, addr, port, offset, slot, FWD_DSR_L2);
    }

    fn service_mode(
        &mut self,
        family: u8,
        proto: u8,
        addr: &[u8],
        port: u16,
        offset: u32,
        slot: u32,
        forward: u32,
    ) {
        let mut a = [0u8; 16];
        a[..addr.len()].copy_from_slice(addr);
        self.pool.write(offset, &[slot as u16; 13]).expect("pool");
        let v = ServiceValue {
            id: offset / 13,
            flags: 0,
            table_offset: offset,
            table_size: 13,
            forward,
            ..Default::default()
        };
        self.add_service(ServiceKey::new(family, proto, a, port.to_be()), v)
            .expect("service");
    }

    fn encap_backend(&mut self, slot: u32, addr: &[u8]) {
        self.backends
            .set(slot, routed_backend(addr), 0)
            .expect("set backend");
    }
}

/// The balancer with backend slot 1 -> b1, slot 2 -> b2, both reached through ifindex 1 (lo:
/// test_run's ingress).
fn with_two_backends() -> Balancer {
    let mut dp = Balancer::load().expect("load lb");
    dp.backend(1, B1_MAC, 1);
    dp.backend(2, B2_MAC, 1);
    dp
}

/// The expected DSR output: the same bytes with the MACs rewritten.
fn rewritten(input: &[u8], dst: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

fn in_fresh_ns(f: impl FnOnce() + Send + 'static) {
    let ns = NetNs::new("golden").expect("netns");
    in_ns(&ns, f);
}

/// TCP port 80 and UDP port 53 on VIP4 and VIP6, every table naming b1.
fn standard() -> Balancer {
    let mut dp = with_two_backends();
    dp.service(4, 6, &VIP4, 80, 0, 1);
    dp.service(4, 17, &VIP4, 53, 13, 1);
    dp.service(6, 6, &VIP6, 80, 26, 1);
    dp.service(6, 17, &VIP6, 53, 39, 1);
    dp
}

/// The standard services plus what encapsulation needs: routed backends (`ipip_routes`), the
/// encapsulation sources, and the egress in TX_PORTS.
fn encap_dp() -> Balancer {
    let mut dp = standard();
    dp.route_tunnels().expect("tunnels");
    dp
}

/// ICMPv6 checksum: the pseudo-header (addresses, length, next header 58) and the message.
fn icmp6_checksum(src: [u8; 16], dst: [u8; 16], msg: &[u8]) -> u16 {
    let mut data = src.to_vec();
    data.extend_from_slice(&dst);
    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(msg);
    lb_tests::packets::checksum(&data)
}
