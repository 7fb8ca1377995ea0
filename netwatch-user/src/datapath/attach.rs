//! Attaching: XDP through BPF links, TC egress through TCX or a netlink
//! filter (see `tc`), each re-adopted from an earlier run; and detaching
//! everything netwatch pinned.
//!
//! Links are pinned under `links/` so that a restarted controller
//! re-adopts them and `netwatch detach` can remove them even after a
//! crash.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
    sys::SyscallError,
};
use log::{debug, info, warn};
use netwatch_common::{Direction, maps};

use super::{
    iface::{ifindex, ifname, link_kind},
    load::{TC_PROGRAM, XDP_PROGRAM, load_instance},
    pins::ensure_accessible,
    tc::{self, TcAttach, TcPath},
};

/// How an XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    Generic,
}

/// The pin of `hook` on `iface` under `links/`. bpffs refuses names with
/// a '.', which VLAN devices (`eth0.100`) have; no interface name holds a
/// ':', so a '.' becomes ':'.
fn link_pin(pin_dir: &Path, hook: &str, iface: &str) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{hook}_{}", iface.replace('.', ":")))
}

/// The hook and interface a pin under `links/` is for.
fn parse_link_pin(name: &str) -> Option<(&str, String)> {
    let (hook, iface) = name.split_once('_')?;
    Some((hook, iface.replace(':', ".")))
}

/// Pins under `links/` that record a netlink TC filter (see `tc`):
/// the program the filter runs; the next program while it replaces the
/// filter's; and a mark that netwatch created the interface's clsact
/// qdisc (a second pin of a program: bpffs holds BPF objects only).
const TC_NL: &str = "tcnl";
const TC_NL_NEXT: &str = "tcnlnext";
const TC_NL_QDISC: &str = "tcqdisc";

/// What one attachment left under the pin directory.
enum Pinned {
    /// A BPF link pin: removing it detaches.
    Link(PathBuf),
    /// A netlink TC egress filter on the interface of this index (its
    /// name may have changed since).
    TcNetlink(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    TcEgress,
}

/// One program instance this controller attached.
struct Instance {
    /// The configured interface name it was attached under.
    iface: String,
    hook: Hook,
    _ebpf: Ebpf,
    pinned: Pinned,
}

/// The programs this controller has attached. Dropping it leaves the
/// pinned links and netlink filters in place; [`Attachments::detach`]
/// removes them.
pub struct Attachments {
    pin_dir: PathBuf,
    /// Program instances and what they own under the pin directory.
    instances: Vec<Instance>,
}

impl Attachments {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            instances: Vec::new(),
        }
    }

    /// Records an attachment, in place of an earlier one of the same hook
    /// on the same interface (whose program the new one replaced).
    fn push(&mut self, iface: &str, hook: Hook, ebpf: Ebpf, pinned: Pinned) {
        self.instances.retain(|i| !(i.iface == iface && i.hook == hook));
        self.instances.push(Instance {
            iface: iface.to_string(),
            hook,
            _ebpf: ebpf,
            pinned,
        });
    }

    /// Detaches whatever netwatch attached under the name `iface` and
    /// removes its pins: from the interface of index `ifindex` where it
    /// still exists (renamed), or nothing but the pins where it is gone
    /// (the kernel dropped its programs with it). The interface keeps its
    /// slot and counters; attaching again starts afresh.
    pub fn release(&mut self, iface: &str, ifindex: Option<u32>) -> Result<()> {
        // The instances hold descriptors of the links: closed first, so
        // that removing the pins releases the links.
        self.instances.retain(|i| i.iface != iface);
        for hook in ["xdp", "tc"] {
            let pin = link_pin(&self.pin_dir, hook, iface);
            if pin.exists() {
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            }
        }
        remove_tc_netlink(&self.pin_dir, iface, ifindex)?;
        Ok(())
    }

    /// Attaches XDP to `iface`, natively if the driver can, else in generic
    /// mode. A link left pinned by an earlier run is re-adopted: the new
    /// program replaces the old one atomically, with no gap in counting.
    /// Returns the mode, or `None` when an earlier run's link was re-adopted
    /// (its mode is unchanged).
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        slot: u32,
        direction: Direction,
        force_generic: bool,
    ) -> Result<Option<XdpAttachMode>> {
        let link = link_kind(iface)?;
        let mut ebpf = load_instance(&self.pin_dir, slot, direction, link)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .context("XDP program missing from object")?
            .try_into()?;
        program.load().context("loading the XDP program (verifier)")?;
        let pin = link_pin(&self.pin_dir, "xdp", iface);
        if let Some(link) = readopt(&pin)? {
            match program.attach_to_link(XdpLink::try_from(link)?) {
                Ok(_) => {
                    info!("{iface}: re-adopted the XDP link pinned by an earlier run");
                    self.push(iface, Hook::Xdp, ebpf, Pinned::Link(pin));
                    return Ok(None);
                }
                Err(err) => {
                    let err = anyhow::Error::from(err);
                    if !is_dead_link(&err) {
                        return Err(err).with_context(|| format!("replacing the XDP program on {iface}"));
                    }
                    drop_dead_link(&pin, iface, "XDP")?;
                }
            }
        }
        let mode = {
            let index = ifindex(iface)?;
            let native = if force_generic {
                Err(anyhow!("generic mode requested"))
            } else {
                program
                    .attach_to_if_index(index, XdpMode::Driver)
                    .map_err(anyhow::Error::from)
            };
            let (id, mode) = match native {
                Ok(id) => (id, XdpAttachMode::Native),
                Err(err) => {
                    if !force_generic {
                        info!("{iface}: native XDP not available ({err:#}); attaching in generic (SKB) mode");
                    }
                    let id = program
                        .attach_to_if_index(index, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP to {iface}"))?;
                    (id, XdpAttachMode::Generic)
                }
            };
            let link = FdLink::try_from(program.take_link(id)?)
                .with_context(|| format!("{iface}: XDP attached through netlink, not a BPF link"))?;
            link.pin(&pin)
                .with_context(|| format!("pinning XDP link at {}", pin.display()))?;
            Some(mode)
        };
        self.push(iface, Hook::Xdp, ebpf, Pinned::Link(pin));
        Ok(mode)
    }

    /// Attaches the TC egress program to `iface`, through TCX or netlink
    /// as `setting` and the kernel decide (see `tc`). What an earlier run
    /// left attached is re-adopted: its program is replaced in place, with
    /// no gap. An earlier run's attachment through the other path is
    /// removed once the new one is in place. Returns the path taken.
    pub fn attach_tc_egress(&mut self, iface: &str, slot: u32, setting: TcAttach) -> Result<TcPath> {
        let link = link_kind(iface)?;
        let index = ifindex(iface)?;
        let path = tc::resolve(setting, tc::tcx_supported(iface)?, iface)?;
        let mut ebpf = load_instance(&self.pin_dir, slot, Direction::Outbound, link)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .context("TC program missing from object")?
            .try_into()?;
        program.load().context("loading the TC program (verifier)")?;
        let tcx_pin = link_pin(&self.pin_dir, "tc", iface);
        let pinned = match path {
            TcPath::Tcx => {
                let mut readopted = false;
                if let Some(old) = readopt(&tcx_pin)? {
                    match program.attach_to_link(SchedClassifierLink::try_from(old)?) {
                        Ok(_) => {
                            info!("{iface}: re-adopted the TC egress link pinned by an earlier run");
                            readopted = true;
                        }
                        Err(err) => {
                            let err = anyhow::Error::from(err);
                            if !is_dead_link(&err) {
                                return Err(err).with_context(|| format!("replacing the TC program on {iface}"));
                            }
                            drop_dead_link(&tcx_pin, iface, "TC egress")?;
                        }
                    }
                }
                if !readopted {
                    // First in line, as the netlink filter is.
                    let id = program
                        .attach_with_options(
                            iface,
                            TcAttachType::Egress,
                            TcAttachOptions::TcxOrder(LinkOrder::first()),
                        )
                        .with_context(|| format!("attaching TC egress to {iface} through TCX"))?;
                    let link = FdLink::try_from(program.take_link(id)?)?;
                    link.pin(&tcx_pin)
                        .with_context(|| format!("pinning TC link at {}", tcx_pin.display()))?;
                }
                if remove_tc_netlink(&self.pin_dir, iface, Some(index))? > 0 {
                    info!("{iface}: removed the netlink TC filter of an earlier run (now TCX)");
                }
                Pinned::Link(tcx_pin)
            }
            TcPath::Netlink => {
                attach_tc_netlink(&self.pin_dir, program, iface, index)?;
                if tcx_pin.exists() {
                    fs::remove_file(&tcx_pin).with_context(|| format!("removing {}", tcx_pin.display()))?;
                    info!("{iface}: removed the TCX link of an earlier run (now a netlink filter)");
                }
                Pinned::TcNetlink(index)
            }
        };
        self.push(iface, Hook::TcEgress, ebpf, pinned);
        Ok(path)
    }

    /// Detaches every program this controller attached (by removing the
    /// link pins, and the netlink filters with their records); maps stay
    /// pinned, so counters continue next run.
    pub fn detach(self) {
        for Instance { iface, pinned, .. } in &self.instances {
            match pinned {
                Pinned::Link(pin) => {
                    if let Err(err) = fs::remove_file(pin) {
                        warn!("removing link pin {}: {err}", pin.display());
                    }
                }
                Pinned::TcNetlink(index) => {
                    if let Err(err) = remove_tc_netlink(&self.pin_dir, iface, Some(*index)) {
                        warn!("removing the netlink TC filter on {iface}: {err:#}");
                    }
                }
            }
        }
    }
}

/// The id of a pinned program, if the pin exists.
fn pinned_prog_id(pin: &Path) -> Result<Option<u32>> {
    if !pin.exists() {
        return Ok(None);
    }
    let info = ProgramInfo::from_pin(pin).with_context(|| format!("{} is not a pinned BPF program", pin.display()))?;
    Ok(Some(info.id()))
}

/// netwatch's netlink filter on `iface`'s egress: the one that runs a
/// program recorded under the pin directory. `true` when it runs the
/// program of the `next` pin (a run stopped between replacing the
/// filter's program and renaming its pin).
fn find_tc_netlink(pin_dir: &Path, iface: &str, index: u32) -> Result<Vec<(tc::Filter, bool)>> {
    let record = pinned_prog_id(&link_pin(pin_dir, TC_NL, iface))?;
    let next = pinned_prog_id(&link_pin(pin_dir, TC_NL_NEXT, iface))?;
    if record.is_none() && next.is_none() {
        return Ok(Vec::new());
    }
    let filters =
        tc::filters(index, tc::Hook::Egress).with_context(|| format!("listing the TC egress filters of {iface}"))?;
    Ok(filters
        .into_iter()
        .filter_map(|f| match f.prog_id {
            Some(id) if Some(id) == record => Some((f, false)),
            Some(id) if Some(id) == next => Some((f, true)),
            _ => None,
        })
        .collect())
}

/// Pins `program` at `pin` through a temporary name and a rename, so the
/// record of a filter is never missing.
fn repin(program: &mut SchedClassifier, pin_dir: &Path, hook: &str, iface: &str) -> Result<()> {
    let next = link_pin(pin_dir, TC_NL_NEXT, iface);
    let pin = link_pin(pin_dir, hook, iface);
    if !next.exists() {
        program
            .pin(&next)
            .with_context(|| format!("pinning the TC program at {}", next.display()))?;
    }
    fs::rename(&next, &pin).with_context(|| format!("renaming {} to {}", next.display(), pin.display()))
}

/// Attaches `program` as a `bpf` filter on `iface`'s clsact egress hook,
/// replacing the program of netwatch's filter there if an earlier run
/// left one (same priority and handle: one filter, no gap).
fn attach_tc_netlink(pin_dir: &Path, program: &mut SchedClassifier, iface: &str, index: u32) -> Result<()> {
    let next = link_pin(pin_dir, TC_NL_NEXT, iface);
    let mut found = find_tc_netlink(pin_dir, iface, index)?;
    if let Some((_, true)) = found.first() {
        // The earlier run replaced the program but did not rename its pin.
        fs::rename(&next, link_pin(pin_dir, TC_NL, iface)).context("completing an earlier run's re-pin")?;
    }
    if next.exists() {
        fs::remove_file(&next).with_context(|| format!("removing {}", next.display()))?;
    }
    // Extra netwatch filters (a second one can only come from an older
    // netwatch or a hand-made copy): one is enough.
    for (extra, _) in found.iter().skip(1) {
        warn!(
            "{iface}: removing a duplicate netwatch TC filter (pref {})",
            extra.priority
        );
        tc::delete_filter(index, tc::Hook::Egress, extra)?;
    }
    program
        .pin(&next)
        .with_context(|| format!("pinning the TC program at {}", next.display()))?;
    match found.drain(..).next() {
        Some((filter, _)) => {
            let old = SchedClassifierLink::attached(
                iface,
                TcAttachType::Egress,
                filter.priority,
                TcHandle::from(filter.handle),
                None,
            )?;
            let id = program
                .attach_to_link(old)
                .with_context(|| format!("replacing the program of the TC filter on {iface}"))?;
            // The filter outlives this process: never detach it on drop.
            std::mem::forget(program.take_link(id)?);
            repin(program, pin_dir, TC_NL, iface)?;
            info!(
                "{iface}: re-adopted the netlink TC egress filter of an earlier run (pref {})",
                filter.priority
            );
        }
        None => {
            // Recorded before the filter exists: a crash in between leaves a
            // record without a filter (re-attached next run), never a
            // filter without a record.
            repin(program, pin_dir, TC_NL, iface)?;
            let added_clsact = !tc::has_clsact(index).with_context(|| format!("listing the qdiscs of {iface}"))?;
            if added_clsact {
                aya::programs::tc::qdisc_add_clsact(iface)
                    .with_context(|| format!("adding a clsact qdisc to {iface}"))?;
                // A record left by the qdisc of an interface of this name
                // that was deleted (and this one made) meanwhile.
                let record = link_pin(pin_dir, TC_NL_QDISC, iface);
                if record.exists() {
                    fs::remove_file(&record).with_context(|| format!("removing {}", record.display()))?;
                }
                program
                    .pin(&record)
                    .with_context(|| format!("recording that netwatch added the clsact qdisc of {iface}"))?;
            }
            // First in line: a filter before netwatch's that ends
            // classification (any non-direct-action match does) would hide
            // packets from it; netwatch's own pass lets the others run.
            let others = tc::filters(index, tc::Hook::Egress)
                .with_context(|| format!("listing the TC egress filters of {iface}"))?;
            let priority = match others.iter().map(|f| f.priority).min() {
                None => 0, // the kernel's choice, 49152
                Some(first) if first > 1 => first - 1,
                Some(_) => {
                    warn!("{iface}: another TC egress filter has pref 1 and runs before netwatch's");
                    0
                }
            };
            let attached = program.attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority,
                    ..NlOptions::default()
                }),
            );
            let id = match attached {
                Ok(id) => id,
                Err(err) => {
                    let _ = remove_tc_netlink(pin_dir, iface, Some(index));
                    let empty = || -> io::Result<bool> {
                        Ok(tc::filters(index, tc::Hook::Ingress)?.is_empty()
                            && tc::filters(index, tc::Hook::Egress)?.is_empty())
                    };
                    if added_clsact && empty().unwrap_or(false) {
                        let _ = tc::delete_clsact(index);
                    }
                    return Err(err).with_context(|| format!("attaching TC egress to {iface} through netlink"));
                }
            };
            std::mem::forget(program.take_link(id)?);
        }
    }
    Ok(())
}

/// Removes netwatch's netlink TC filter attached under the name `iface`
/// (on the interface of index `index`, which may have been renamed) and
/// its records, and the clsact qdisc if netwatch added it and no filter
/// is left on it. Other filters are never touched. Returns the number of
/// pins removed.
fn remove_tc_netlink(pin_dir: &Path, iface: &str, index: Option<u32>) -> Result<usize> {
    let pins = [TC_NL, TC_NL_NEXT, TC_NL_QDISC].map(|hook| link_pin(pin_dir, hook, iface));
    if !pins.iter().any(|p| p.exists()) {
        return Ok(0);
    }
    // Gone with its interface otherwise.
    if let Some(index) = index.filter(|&i| ifname(i).is_some()) {
        let ours = find_tc_netlink(pin_dir, iface, index)?;
        for (filter, _) in &ours {
            tc::delete_filter(index, tc::Hook::Egress, filter)
                .with_context(|| format!("removing netwatch's TC egress filter on {iface}"))?;
            info!(
                "{iface}: removed the netlink TC egress filter (pref {})",
                filter.priority
            );
        }
        // Only where netwatch's filter was found: this is the interface
        // (and network namespace) netwatch added the qdisc to.
        if !ours.is_empty() && pins[2].exists() && tc::has_clsact(index)? {
            let left = tc::filters(index, tc::Hook::Ingress)?.len() + tc::filters(index, tc::Hook::Egress)?.len();
            if left == 0 {
                tc::delete_clsact(index)
                    .with_context(|| format!("removing the clsact qdisc netwatch added to {iface}"))?;
                info!("{iface}: removed the clsact qdisc netwatch added");
            } else {
                info!("{iface}: left the clsact qdisc netwatch added in place: {left} other filters use it");
            }
        }
    }
    let mut removed = 0;
    for pin in &pins {
        if pin.exists() {
            fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Opens a link pinned by an earlier run, if any.
/// Whether re-adopting a pinned link failed because the link is dead:
/// its interface was deleted (and maybe re-created under the same name)
/// while no controller ran, and the kernel answers ENOLINK.
fn is_dead_link(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|code| code == libc::ENOLINK)
    }) || format!("{err:#}").contains(&format!("os error {}", libc::ENOLINK))
}

/// Removes the pin of a dead link (see [`is_dead_link`]), so the hook is
/// attached afresh; the interface keeps its slot, so its counters continue.
fn drop_dead_link(pin: &Path, iface: &str, hook: &str) -> Result<()> {
    warn!(
        "{iface}: the {hook} link pinned for it is dead (the interface was deleted, maybe re-created, since it was \
         attached); attaching afresh, counters kept"
    );
    fs::remove_file(pin).with_context(|| format!("removing the dead link pin {}", pin.display()))
}

fn readopt(pin: &Path) -> Result<Option<FdLink>> {
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => Ok(Some(FdLink::from(pinned))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(err) => Err(err).with_context(|| format!("opening pinned link {}", pin.display())),
    }
}

/// Removes every program, link and map netwatch pinned under `pin_dir`.
/// Returns the number of pins removed.
pub fn detach_all(pin_dir: &Path) -> Result<usize> {
    ensure_accessible(pin_dir)?;
    if !pin_dir.exists() {
        return Ok(0);
    }
    // The lock `run` holds: never unpin the maps under a live controller.
    let Some(_lock) = super::pins::try_lock_pin_dir(pin_dir)? else {
        bail!(
            "a `netwatch run` is using {}: stop it first (`systemctl stop netwatch`; with keep_attached the programs \
             stay attached and `netwatch detach` then removes them)",
            pin_dir.display()
        );
    };
    let mut removed = 0;
    let links = pin_dir.join("links");
    if links.exists() {
        // Netlink filters first: their records identify them.
        let mut tc_netlink = std::collections::BTreeSet::new();
        for entry in fs::read_dir(&links)? {
            let name = entry?.file_name();
            if let Some((hook, iface)) = name.to_str().and_then(parse_link_pin)
                && [TC_NL, TC_NL_NEXT, TC_NL_QDISC].contains(&hook)
            {
                tc_netlink.insert(iface);
            }
        }
        // An interface renamed while attached is found by the index its
        // slot recorded, others by name.
        let recorded: std::collections::HashMap<String, u32> = super::maps::PinnedMaps::open(pin_dir)
            .and_then(|maps| maps.iface_slots())
            .map(|slots| {
                slots
                    .iter()
                    .filter(|(_, info)| info.ifindex != 0)
                    .map(|(_, info)| (super::slots::iface_name(info), info.ifindex))
                    .collect()
            })
            .unwrap_or_default();
        for iface in tc_netlink {
            let by_name = ifindex(&iface).ok();
            let index = [recorded.get(&iface).copied(), by_name]
                .into_iter()
                .flatten()
                .find(|&i| ifname(i).is_some() && find_tc_netlink(pin_dir, &iface, i).is_ok_and(|f| !f.is_empty()))
                .or(by_name);
            removed += remove_tc_netlink(pin_dir, &iface, index)?;
        }
        for entry in fs::read_dir(&links)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            debug!("removed link pin {}", path.display());
            removed += 1;
        }
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for name in maps::ALL {
        let path = pin_dir.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
    }
    let lock = pin_dir.join(crate::datapath::install::LOCK_DIR);
    if lock.exists() {
        fs::remove_dir(&lock).with_context(|| format!("removing {}", lock.display()))?;
    }
    fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "removing {} (it holds files netwatch did not make; left in place)",
            pin_dir.display()
        )
    })?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_have_no_dot_and_name_their_interface() {
        let pin = link_pin(Path::new("/sys/fs/bpf/netwatch"), TC_NL, "eth0.100");
        assert_eq!(pin, Path::new("/sys/fs/bpf/netwatch/links/tcnl_eth0:100"));
        let name = pin.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_link_pin(name), Some((TC_NL, "eth0.100".to_string())));
        assert_eq!(parse_link_pin("tc_wg_home"), Some(("tc", "wg_home".to_string())));
        assert_eq!(
            parse_link_pin("tcqdisc_br-lan"),
            Some((TC_NL_QDISC, "br-lan".to_string()))
        );
    }
}
