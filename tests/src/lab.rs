//! A two-host lab for the namespace tests: a scanner and a victim joined
//! by a veth pair, with a scan target range local to the victim.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use crate::netns::{Netns, veth};

pub const SCANNER_IP: &str = "198.18.0.1";
pub const VICTIM_IP: &str = "198.18.0.2";
/// Every address of this range belongs to the victim.
pub const TARGET_RANGE: &str = "198.18.1.0/24";
/// Every address of this range belongs to the victim (see [`Lab::with_ipv6`]).
pub const TARGET_RANGE6: &str = "2001:db8:1::/64";
pub const SCANNER_IF: &str = "nw-scan0";
pub const VICTIM_IF: &str = "nw-vic0";

pub struct Lab {
    pub scanner: Netns,
    pub victim: Netns,
}

impl Lab {
    pub fn new() -> Self {
        let scanner = Netns::new("s");
        let victim = Netns::new("v");
        veth(
            &scanner,
            SCANNER_IF,
            "198.18.0.1/24",
            &victim,
            VICTIM_IF,
            "198.18.0.2/24",
        );
        victim.local_range(TARGET_RANGE);
        scanner.ip(&["route", "add", TARGET_RANGE, "via", VICTIM_IP]);
        Lab { scanner, victim }
    }
}

impl Lab {
    /// IPv6 on the lab: the scanner 2001:db8::1, the victim 2001:db8::2,
    /// which also owns 2001:db8:1::/64 (a scan target range). Addresses
    /// are usable at once (no duplicate address detection).
    pub fn with_ipv6(&self) {
        self.scanner
            .ip(&["addr", "add", "2001:db8::1/64", "dev", SCANNER_IF, "nodad"]);
        self.victim
            .ip(&["addr", "add", "2001:db8::2/64", "dev", VICTIM_IF, "nodad"]);
        self.victim
            .ip(&["-6", "route", "add", "local", TARGET_RANGE6, "dev", "lo"]);
        self.scanner
            .ip(&["-6", "route", "add", TARGET_RANGE6, "via", "2001:db8::2"]);
    }

    /// nbtscan from the scanner: one NetBIOS probe to every address of
    /// `range` (256 for a /24).
    pub fn nbtscan(&self, range: &str) -> std::process::Output {
        self.scanner
            .command("nbtscan")
            .args(["-q", "-t", "100", range])
            .output()
            .expect("nbtscan (cargo xtask setup installs it)")
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends `count` UDP datagrams from `ns` to `dst`; returns how many the
/// kernel accepted.
pub fn send_udp(ns: &Netns, dst: &str, count: usize) -> usize {
    let dst: SocketAddr = dst.parse().unwrap();
    ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        (0..count)
            .filter(|_| socket.send_to(b"netwatch-test", dst).is_ok())
            .count()
    })
}

/// Sends `count` UDP datagrams from the address `src` of `ns` to `dst`;
/// returns how many the kernel accepted.
pub fn send_udp_from(ns: &Netns, src: &str, dst: &str, count: usize) -> usize {
    let src: std::net::IpAddr = src.parse().unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    ns.run(|| {
        let socket = UdpSocket::bind((src, 0)).unwrap();
        (0..count)
            .filter(|_| socket.send_to(b"netwatch-test", dst).is_ok())
            .count()
    })
}

/// Opens a UDP socket in `ns` on `port` and counts what arrives until
/// `quiet` passes without a datagram.
pub fn udp_listener(ns: &Netns, port: u16) -> UdpSocket {
    ns.run(|| {
        let socket = UdpSocket::bind(("0.0.0.0", port)).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        socket
    })
}

pub fn count_received(socket: &UdpSocket) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while socket.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// One TCP connection attempt from `ns`; true if it connected.
pub fn tcp_connect(ns: &Netns, dst: &str, timeout: Duration) -> bool {
    let dst: SocketAddr = dst.parse().unwrap();
    ns.run(|| TcpStream::connect_timeout(&dst, timeout).is_ok())
}

/// Polls `f` until it returns `want` or `within` passes; returns the last value.
pub fn eventually<T: PartialEq + Copy>(want: T, within: Duration, mut f: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + within;
    loop {
        let got = f();
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A router between an inside host and the Internet: the inside host
/// (198.18.10.2) sits behind `LAN_IF`; the Internet side owns
/// `TARGET_RANGE`, reached through `WAN_IF`.
pub struct RouterLab {
    pub inside: Netns,
    pub router: Netns,
    pub internet: Netns,
}

pub const INSIDE_IP: &str = "198.18.10.2";
pub const LAN_IF: &str = "nw-lan";
pub const WAN_IF: &str = "nw-wan";

impl RouterLab {
    pub fn new() -> Self {
        let inside = Netns::new("in");
        let router = Netns::new("rt");
        let internet = Netns::new("net");
        veth(
            &inside,
            "nw-lanhost",
            "198.18.10.2/24",
            &router,
            LAN_IF,
            "198.18.10.1/24",
        );
        veth(&router, WAN_IF, "198.18.0.1/24", &internet, "nw-up", "198.18.0.2/24");
        inside.ip(&["route", "add", "default", "via", "198.18.10.1"]);
        internet.ip(&["route", "add", "198.18.10.0/24", "via", "198.18.0.1"]);
        internet.local_range(TARGET_RANGE);
        router.ip(&["route", "add", TARGET_RANGE, "via", "198.18.0.2"]);
        let out = router
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .output()
            .expect("sysctl");
        assert!(
            out.status.success(),
            "enabling forwarding: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        RouterLab {
            inside,
            router,
            internet,
        }
    }
}

impl Default for RouterLab {
    fn default() -> Self {
        Self::new()
    }
}
