//! Interfaces as this network namespace knows them: index and link type.

use anyhow::{Context as _, Result, anyhow, bail};
use netwatch_common::LinkKind;

pub fn ifindex(name: &str) -> Result<u32> {
    if name.contains('\0') {
        bail!("interface name {name:?} contains NUL");
    }
    nix::net::if_::if_nametoindex(name)
        .map_err(|_| anyhow!("interface {name:?} does not exist in this network namespace"))
}

/// The name the interface of index `index` has in this network namespace
/// now, if there is one.
pub fn ifname(index: u32) -> Option<String> {
    let name = nix::net::if_::if_indextoname(index).ok()?;
    Some(name.to_string_lossy().into_owned())
}

/// Where frames on `iface` start, from its link type (`ARPHRD_*`, as
/// SIOCGIFHWADDR reports it in this network namespace). A device whose
/// frames netwatch cannot parse is refused, never attached blind.
pub fn link_kind(iface: &str) -> Result<LinkKind> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_PPP: u16 = 512;
    const ARPHRD_RAWIP: u16 = 519;
    const ARPHRD_TUNNEL: u16 = 768;
    const ARPHRD_TUNNEL6: u16 = 769;
    const ARPHRD_LOOPBACK: u16 = 772;
    const ARPHRD_SIT: u16 = 776;
    const ARPHRD_IPGRE: u16 = 778;
    const ARPHRD_IP6GRE: u16 = 823;
    const ARPHRD_NONE: u16 = 0xfffe;
    let kind = link_type(iface)?;
    match kind {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(LinkKind::Ethernet),
        ARPHRD_NONE | ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_IPGRE
        | ARPHRD_IP6GRE => Ok(LinkKind::Ip),
        other => bail!(
            "interface {iface:?} has link type {other} (ARPHRD_*), whose frames netwatch cannot parse; it \
             supports Ethernet-framed devices (Ethernet, veth, bridge, bond, VLAN, PPPoE's physical port) and \
             L3 devices (tun, ppp, wireguard, ipip, sit, gre, ip6tnl)"
        ),
    }
}

/// The `ARPHRD_*` link type of `iface` in this network namespace.
fn link_type(iface: &str) -> Result<u16> {
    let name = std::ffi::CString::new(iface).map_err(|_| anyhow!("interface name {iface:?} contains NUL"))?;
    // SAFETY: an ifreq is plain data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > req.ifr_name.len() {
        bail!("interface name {iface:?} is longer than 15 bytes");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a socket to read link types");
    }
    // SAFETY: fd is a new descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCGIFHWADDR fills `req.ifr_ifru.ifru_hwaddr`.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the link type of interface {iface:?}"));
    }
    // SAFETY: the ioctl succeeded, so the hwaddr member is set.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}
