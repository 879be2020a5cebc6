//! The strategies beside plain Maglev: least connections by the active-flow counts and caps,
//! and Maglev's second chance at the previous table.

use lb_common::{Counter, ServiceKey, ServiceValue, service::FWD_DSR_L2};
use lb_tests::{
    fixture::Balancer,
    packets::{CLIENT_MAC, CLIENT4, LB_MAC, VIP4, XDP_DROP, XDP_TX, eth, ipv4, tcp},
};

use super::{B1_MAC, B2_MAC, in_fresh_ns, rewritten, with_two_backends};

/// The counting strategies pick by the active-flow counts and skip members at their cap (the
/// counts move +1 at a pinned flow, −1 once at the client's FIN); second chance sends a
/// segment whose entry is lost to the previous table's live owner.
#[test]
fn strategies_pick_by_counts_and_caps_and_second_chance_takes_the_previous_table() {
    use lb_common::strategy::{STRATEGY_LEAST_CONNECTIONS, STRATEGY_MAGLEV, member_words};
    in_fresh_ns(|| {
        let mut dp = with_two_backends();
        let key = |port: u16| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&VIP4);
            ServiceKey::new(4, 6, a, port.to_be())
        };
        let frame = |sport: u16, dport: u16, flags: u8| {
            [
                eth(LB_MAC, CLIENT_MAC, 0x0800),
                ipv4(6, CLIENT4, VIP4, &tcp(sport, dport, flags)),
            ]
            .concat()
        };
        let set_region = |dp: &mut Balancer, offset: u32, words: &[u16]| {
            dp.pool.write(offset, words).expect("pool");
        };
        // Least connections over b1 and b2, an element (slot, weight, cap) each.
        let members =
            |caps: [u32; 2]| [member_words(1, 100, caps[0]), member_words(2, 100, caps[1])].concat();
        set_region(&mut dp, 100, &members([0, 0]));
        let lc = ServiceValue {
            id: 20,
            flags: 0,
            table_offset: 100,
            table_size: 8,
            forward: FWD_DSR_L2,
            strategy: STRATEGY_LEAST_CONNECTIONS,
            ..Default::default()
        };
        dp.add_service(key(90), lc).expect("service");
        dp.active.set(1, 5, 0).unwrap();
        dp.active.set(2, 3, 0).unwrap();
        let syn = frame(41000, 90, 0x02);
        assert_eq!(
            dp.run(&syn),
            (XDP_TX, rewritten(&syn, B2_MAC)),
            "the less loaded b2"
        );
        assert_eq!(dp.active.get(&2, 0).unwrap(), 4, "+1 for the pinned flow");
        dp.active.set(2, 10, 0).unwrap();
        let syn = frame(41001, 90, 0x02);
        assert_eq!(dp.run(&syn), (XDP_TX, rewritten(&syn, B1_MAC)), "now b1 is");
        assert_eq!(dp.active.get(&1, 0).unwrap(), 6);
        // Its client's FIN takes it off b1's count, once.
        let fin = frame(41001, 90, 0x11);
        assert_eq!(dp.run(&fin).0, XDP_TX);
        assert_eq!(dp.run(&fin).0, XDP_TX);
        assert_eq!(dp.active.get(&1, 0).unwrap(), 5, "−1 once");
        // Both at their caps (5 and 10): the new flow is dropped and counted.
        set_region(&mut dp, 100, &members([5, 10]));
        let dropped = dp.counter(Counter::DropMaxconn);
        let syn = frame(41002, 90, 0x02);
        assert_eq!(dp.run(&syn).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropMaxconn), dropped + 1);

        // Second chance: the current table gives every hash to b1, the previous one to b2.
        set_region(&mut dp, 200, &[1; 13]);
        set_region(&mut dp, 213, &[2; 13]);
        let maglev = ServiceValue {
            id: 21,
            flags: 0,
            table_offset: 200,
            table_size: 13,
            forward: FWD_DSR_L2,
            strategy: STRATEGY_MAGLEV,
            prev_offset: 213,
            prev_size: 13,
        };
        dp.add_service(key(91), maglev).expect("service");
        let hits = dp.counter(Counter::SecondChanceHit);
        let lost = frame(42000, 91, 0x10);
        assert_eq!(
            dp.run(&lost),
            (XDP_TX, rewritten(&lost, B2_MAC)),
            "a lost entry's segment"
        );
        assert_eq!(dp.counter(Counter::SecondChanceHit), hits + 1);
        let syn = frame(42001, 91, 0x02);
        assert_eq!(
            dp.run(&syn),
            (XDP_TX, rewritten(&syn, B1_MAC)),
            "a SYN takes the current table"
        );
        // The previous owner gone: the current table's.
        let mut b2 = dp.backends.get(&2, 0).unwrap();
        b2.flags = 0;
        dp.backends.set(2, b2, 0).unwrap();
        let lost = frame(42002, 91, 0x10);
        assert_eq!(dp.run(&lost), (XDP_TX, rewritten(&lost, B1_MAC)));
        assert_eq!(dp.counter(Counter::SecondChanceHit), hits + 1);
    });
}

/// A counted flow's entry outlives its backend: the slot goes to a new backend (the next
/// generation, its count zeroed, as the daemon does), then the client opens the same tuple
/// again. The SYN takes the old entry out without taking one off the new backend's count:
/// before, that −1 left a re-added backend at −1 active flows (chaos seed 31, 30 minutes).
#[test]
fn an_entry_of_a_slots_earlier_backend_takes_nothing_off_the_new_ones_count() {
    use lb_common::strategy::{STRATEGY_LEAST_CONNECTIONS, member_words};
    in_fresh_ns(|| {
        let mut dp = with_two_backends();
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&VIP4);
        let frame = |flags: u8| {
            [
                eth(LB_MAC, CLIENT_MAC, 0x0800),
                ipv4(6, CLIENT4, VIP4, &tcp(43000, 92, flags)),
            ]
            .concat()
        };
        dp.pool
            .write(300, &[member_words(1, 100, 0), member_words(2, 100, 0)].concat())
            .expect("pool");
        let lc = ServiceValue {
            id: 22,
            flags: 0,
            table_offset: 300,
            table_size: 8,
            forward: FWD_DSR_L2,
            strategy: STRATEGY_LEAST_CONNECTIONS,
            ..Default::default()
        };
        dp.add_service(ServiceKey::new(4, 6, a, 92u16.to_be()), lc)
            .expect("service");
        dp.active.set(1, 0, 0).unwrap();
        dp.active.set(2, 5, 0).unwrap();
        assert_eq!(dp.run(&frame(0x02)).1, rewritten(&frame(0x02), B1_MAC));
        assert_eq!(dp.run(&frame(0x10)).1, rewritten(&frame(0x10), B1_MAC));
        assert_eq!(dp.conntrack.keys().count(), 1, "established");
        assert_eq!(dp.active.get(&1, 0).unwrap(), 1);
        // Slot 1 goes to another backend; its count starts at 0.
        let mut b = dp.backends.get(&1, 0).unwrap();
        b.generation = b.generation.wrapping_add(1);
        dp.backends.set(1, b, 0).unwrap();
        dp.active.set(1, 0, 0).unwrap();
        dp.active.set(2, 0, 0).unwrap();
        // The same tuple opened again: one new counted flow, on whichever of the two.
        assert_eq!(dp.run(&frame(0x02)).0, XDP_TX);
        assert_eq!(dp.conntrack.keys().count(), 0, "the old entry went");
        let counts = [dp.active.get(&1, 0).unwrap(), dp.active.get(&2, 0).unwrap()];
        assert!(
            counts.iter().all(|&c| c >= 0) && counts.iter().sum::<i64>() == 1,
            "active counts of the new backend and b2: {counts:?}"
        );
    });
}
