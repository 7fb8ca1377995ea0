//! The handle on the pinned maps, for the controller and the query
//! commands.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, LpmTrie, Map, MapData, PerCpuArray};
use netwatch_common::{
    Counter, IfaceInfo, ListEntry, MAX_IFACES, MAX_RULES, PortRule, PortRules, RuleInfo, Settings, maps,
};

use super::pins::{check_pinned_layout, ensure_accessible};

/// Handle on the pinned maps, for the controller and the query commands.
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// Opens the pin directory of a netwatch that has run at least once.
    pub fn open(dir: &Path) -> Result<Self> {
        ensure_accessible(dir)?;
        if !dir.join(maps::SETTINGS).exists() {
            bail!(
                "no netwatch state in {}: is `netwatch run` running (or did it ever run) with this --pin-dir?",
                dir.display()
            );
        }
        check_pinned_layout(dir)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map_by_name(&self, name: &str) -> Result<Map> {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
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
    pub fn counter_sum(map: &PerCpuArray<MapData, Counter>, index: u32) -> Result<Counter> {
        let values = map.get(&index, 0)?;
        Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }
}
