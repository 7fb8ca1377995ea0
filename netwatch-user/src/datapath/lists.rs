//! The allowlist and the blocklist as the maps hold them: entries of
//! both policy versions, from the config or the command line, with their
//! ends.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use aya::{maps::lpm_trie::Key, sys::SyscallError};
use ipnet::IpNet;
use netwatch_common::{LIST_FOREVER, ListEntry, maps};

use crate::{clock::boot_secs, datapath::PinnedMaps};

/// The allowlist or the blocklist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListKind {
    Allow,
    Block,
}

impl ListKind {
    pub const ALL: [ListKind; 2] = [ListKind::Allow, ListKind::Block];

    fn maps(self) -> (&'static str, &'static str) {
        match self {
            ListKind::Allow => (maps::ALLOW_V4, maps::ALLOW_V6),
            ListKind::Block => (maps::BLOCK_V4, maps::BLOCK_V6),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ListKind::Allow => "allowlist",
            ListKind::Block => "blocklist",
        }
    }
}

/// A prefix stored in a list trie, with its answers and own entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListItem {
    pub net: IpNet,
    pub entry: ListEntry,
}

impl ListItem {
    /// This prefix's own entry in `version` at `now`: its config entry
    /// (forever) or its command-line entry, if live. `None` when the
    /// prefix is only stored to carry a wider entry's answer.
    pub fn own_until(&self, version: u32, now: u32) -> Option<u32> {
        if self.entry.config_versions & (1 << version) != 0 {
            Some(LIST_FOREVER)
        } else if self.entry.cli_until > now {
            Some(self.entry.cli_until)
        } else {
            None
        }
    }

    pub fn from_config(&self, version: u32) -> bool {
        self.entry.config_versions & (1 << version) != 0
    }
}

impl PinnedMaps {
    /// Every prefix stored in a list, expired and carried ones included.
    pub fn list(&self, kind: ListKind) -> Result<Vec<ListItem>> {
        let (v4, v6) = kind.maps();
        let mut out = Vec::new();
        for entry in self.lpm::<[u8; 4]>(v4)?.iter() {
            let (key, entry) = entry?;
            out.push(ListItem {
                net: IpNet::new(Ipv4Addr::from(key.data()).into(), key.prefix_len() as u8)?,
                entry,
            });
        }
        for entry in self.lpm::<[u8; 16]>(v6)?.iter() {
            let (key, entry) = entry?;
            out.push(ListItem {
                net: IpNet::new(Ipv6Addr::from(key.data()).into(), key.prefix_len() as u8)?,
                entry,
            });
        }
        Ok(out)
    }

    /// The entries of a list in force now: config entries of the version
    /// in force and live command-line entries, with when they end.
    pub fn list_in_force(&self, kind: ListKind) -> Result<Vec<(IpNet, Option<u32>, bool)>> {
        let version = self.settings()?.active & 1;
        let now = boot_secs();
        Ok(self
            .list(kind)?
            .into_iter()
            .filter_map(|item| {
                let config = item.from_config(version);
                item.own_until(version, now)
                    .map(|until| (item.net, (!config && until != LIST_FOREVER).then_some(until), config))
            })
            .collect())
    }

    pub(super) fn list_write(&self, kind: ListKind, net: IpNet, entry: ListEntry) -> Result<()> {
        let (v4, v6) = kind.maps();
        let result = match net {
            IpNet::V4(n) => {
                self.lpm::<[u8; 4]>(v4)?
                    .insert(&Key::new(n.prefix_len() as u32, n.network().octets()), entry, 0)
            }
            IpNet::V6(n) => {
                self.lpm::<[u8; 16]>(v6)?
                    .insert(&Key::new(n.prefix_len() as u32, n.network().octets()), entry, 0)
            }
        };
        result.with_context(|| format!("writing {net} into the {}", kind.label()))
    }

    pub(super) fn list_delete(&self, kind: ListKind, net: IpNet) -> Result<()> {
        let (v4, v6) = kind.maps();
        let result = match net {
            IpNet::V4(n) => self
                .lpm::<[u8; 4]>(v4)?
                .remove(&Key::new(n.prefix_len() as u32, n.network().octets())),
            IpNet::V6(n) => self
                .lpm::<[u8; 16]>(v6)?
                .remove(&Key::new(n.prefix_len() as u32, n.network().octets())),
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("removing {net} from the {}", kind.label())),
        }
    }
}
