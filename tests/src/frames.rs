//! Builds Ethernet frames for BPF_PROG_TEST_RUN: VLAN tags, PPPoE, IPv4
//! with options and fragments, IPv6 with extension headers, UDP and TCP;
//! or the bare IP packet, as an L3 device (tun, ppp) carries it.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const UDP: u8 = 17;
pub const TCP: u8 = 6;
pub const ICMP: u8 = 1;

/// IPv6 extension headers to put between the fixed header and L4.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Authentication header (RFC 4302), 16 bytes.
    Auth,
    /// Fragment header with this offset (in 8-octet units).
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    /// The header's IPv6 next-header number.
    pub fn proto(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::DestOpts => 60,
            Ext::Auth => 51,
            Ext::Fragment { .. } => 44,
        }
    }
}

#[derive(Clone, Debug)]
pub enum L3 {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        /// Option bytes (padded to 4), making IHL > 5.
        options: Vec<u8>,
        /// Fragment offset in 8-octet units.
        frag_offset: u16,
        more_fragments: bool,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ext: Vec<Ext>,
    },
}

#[derive(Clone, Debug)]
pub struct Frame {
    /// Ethertypes of VLAN tags, outermost first (0x8100 or 0x88a8).
    pub vlans: Vec<u16>,
    pub l3: L3,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: usize,
    /// The payload's bytes, all alike: below 0x80 by default, so a udp/137
    /// payload reads as an NBNS query (R bit clear, RFC 1002 4.2.1.1).
    pub fill: u8,
    /// A PPPoE session header (RFC 2516) after the VLAN tags.
    pub pppoe: bool,
    /// Keep only this many bytes of the UDP/TCP part, with the IP length
    /// fields saying so (a packet short of its header, or a tiny fragment).
    pub l4_keep: Option<usize>,
    /// TCP flags, sequence and acknowledgement numbers (a SYN, sequence 1,
    /// unless set with [`Frame::tcp_seg`]).
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
}

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
pub const SYN_ACK: u8 = SYN | ACK;

impl Frame {
    pub fn udp4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Self {
        Frame {
            vlans: vec![],
            l3: L3::V4 {
                src: src.into(),
                dst: dst.into(),
                options: vec![],
                frag_offset: 0,
                more_fragments: false,
            },
            proto: UDP,
            src_port,
            dst_port,
            payload: 50,
            fill: 0x2b,
            pppoe: false,
            l4_keep: None,
            tcp_flags: SYN,
            seq: 1,
            ack: 0,
        }
    }

    pub fn tcp4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Self {
        Frame {
            proto: TCP,
            ..Self::udp4(src, dst, src_port, dst_port)
        }
    }

    pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, src_port: u16, dst_port: u16) -> Self {
        Frame {
            l3: L3::V6 { src, dst, ext: vec![] },
            ..Self::udp4([0; 4], [0; 4], src_port, dst_port)
        }
    }

    pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, src_port: u16, dst_port: u16) -> Self {
        Frame {
            proto: TCP,
            ..Self::udp6(src, dst, src_port, dst_port)
        }
    }

    /// A TCP segment with these flags, sequence and acknowledgement numbers.
    pub fn tcp_seg(mut self, flags: u8, seq: u32, ack: u32) -> Self {
        self.tcp_flags = flags;
        self.seq = seq;
        self.ack = ack;
        self
    }

    pub fn vlan(mut self, tags: &[u16]) -> Self {
        self.vlans = tags.to_vec();
        self
    }

    /// Carries the IP packet in a PPPoE session (PPP protocol 0x0021 or
    /// 0x0057).
    pub fn pppoe(mut self) -> Self {
        self.pppoe = true;
        self
    }

    /// Keeps only `bytes` of the transport header and payload, and makes
    /// the IP length fields agree.
    pub fn l4_keep(mut self, bytes: usize) -> Self {
        self.l4_keep = Some(bytes);
        self
    }

    pub fn proto(mut self, proto: u8) -> Self {
        self.proto = proto;
        self
    }

    pub fn ipv4_options(mut self, len: usize) -> Self {
        if let L3::V4 { options, .. } = &mut self.l3 {
            // NOP options, then End of Options.
            *options = vec![1; len];
            if len > 0 {
                options[len - 1] = 0;
            }
        }
        self
    }

    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        if let L3::V4 {
            frag_offset,
            more_fragments,
            ..
        } = &mut self.l3
        {
            *frag_offset = offset;
            *more_fragments = more;
        }
        self
    }

    pub fn ipv6_ext(mut self, headers: &[Ext]) -> Self {
        if let L3::V6 { ext, .. } = &mut self.l3 {
            *ext = headers.to_vec();
        }
        self
    }

    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    /// Fills the payload with `byte` (0x80 and above: an NBNS response's
    /// flags on udp/137).
    pub fn fill(mut self, byte: u8) -> Self {
        self.fill = byte;
        self
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut out = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        for tag in &self.vlans {
            out.extend_from_slice(&tag.to_be_bytes());
            out.extend_from_slice(&[0, 0x0a]); // VLAN id 10
        }
        let ip = self.build_ip();
        let v4 = matches!(self.l3, L3::V4 { .. });
        if self.pppoe {
            out.extend_from_slice(&[0x88, 0x64]);
            // Version 1, type 1, code 0 (session data), session 0x1234,
            // length of the PPP frame.
            out.extend_from_slice(&[0x11, 0x00, 0x12, 0x34]);
            out.extend_from_slice(&((ip.len() + 2) as u16).to_be_bytes());
            out.extend_from_slice(if v4 { &[0x00, 0x21] } else { &[0x00, 0x57] });
        } else if v4 {
            out.extend_from_slice(&[0x08, 0x00]);
        } else {
            out.extend_from_slice(&[0x86, 0xdd]);
        }
        out.extend_from_slice(&ip);
        out
    }

    /// The IP packet alone, as an L3 device (tun, ppp, wireguard) carries it.
    pub fn build_ip(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src_port.to_be_bytes());
        l4.extend_from_slice(&self.dst_port.to_be_bytes());
        match self.proto {
            UDP => {
                l4.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            TCP => {
                l4.extend_from_slice(&self.seq.to_be_bytes());
                l4.extend_from_slice(&self.ack.to_be_bytes());
                l4.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            _ => l4.extend_from_slice(&[0; 4]),
        }
        l4.extend(std::iter::repeat_n(self.fill, self.payload));
        if let Some(keep) = self.l4_keep {
            l4.truncate(keep);
        }

        let mut out = Vec::new();
        match &self.l3 {
            L3::V4 {
                src,
                dst,
                options,
                frag_offset,
                more_fragments,
            } => {
                let mut options = options.clone();
                while options.len() % 4 != 0 {
                    options.push(0);
                }
                let ihl = 5 + options.len() / 4;
                let total = (ihl * 4 + l4.len()) as u16;
                out.push(0x40 | ihl as u8);
                out.push(0);
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&[0x12, 0x34]);
                let flags = (*frag_offset & 0x1fff) | if *more_fragments { 0x2000 } else { 0 };
                out.extend_from_slice(&flags.to_be_bytes());
                out.push(64);
                out.push(self.proto);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(&options);
            }
            L3::V6 { src, dst, ext } => {
                let mut ext_bytes = Vec::new();
                for (i, e) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map(|n| n.proto()).unwrap_or(self.proto);
                    match e {
                        Ext::Fragment { offset, more } => {
                            let field = (offset << 3) | *more as u16;
                            ext_bytes.extend_from_slice(&[next, 0]);
                            ext_bytes.extend_from_slice(&field.to_be_bytes());
                            ext_bytes.extend_from_slice(&[0, 0, 0, 7]);
                        }
                        // Payload length 2 (in 4-octet units, minus 2): 16 bytes.
                        Ext::Auth => {
                            ext_bytes.extend_from_slice(&[next, 2, 0, 0]);
                            ext_bytes.extend_from_slice(&[0, 0, 0x10, 0x01, 0, 0, 0, 1, 0, 0, 0, 0]);
                        }
                        // 16-byte option headers (length field 1) to exercise the length arithmetic.
                        _ => {
                            ext_bytes.extend_from_slice(&[next, 1]);
                            ext_bytes.extend_from_slice(&[1, 12]);
                            ext_bytes.extend_from_slice(&[0; 12]);
                        }
                    }
                }
                let first = ext.first().map(|e| e.proto()).unwrap_or(self.proto);
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&((ext_bytes.len() + l4.len()) as u16).to_be_bytes());
                out.push(first);
                out.push(64);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(&ext_bytes);
            }
        }
        out.extend_from_slice(&l4);
        out
    }
}

/// An ARP request: not IP.
pub fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 198, 18, 0, 1]);
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&[198, 18, 0, 2]);
    out
}
