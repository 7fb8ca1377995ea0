//! The datapath as `run` drives it: [`Datapath::open`] takes the pin
//! directory and opens the maps once, [`Datapath::apply`] writes a policy,
//! [`Datapath::attach`] attaches every interface, and
//! [`Datapath::detach`] or [`Datapath::leave_attached`] ends it.

use std::path::Path;

use anyhow::Result;
use log::info;
use netwatch_common::{ATTACHED_TC, ATTACHED_XDP, Direction, LinkKind};

use super::{
    attach::{Attachments, XdpAttachMode},
    iface::ifindex,
    install,
    load::load_instance,
    maps::PinnedMaps,
    pins::{PinDirLock, lock_pin_dir, prepare_pin_dir, refuse_private_bpffs},
    slots::{self, claim_iface_slot, mark_all_detached, mark_attached},
    tc::TcAttach,
};
use crate::policy::{IfaceSpec, Policy, Role};

/// The pin directory held (locked) by this controller, its maps opened
/// once, and the programs it attached.
pub struct Datapath {
    maps: PinnedMaps,
    attachments: Attachments,
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
    /// again.
    pub fn attach(
        &mut self,
        interfaces: &[IfaceSpec],
        egress: &[String],
        tc_attach: TcAttach,
        xdp_generic: bool,
    ) -> Result<()> {
        let attached = self.attach_all(interfaces, egress, tc_attach, xdp_generic);
        if attached.is_err() {
            let made = std::mem::replace(&mut self.attachments, Attachments::new(self.maps.dir()));
            made.detach();
            let _ = mark_all_detached(&self.maps);
        }
        attached
    }

    fn attach_all(
        &mut self,
        interfaces: &[IfaceSpec],
        egress: &[String],
        tc_attach: TcAttach,
        xdp_generic: bool,
    ) -> Result<()> {
        let maps = &self.maps;
        slots::clear_configured(maps)?;
        for iface in interfaces {
            let index = ifindex(&iface.name)?;
            let hooks = ATTACHED_XDP | if egress.contains(&iface.name) { ATTACHED_TC } else { 0 };
            let slot = claim_iface_slot(maps, &iface.name, iface.role, index, hooks)?;
            let mode = self
                .attachments
                .attach_xdp(&iface.name, slot, iface.role.xdp_direction(), xdp_generic)?;
            let tc = if egress.contains(&iface.name) {
                Some(self.attachments.attach_tc_egress(&iface.name, slot, tc_attach)?)
            } else {
                None
            };
            mark_attached(maps, slot, Some(mode), tc)?;
            info!(
                "{}: role {}, XDP {}{}",
                iface.name,
                iface.role.label(),
                match mode {
                    Some(XdpAttachMode::Native) => "native",
                    Some(XdpAttachMode::Generic) => "generic",
                    None => "re-adopted",
                },
                tc.map(|path| format!(", TC egress ({path})")).unwrap_or_default()
            );
        }
        for name in egress.iter().filter(|e| !interfaces.iter().any(|i| &i.name == *e)) {
            let slot = claim_iface_slot(maps, name, Role::Host, ifindex(name)?, ATTACHED_TC)?;
            let path = self.attachments.attach_tc_egress(name, slot, tc_attach)?;
            mark_attached(maps, slot, None, Some(path))?;
            info!("{name}: TC egress ({path})");
        }
        Ok(())
    }

    /// Marks interfaces that went away while attached (see
    /// [`slots::check_interfaces`]).
    pub fn check_interfaces(&self) -> Result<()> {
        slots::check_interfaces(&self.maps)
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
