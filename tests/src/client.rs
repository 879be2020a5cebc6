//! Client side of the tests and the demo: real TCP connections and UDP flows from the client
//! namespace to a VIP, each answered with the id of the backend that served it.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use crate::{
    in_ns,
    topology::{PORT, Topology},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// A persistent connection that asks "who are you" and reads the backend id.
pub struct Conn {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Conn {
    pub fn ask(&mut self) -> std::io::Result<String> {
        self.writer.write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.trim().to_string())
    }
}

pub fn connect(vip: IpAddr) -> Conn {
    let s = TcpStream::connect_timeout(&SocketAddr::new(vip, PORT), TIMEOUT).expect("connect to VIP");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    Conn {
        reader: BufReader::new(s.try_clone().expect("clone")),
        writer: s,
    }
}

/// Opens `n` connections from the client namespace; each asks 3 times and must get one answer.
pub fn tcp_flows(
    topo: &Topology,
    vip: IpAddr,
    n: usize,
    keep: bool,
) -> (HashMap<String, usize>, Vec<(Conn, String)>) {
    in_ns(&topo.client, move || {
        let mut counts = HashMap::new();
        let mut kept = Vec::new();
        for _ in 0..n {
            let mut c = connect(vip);
            let first = c.ask().expect("first answer");
            for _ in 0..2 {
                assert_eq!(c.ask().expect("answer"), first, "a TCP flow changed backend");
            }
            *counts.entry(first.clone()).or_insert(0) += 1;
            if keep {
                kept.push((c, first));
            }
        }
        (counts, kept)
    })
}

/// `n` UDP flows (one socket each); every datagram of a flow must reach the same backend.
pub fn udp_flows(topo: &Topology, vip: IpAddr, n: usize) -> HashMap<String, usize> {
    in_ns(&topo.client, move || {
        let mut counts = HashMap::new();
        let bind: SocketAddr = if vip.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        for _ in 0..n {
            let s = UdpSocket::bind(bind).expect("bind");
            s.connect(SocketAddr::new(vip, PORT)).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            let mut first: Option<String> = None;
            for _ in 0..3 {
                // UDP can lose a datagram; retry a bounded number of times.
                let mut answer = None;
                for _ in 0..5 {
                    s.send(b"who").expect("send");
                    let mut buf = [0u8; 64];
                    if let Ok(len) = s.recv(&mut buf) {
                        answer = Some(String::from_utf8_lossy(&buf[..len]).to_string());
                        break;
                    }
                }
                let answer = answer.expect("UDP answer within 5 tries");
                match &first {
                    None => first = Some(answer),
                    Some(f) => assert_eq!(&answer, f, "a UDP flow changed backend"),
                }
            }
            *counts.entry(first.expect("answered")).or_insert(0) += 1;
        }
        counts
    })
}
