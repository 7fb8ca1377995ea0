//! The handle on the pinned maps, for the controller and the query
//! commands.

use std::{
    collections::HashMap,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, LpmTrie, Map, MapData, PerCpuArray};
use netwatch_common::{
    Counter, IfaceInfo, ListEntry, MAX_IFACES, MAX_RULES, PortRule, PortRules, RuleInfo, Settings, maps,
};

use super::pins::{check_pinned_layout, ensure_accessible};

/// Handle on the pinned maps, for the controller and the query commands.
///
/// Opened once (the pin directory checked, every map opened); clones share
/// the open maps, so `run` opens it once for its main loop, the detector
/// and the HTTP endpoint, and each command once per invocation. A typed
/// map taken from it is a duplicate of the held descriptor, no path
/// lookup and no parse of the object.
#[derive(Clone)]
pub struct PinnedMaps {
    inner: Arc<Opened>,
}

struct Opened {
    dir: PathBuf,
    maps: HashMap<&'static str, MapData>,
}

impl PinnedMaps {
    /// Opens the pin directory of a netwatch that has run at least once.
    pub fn open(dir: &Path) -> Result<Self> {
        ensure_accessible(dir)?;
        ensure_state(dir)?;
        check_pinned_layout(dir)?;
        // A pin that cannot be opened now is tried again (and its error
        // reported) when it is asked for.
        let maps = maps::ALL
            .iter()
            .filter_map(|name| Some((*name, MapData::from_pin(dir.join(name)).ok()?)))
            .collect();
        Ok(Self {
            inner: Arc::new(Opened {
                dir: dir.to_path_buf(),
                maps,
            }),
        })
    }

    /// Itself while its maps are still pinned: a reader serving others
    /// (the HTTP endpoint) answers as a fresh open would once
    /// `netwatch detach` has removed the pins behind the controller's back.
    pub fn still_pinned(&self) -> Result<&Self> {
        ensure_state(self.dir())?;
        Ok(self)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn map_by_name(&self, name: &str) -> Result<Map> {
        let path = self.inner.dir.join(name);
        let data = match self.inner.maps.get(name) {
            Some(held) => {
                let fd = held
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .with_context(|| format!("duplicating the descriptor of pinned map {}", path.display()))?;
                MapData::from_fd(fd)
            }
            None => MapData::from_pin(&path),
        }
        .with_context(|| format!("opening pinned map {}", path.display()))?;
        Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
    }

    pub fn array<V: aya::Pod>(&self, name: &str) -> Result<Array<MapData, V>> {
        Ok(Array::try_from(self.map_by_name(name)?)?)
    }

    pub fn per_cpu_array<V: aya::Pod>(&self, name: &str) -> Result<PerCpuArray<MapData, V>> {
        Ok(PerCpuArray::try_from(self.map_by_name(name)?)?)
    }

    pub fn lpm<K: aya::Pod>(&self, name: &str) -> Result<LpmTrie<MapData, K, ListEntry>> {
        Ok(LpmTrie::try_from(self.map_by_name(name)?)?)
    }

    pub fn settings(&self) -> Result<Settings> {
        Ok(self.array::<Settings>(maps::SETTINGS)?.get(&0, 0)?)
    }

    /// Every interface slot that has been used (its counters persist).
    pub fn iface_slots(&self) -> Result<Vec<(u32, IfaceInfo)>> {
        let map = self.array::<IfaceInfo>(maps::IFACE_INFO)?;
        let mut out = Vec::new();
        for slot in 0..MAX_IFACES {
            let info = map.get(&slot, 0)?;
            if info.name[0] != 0 {
                out.push((slot, info));
            }
        }
        Ok(out)
    }

    /// The rule slots of the policy version in force.
    pub fn rules(&self) -> Result<Vec<(u32, RuleInfo)>> {
        let live = self.settings()?.active & 1;
        Ok(self
            .rule_slots_all()?
            .into_iter()
            .filter(|(_, info)| info.in_use & (1 << live) != 0)
            .collect())
    }

    /// The rule slots of the version in force, with the rule the datapath
    /// applies for each.
    pub fn rules_in_force(&self) -> Result<Vec<(u32, RuleInfo, PortRule)>> {
        let live = self.settings()?.active & 1;
        let port_rules = self.array::<PortRules>(maps::PORT_RULES)?;
        self.rules()?
            .into_iter()
            .map(|(slot, info)| Ok((slot, info, *port_rules.get(&info.port_rule_index(), 0)?.version(live))))
            .collect()
    }

    /// Every rule slot, used or not.
    pub fn rule_slots_all(&self) -> Result<Vec<(u32, RuleInfo)>> {
        let map = self.array::<RuleInfo>(maps::RULE_INFO)?;
        (0..MAX_RULES).map(|slot| Ok((slot, map.get(&slot, 0)?))).collect()
    }

    /// Sum over CPUs of one per-CPU counter.
    /// A datapath-wide counter of `STATS`, summed over the CPUs.
    pub fn stat(&self, index: u32) -> Result<u64> {
        let stats = self.per_cpu_array::<u64>(netwatch_common::maps::STATS)?;
        Ok(stats.get(&index, 0)?.iter().sum())
    }

    pub fn counter_sum(map: &PerCpuArray<MapData, Counter>, index: u32) -> Result<Counter> {
        let values = map.get(&index, 0)?;
        Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }
}

/// Refuses a pin directory without netwatch's maps.
fn ensure_state(dir: &Path) -> Result<()> {
    if !dir.join(maps::SETTINGS).exists() {
        bail!(
            "no netwatch state in {}: is `netwatch run` running (or did it ever run) with this --pin-dir?",
            dir.display()
        );
    }
    Ok(())
}
