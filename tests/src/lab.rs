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
        let lab = Lab {
            scanner: Netns::new("s"),
            victim: Netns::new("v"),
        };
        lab.make_link();
        lab.victim.local_range(TARGET_RANGE);
        lab.scanner.ip(&["route", "add", TARGET_RANGE, "via", VICTIM_IP]);
        lab
    }

    /// The veth between scanner and victim with their addresses; also
    /// what a test calls to re-create it after deleting it.
    pub fn make_link(&self) {
        veth(
            &self.scanner,
            SCANNER_IF,
            "198.18.0.1/24",
            &self.victim,
            VICTIM_IF,
            "198.18.0.2/24",
        );
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
        socket
            .set_read_timeout(Some(crate::patience(Duration::from_millis(300))))
            .unwrap();
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
    let deadline = Instant::now() + crate::patience(within);
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

/// A TCP connection from `local` (an address of the namespace the
/// calling thread is in, IPv4 or IPv6) to `remote`: a real handshake.
pub fn tcp_connect_from(local: std::net::IpAddr, remote: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(remote), Type::STREAM, None)?;
    socket.bind(&SockAddr::from(SocketAddr::new(local, 0)))?;
    socket.connect_timeout(&SockAddr::from(remote), crate::patience(Duration::from_secs(2)))?;
    Ok(socket.into())
}

/// A TCP segment from `src`:`src_port` to `dst` as a whole IP packet,
/// with a correct TCP checksum (the receiving stack checks it); the IPv4
/// header checksum is left to the kernel, which fills it for raw sockets.
pub fn tcp_packet(src: std::net::IpAddr, src_port: u16, dst: SocketAddr, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    use std::net::IpAddr;
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src_port.to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let (mut ip, pseudo) = match (src, dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let mut pseudo = ip[12..20].to_vec();
            pseudo.extend_from_slice(&[0, 6, 0, 20]);
            (ip, pseudo)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let mut pseudo = ip[8..40].to_vec();
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
            (ip, pseudo)
        }
        _ => panic!("{src} and {dst} are of different families"),
    };
    let mut sum: u32 = pseudo
        .chunks(2)
        .chain(tcp.chunks(2))
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Pins the calling thread to the first CPU it may run on, and returns
/// that CPU. What a thread sends through a veth is received (XDP
/// included) on the CPU that sent it, so threads pinned alike put their
/// traffic through the datapath on one CPU: per-CPU state, such as the
/// local lists of an LRU map, is then shared rather than split by chance.
pub fn pin_to_first_cpu() -> usize {
    // SAFETY: sched_{get,set}affinity on this thread with a cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set), 0);
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .expect("a CPU");
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        cpu
    }
}

/// Sends `count` TCP SYNs to `dst` from `ns` through a raw socket, the
/// `i`th from `source(i)` (any address: spoofed), port 32768 + i % 28000
/// (ephemeral ports, so that no answer goes to a rule port);
/// stops after `within` in any case. The sending thread is pinned with
/// [`pin_to_first_cpu`]. Returns how many the kernel took.
pub fn spoof_syns(
    ns: &Netns,
    dst: SocketAddr,
    count: u32,
    within: Duration,
    source: impl Fn(u32) -> std::net::IpAddr + Send + Sync,
) -> u32 {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    ns.run(|| {
        pin_to_first_cpu();
        // IPPROTO_RAW: the packet carries its own IP header.
        let socket = Socket::new(
            Domain::for_address(dst),
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("raw socket");
        let to = SockAddr::from(SocketAddr::new(dst.ip(), 0));
        let deadline = Instant::now() + within;
        let mut sent = 0;
        for i in 0..count {
            if i % 1024 == 0 && Instant::now() > deadline {
                break;
            }
            let packet = tcp_packet(
                source(i),
                32768 + (i % 28000) as u16,
                dst,
                0x02,
                i.wrapping_mul(7919),
                0,
            );
            // The socket's queue may be briefly full under a flood: retry
            // a few times, then count the SYN as not sent.
            for _ in 0..100 {
                match socket.send_to(&packet, &to) {
                    Ok(_) => {
                        sent += 1;
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => std::thread::sleep(Duration::from_micros(50)),
                    Err(e) => panic!("sending a spoofed SYN: {e}"),
                }
            }
        }
        sent
    })
}
