//! The datapath as `run` drives it: [`Datapath::open`] takes the pin
//! directory and opens the maps once, [`Datapath::apply`] writes a policy,
//! [`Datapath::attach`] attaches every interface,
//! [`Datapath::follow_links`] keeps them attached as interfaces come, go
//! and change names, and [`Datapath::detach`] or
//! [`Datapath::leave_attached`] ends it.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{error, info, warn};
use netwatch_common::{ATTACHED_TC, ATTACHED_XDP, Direction, LinkKind};

use super::{
    attach::{Attachments, XdpAttachMode},
    iface::{ifindex, ifname},
    install,
    load::load_instance,
    maps::PinnedMaps,
    pins::{PinDirLock, lock_pin_dir, prepare_pin_dir, refuse_private_bpffs},
    slots::{self, claim_iface_slot, kernel_names, mark_all_detached, mark_attached, set_kernel_name, update_iface},
    tc::{TcAttach, TcPath},
};
use crate::policy::{IfaceSpec, Policy, Role};

/// How long a failed attach to an interface waits before it is tried
/// again on the same interface (a new interface of the name is tried at
/// once).
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// An interface the configuration names, and its hooks, as `run` keeps
/// them attached.
struct Followed {
    name: String,
    slot: u32,
    role: Role,
    xdp: bool,
    tc: bool,
    /// The last failed attach: the interface's index and when.
    failed: Option<(u32, Instant)>,
}

impl Followed {
    fn hooks(&self) -> u8 {
        (if self.xdp { ATTACHED_XDP } else { 0 }) | if self.tc { ATTACHED_TC } else { 0 }
    }
}

/// Why a followed interface is attached again.
#[derive(Clone, Copy)]
enum Again {
    /// It was gone and an interface of its name is there (again).
    Recreated,
    /// A new interface took the name of one that was renamed away.
    Replaced,
    /// Where it was, with a hook missing (an earlier attach failed).
    Missing,
}

/// The pin directory held (locked) by this controller, its maps opened
/// once, and the programs it attached.
pub struct Datapath {
    maps: PinnedMaps,
    attachments: Attachments,
    followed: Vec<Followed>,
    tc_attach: TcAttach,
    xdp_generic: bool,
    _lock: PinDirLock,
}

impl Datapath {
    /// Prepares the pin directory (bpffs, permissions, layout), locks it
    /// against a second `run`, creates or re-opens the pinned maps and
    /// opens them.
    ///
    /// A bpffs private to this mount namespace (`ip netns exec`) is
    /// refused unless `allow_private_bpffs`.
    pub fn open(pin_dir: &Path, allow_private_bpffs: bool) -> Result<Self> {
        prepare_pin_dir(pin_dir)?;
        if !allow_private_bpffs {
            refuse_private_bpffs(pin_dir)?;
        }
        let lock = lock_pin_dir(pin_dir)?;
        // Loading an instance creates (or re-opens) the pinned maps.
        drop(load_instance(pin_dir, 0, Direction::Inbound, LinkKind::Ethernet)?);
        Ok(Self {
            maps: PinnedMaps::open(pin_dir)?,
            attachments: Attachments::new(pin_dir),
            followed: Vec::new(),
            tc_attach: TcAttach::default(),
            xdp_generic: false,
            _lock: lock,
        })
    }

    /// The opened maps; clones share them.
    pub fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    /// Writes `policy` as a new version and puts it in force.
    pub fn apply(&self, policy: &Policy) -> Result<()> {
        install::apply_policy(&self.maps, policy)
    }

    /// Attaches XDP to every interface of `interfaces` and TC egress to
    /// every one of `egress`. On an error, what was attached is detached
    /// again. `tc_attach` and `xdp_generic` hold for the interfaces
    /// [`Datapath::follow_links`] attaches again too.
    pub fn attach(
        &mut self,
        interfaces: &[IfaceSpec],
        egress: &[String],
        tc_attach: TcAttach,
        xdp_generic: bool,
    ) -> Result<()> {
        self.tc_attach = tc_attach;
        self.xdp_generic = xdp_generic;
        let attached = self.attach_all(interfaces, egress);
        if attached.is_err() {
            let made = std::mem::replace(&mut self.attachments, Attachments::new(self.maps.dir()));
            made.detach();
            self.followed.clear();
            let _ = mark_all_detached(&self.maps);
        }
        attached
    }

    fn attach_all(&mut self, interfaces: &[IfaceSpec], egress: &[String]) -> Result<()> {
        slots::clear_configured(&self.maps)?;
        let wanted = interfaces
            .iter()
            .map(|i| (i.name.as_str(), i.role, true, egress.contains(&i.name)))
            .chain(
                egress
                    .iter()
                    .filter(|e| !interfaces.iter().any(|i| &i.name == *e))
                    .map(|e| (e.as_str(), Role::Host, false, true)),
            );
        for (name, role, xdp, tc) in wanted {
            let index = ifindex(name)?;
            let mut followed = Followed {
                name: name.to_string(),
                slot: 0,
                role,
                xdp,
                tc,
                failed: None,
            };
            followed.slot = claim_iface_slot(&self.maps, name, role, index, followed.hooks())?;
            let settings = self.settings();
            let (mode, path) = attach_hooks(&mut self.attachments, &self.maps, &followed, settings, index)?;
            match mode {
                Some(mode) => info!(
                    "{name}: role {}, XDP {}{}",
                    role.label(),
                    match mode {
                        Some(XdpAttachMode::Native) => "native",
                        Some(XdpAttachMode::Generic) => "generic",
                        None => "re-adopted",
                    },
                    path.map(|path| format!(", TC egress ({path})")).unwrap_or_default()
                ),
                None => info!("{name}: TC egress ({})", path.map_or("none", TcPath::label)),
            }
            self.followed.push(followed);
        }
        Ok(())
    }

    fn settings(&self) -> (TcAttach, bool) {
        (self.tc_attach, self.xdp_generic)
    }

    /// Brings what is attached in line with the interfaces as the kernel
    /// has them now; `run` calls it after link notifications (`deleted`:
    /// the indexes of interfaces deleted since the last call) and every
    /// few seconds. For each configured interface:
    ///
    /// - gone (deleted, or moved to another network namespace): marked
    ///   detached and its pins removed; its counters stay in its slot;
    /// - renamed (its index still there under another name): the kernel
    ///   keeps its programs on the index, so it stays attached, counted
    ///   under the configured name; the kernel's name is recorded for
    ///   `status`;
    /// - an interface of the configured name that is not the one attached
    ///   (re-created, or a new one after a rename): the configuration
    ///   names interfaces by name, so the hooks are detached from the old
    ///   one and attached to it afresh, in the same slot, counters kept,
    ///   with the same XDP mode logic and TC egress path as at start.
    pub fn follow_links(&mut self, deleted: &HashSet<u32>) -> Result<()> {
        let infos: HashMap<u32, _> = self.maps.iface_slots()?.into_iter().collect();
        let recorded = kernel_names(&self.maps);
        let configured: HashSet<String> = self.followed.iter().map(|f| f.name.clone()).collect();
        let mut again = Vec::new();
        for (i, f) in self.followed.iter().enumerate() {
            let Some(info) = infos.get(&f.slot) else { continue };
            let (name, old) = (f.name.as_str(), info.ifindex);
            let now = ifindex(name).ok();
            if info.attached == 0 {
                if now.is_some() {
                    again.push((i, Again::Recreated));
                }
                continue;
            }
            let alive = !deleted.contains(&old);
            let old_name = alive.then(|| ifname(old)).flatten();
            let was = recorded.get(f.slot as usize).cloned().flatten();
            match (now, old_name) {
                (Some(index), Some(_)) if index == old => {
                    if let Some(was) = was {
                        info!("{name}: renamed back from {was} (ifindex {old})");
                        set_kernel_name(&self.maps, f.slot, None)?;
                    }
                    if info.attached & f.hooks() != f.hooks() {
                        again.push((i, Again::Missing));
                    }
                }
                (None, Some(current)) if !configured.contains(&current) => {
                    if was.as_deref() != Some(current.as_str()) {
                        info!(
                            "{name}: renamed to {current} (ifindex {old}); its programs stay attached there, counted \
                             as {name}"
                        );
                        set_kernel_name(&self.maps, f.slot, Some(&current))?;
                    }
                }
                (now, Some(current)) => {
                    match now {
                        Some(index) => info!(
                            "{name}: a new interface took the configured name (ifindex {index}); detaching from \
                             ifindex {old} (now {current})"
                        ),
                        None => warn!(
                            "{name}: renamed to {current}, the name the configuration gives another interface; \
                             detaching from ifindex {old}"
                        ),
                    }
                    if let Err(err) = self.attachments.release(name, Some(old)) {
                        warn!("{name}: detaching from ifindex {old}: {err:#}");
                    }
                    update_iface(&self.maps, f.slot, |info| info.attached = 0)?;
                    set_kernel_name(&self.maps, f.slot, None)?;
                    if now.is_some() {
                        again.push((i, Again::Replaced));
                    }
                }
                (now, None) => {
                    warn!(
                        "interface {name} disappeared while attached (ifindex {old}): its programs are gone, its \
                         counters are kept; it is attached again when an interface of that name appears"
                    );
                    if let Err(err) = self.attachments.release(name, None) {
                        warn!("{name}: removing the pins of its programs: {err:#}");
                    }
                    update_iface(&self.maps, f.slot, |info| info.attached = 0)?;
                    set_kernel_name(&self.maps, f.slot, None)?;
                    if now.is_some() {
                        again.push((i, Again::Recreated));
                    }
                }
            }
        }
        // After every release: an interface renamed to another one's
        // configured name has let go of it by now.
        for (i, why) in again {
            let Ok(index) = ifindex(&self.followed[i].name) else {
                continue;
            };
            if let Some((at, when)) = self.followed[i].failed
                && at == index
                && when.elapsed() < RETRY_AFTER
            {
                continue;
            }
            let settings = self.settings();
            let f = &self.followed[i];
            let old = infos.get(&f.slot).map_or(0, |info| info.ifindex);
            let attached = attach_hooks(&mut self.attachments, &self.maps, f, settings, index);
            let f = &mut self.followed[i];
            let name = &f.name;
            match attached {
                Ok((xdp, tc)) => {
                    f.failed = None;
                    let what = describe(xdp, tc);
                    match why {
                        Again::Recreated => info!("{name}: re-created (ifindex {old} -> {index}), {what} re-attached"),
                        Again::Replaced => info!("{name}: replaced (ifindex {old} -> {index}), {what} re-attached"),
                        Again::Missing => info!("{name}: {what} re-attached (ifindex {index})"),
                    }
                }
                Err(err) => {
                    f.failed = Some((index, Instant::now()));
                    error!(
                        "{name}: attaching to the interface of that name (ifindex {index}) failed, tried again in {} \
                         s: {err:#}",
                        RETRY_AFTER.as_secs()
                    );
                }
            }
        }
        Ok(())
    }

    /// Detaches every program this controller attached; the maps stay
    /// pinned, so counters continue next run.
    pub fn detach(self) -> Result<()> {
        self.attachments.detach();
        mark_all_detached(&self.maps)
    }

    /// Leaves the programs attached (`keep_attached`): the next `run`
    /// re-adopts them, `netwatch detach` removes them.
    pub fn leave_attached(self) {
        std::mem::forget(self.attachments);
    }
}

/// Attaches the hooks `f` asks for to the interface of its name, whose
/// index is `index`, and records them (and the index, once a hook is on
/// it) in its slot. `settings`: how TC egress attaches and whether XDP
/// skips native mode.
fn attach_hooks(
    attachments: &mut Attachments,
    maps: &PinnedMaps,
    f: &Followed,
    (tc_attach, xdp_generic): (TcAttach, bool),
    index: u32,
) -> Result<(Option<Option<XdpAttachMode>>, Option<TcPath>)> {
    let mut xdp = None;
    if f.xdp {
        let mode = attachments.attach_xdp(&f.name, f.slot, f.role.xdp_direction(), xdp_generic)?;
        update_iface(maps, f.slot, |info| info.ifindex = index)?;
        mark_attached(maps, f.slot, Some(mode), None)?;
        xdp = Some(mode);
    }
    let mut tc = None;
    if f.tc {
        let path = attachments.attach_tc_egress(&f.name, f.slot, tc_attach)?;
        update_iface(maps, f.slot, |info| info.ifindex = index)?;
        mark_attached(maps, f.slot, None, Some(path))?;
        tc = Some(path);
    }
    Ok((xdp, tc))
}

/// What was attached, for the log: `XDP native and TC egress (tcx)`.
fn describe(xdp: Option<Option<XdpAttachMode>>, tc: Option<TcPath>) -> String {
    let xdp = xdp.map(|mode| match mode {
        Some(XdpAttachMode::Native) => "XDP native".to_string(),
        Some(XdpAttachMode::Generic) => "XDP generic".to_string(),
        None => "XDP (re-adopted)".to_string(),
    });
    let tc = tc.map(|path| format!("TC egress ({path})"));
    xdp.into_iter().chain(tc).collect::<Vec<_>>().join(" and ")
}
