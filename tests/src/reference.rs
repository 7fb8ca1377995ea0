//! A userspace reference classifier, written from netwatch's rule
//! semantics (README, "How it works") rather than from the datapath's
//! code: what class a frame falls in, and whether it is dropped. The fuzz
//! test holds the kernel to it frame by frame.

use ipnet::IpNet;
use netwatch_common::{ACTION_DROP, Class, Protocol};
use netwatch_user::policy::{Mode, Policy};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where a frame is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    Class(Class),
    /// Rule index in the policy, and whether it was dropped.
    Rule {
        rule: usize,
        dropped: bool,
    },
}

struct L4 {
    protocol: Protocol,
    dst_port: u16,
    src: IpAddr,
    dst: IpAddr,
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fn parse(f: &[u8]) -> Result<L4, Class> {
    if f.len() < 14 {
        return Err(Class::EthTruncated);
    }
    let mut ethertype = be16(f, 12).unwrap();
    let mut off = 14;
    let is_vlan = |t| t == 0x8100 || t == 0x88a8;
    for _ in 0..2 {
        if !is_vlan(ethertype) {
            break;
        }
        if off + 4 > f.len() {
            return Err(Class::VlanTruncated);
        }
        ethertype = be16(f, off + 2).unwrap();
        off += 4;
    }
    match ethertype {
        0x0800 => ipv4(f, off),
        0x86dd => ipv6(f, off),
        t if is_vlan(t) => Err(Class::VlanTooDeep),
        _ => Err(Class::NonIp),
    }
}

fn ipv4(f: &[u8], off: usize) -> Result<L4, Class> {
    if off + 20 > f.len() {
        return Err(Class::Ipv4Truncated);
    }
    let ihl = (f[off] & 0x0f) as usize * 4;
    if f[off] >> 4 != 4 || ihl < 20 {
        return Err(Class::Ipv4BadHeader);
    }
    if off + ihl > f.len() {
        return Err(Class::Ipv4Truncated);
    }
    if be16(f, off + 6).unwrap() & 0x1fff != 0 {
        return Err(Class::Fragment);
    }
    let src = Ipv4Addr::new(f[off + 12], f[off + 13], f[off + 14], f[off + 15]).into();
    let dst = Ipv4Addr::new(f[off + 16], f[off + 17], f[off + 18], f[off + 19]).into();
    l4(f, off + ihl, f[off + 9], src, dst)
}

fn ipv6(f: &[u8], off: usize) -> Result<L4, Class> {
    if off + 40 > f.len() {
        return Err(Class::Ipv6Truncated);
    }
    let addr = |at: usize| IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(&f[at..at + 16]).unwrap()));
    let (src, dst) = (addr(off + 8), addr(off + 24));
    let mut next = f[off + 6];
    let mut off = off + 40;
    let is_ext = |n| matches!(n, 0 | 43 | 60 | 51 | 44);
    for _ in 0..6 {
        if !is_ext(next) {
            return l4(f, off, next, src, dst);
        }
        let len = if next == 44 {
            if off + 8 > f.len() {
                return Err(Class::Ipv6ExtTruncated);
            }
            if be16(f, off + 2).unwrap() & 0xfff8 != 0 {
                return Err(Class::Fragment);
            }
            8
        } else {
            if off + 2 > f.len() {
                return Err(Class::Ipv6ExtTruncated);
            }
            if next == 51 {
                (f[off + 1] as usize + 2) * 4
            } else {
                (f[off + 1] as usize + 1) * 8
            }
        };
        next = f[off];
        off += len;
        if off > f.len() {
            return Err(Class::Ipv6ExtTruncated);
        }
    }
    if is_ext(next) {
        Err(Class::Ipv6ExtTooMany)
    } else {
        l4(f, off, next, src, dst)
    }
}

fn l4(f: &[u8], off: usize, proto: u8, src: IpAddr, dst: IpAddr) -> Result<L4, Class> {
    let (protocol, header) = match proto {
        17 => (Protocol::Udp, 8),
        6 => (Protocol::Tcp, 20),
        _ => return Err(Class::Unmatched),
    };
    if off + header > f.len() {
        return Err(Class::L4Truncated);
    }
    Ok(L4 {
        protocol,
        dst_port: be16(f, off + 2).unwrap(),
        src,
        dst,
    })
}

fn listed(list: &[IpNet], addr: IpAddr) -> bool {
    list.iter().any(|n| n.contains(&addr))
}

/// Where `frame`, seen in `direction` (0 inbound, 1 outbound), is
/// counted under `policy` (no auto-blocks: verdicts are stateless).
pub fn classify(policy: &Policy, direction: usize, frame: &[u8]) -> Counted {
    let p = match parse(frame) {
        Ok(p) => p,
        Err(class) => return Counted::Class(class),
    };
    let Some(rule) = policy
        .rules
        .iter()
        .position(|r| r.protocol == p.protocol && r.port == p.dst_port)
    else {
        return Counted::Class(Class::Unmatched);
    };
    let action = policy.rules[rule].action[direction];
    let enforce = policy.mode == Mode::Enforce;
    let allowed = listed(&policy.allowlist, p.src) || listed(&policy.allowlist, p.dst);
    let wanted = action == ACTION_DROP || listed(&policy.blocklist, p.src);
    Counted::Rule {
        rule,
        dropped: enforce && !allowed && wanted,
    }
}
