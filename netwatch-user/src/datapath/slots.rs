//! Interface slots: which interface each slot of the per-interface
//! counters belongs to, and what is attached there (for `status`).

use anyhow::{Result, anyhow, bail};
use netwatch_common::{ATTACHED_TC, ATTACHED_TC_NETLINK, ATTACHED_XDP, IfaceInfo, MAX_IFACES, maps};

use super::{attach::XdpAttachMode, maps::PinnedMaps, tc::TcPath};
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
    set_kernel_name(maps, slot, None)?;
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

/// Records the name the kernel gives a slot's interface now, where it is
/// not the configured one (renamed while attached); `None` clears it.
pub fn set_kernel_name(maps: &PinnedMaps, slot: u32, name: Option<&str>) -> Result<()> {
    let bytes = match name {
        Some(name) => iface_name_bytes(name)?,
        None => [0; 16],
    };
    let mut map = maps.array::<[u8; 16]>(maps::IFACE_KERNEL_NAMES)?;
    if map.get(&slot, 0)? != bytes {
        map.set(slot, bytes, 0)?;
    }
    Ok(())
}

/// The kernel's name of each slot's interface where it differs from the
/// configured one (see [`set_kernel_name`]). Pins made by a netwatch
/// before this map existed have none.
pub fn kernel_names(maps: &PinnedMaps) -> Vec<Option<String>> {
    let Ok(map) = maps.array::<[u8; 16]>(maps::IFACE_KERNEL_NAMES) else {
        return vec![None; MAX_IFACES as usize];
    };
    (0..MAX_IFACES)
        .map(|slot| {
            let bytes = map.get(&slot, 0).ok()?;
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
        })
        .collect()
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
        set_kernel_name(maps, slot, None)?;
    }
    Ok(())
}
