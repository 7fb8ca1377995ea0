//! Interface slots: which interface each slot of the per-interface
//! counters belongs to, and what is attached there (for `status`).

use anyhow::{Result, anyhow, bail};
use log::warn;
use netwatch_common::{ATTACHED_TC, ATTACHED_TC_NETLINK, ATTACHED_XDP, IfaceInfo, MAX_IFACES, maps};

use super::{attach::XdpAttachMode, iface::ifindex, maps::PinnedMaps, tc::TcPath};
use crate::policy::Role;

/// Finds the slot an interface had before (by name), or a free one.
///
/// `hooks` are the hooks the configuration asks for there
/// ([`ATTACHED_XDP`], [`ATTACHED_TC`]): what `/metrics` exports.
pub fn claim_iface_slot(maps: &PinnedMaps, name: &str, role: Role, ifindex: u32, hooks: u8) -> Result<u32> {
    let mut map = maps.array::<IfaceInfo>(maps::IFACE_INFO)?;
    let infos: Vec<IfaceInfo> = (0..MAX_IFACES).map(|s| map.get(&s, 0)).collect::<Result<_, _>>()?;
    let name_bytes = iface_name_bytes(name)?;
    let slot = infos
        .iter()
        .position(|i| i.name == name_bytes)
        .or_else(|| infos.iter().position(|i| i.in_use == 0 && i.name == [0; 16]))
        .or_else(|| infos.iter().position(|i| i.in_use == 0))
        .ok_or_else(|| anyhow!("more than {MAX_IFACES} interfaces"))? as u32;
    let mut info = infos[slot as usize];
    if info.name != name_bytes {
        info = IfaceInfo::default();
    }
    info.in_use = 1;
    info.role = role.into();
    info.ifindex = ifindex;
    info.name = name_bytes;
    info.configured = hooks;
    map.set(slot, info, 0)?;
    Ok(slot)
}

pub fn update_iface(maps: &PinnedMaps, slot: u32, f: impl FnOnce(&mut IfaceInfo)) -> Result<()> {
    let mut map = maps.array::<IfaceInfo>(maps::IFACE_INFO)?;
    let mut info = map.get(&slot, 0)?;
    f(&mut info);
    map.set(slot, info, 0)?;
    Ok(())
}

fn iface_name_bytes(name: &str) -> Result<[u8; 16]> {
    let mut out = [0u8; 16];
    if name.is_empty() || name.len() > 15 {
        bail!("interface name {name:?} must be 1 to 15 bytes");
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

pub fn iface_name(info: &IfaceInfo) -> String {
    let end = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
    String::from_utf8_lossy(&info.name[..end]).into_owned()
}

/// Marks what is attached to an interface slot, for `status`.
/// `xdp` is `Some(None)` for a re-adopted XDP link, whose mode is as
/// recorded before.
pub fn mark_attached(
    maps: &PinnedMaps,
    slot: u32,
    xdp: Option<Option<XdpAttachMode>>,
    tc: Option<TcPath>,
) -> Result<()> {
    update_iface(maps, slot, |info| {
        if let Some(mode) = xdp {
            info.attached |= ATTACHED_XDP;
            if let Some(mode) = mode {
                info.xdp_generic = (mode == XdpAttachMode::Generic) as u8;
            }
        }
        if let Some(path) = tc {
            info.attached |= ATTACHED_TC;
            info.attached &= !ATTACHED_TC_NETLINK;
            if path == TcPath::Netlink {
                info.attached |= ATTACHED_TC_NETLINK;
            }
        }
    })
}

/// Notices interfaces that went away (or were replaced) while attached:
/// the kernel detached their programs; mark them so, keep their counters.
pub fn check_interfaces(maps: &PinnedMaps) -> Result<()> {
    for (slot, info) in maps.iface_slots()? {
        if info.attached == 0 {
            continue;
        }
        let name = iface_name(&info);
        if ifindex(&name).ok() != Some(info.ifindex) {
            warn!("interface {name} disappeared while attached: its programs are gone, its counters are kept");
            update_iface(maps, slot, |i| i.attached = 0)?;
        }
    }
    Ok(())
}

/// Forgets which interfaces and hooks are configured (before a
/// controller claims its own): an interface dropped from the
/// configuration keeps its counters but is no longer exported.
pub fn clear_configured(maps: &PinnedMaps) -> Result<()> {
    for (slot, info) in maps.iface_slots()? {
        if info.configured != 0 {
            update_iface(maps, slot, |i| i.configured = 0)?;
        }
    }
    Ok(())
}

/// Clears the attached bits of every slot (the controller is going away).
pub fn mark_all_detached(maps: &PinnedMaps) -> Result<()> {
    for slot in 0..MAX_IFACES {
        update_iface(maps, slot, |info| {
            info.attached = 0;
            info.in_use = 0;
            info.ifindex = 0;
        })?;
    }
    Ok(())
}
