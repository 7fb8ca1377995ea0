//! Loading the eBPF object: one instance per attachment, its maps bound
//! to the pins and its per-attachment constants set. Every program
//! instance the controller creates is loaded here.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader};
use netwatch_common::{Direction, LinkKind, globals, maps};

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch"));

pub const XDP_PROGRAM: &str = "netwatch_xdp";
pub const TC_PROGRAM: &str = "netwatch_tc";

/// Loads one instance of the object with its maps bound to the pins in
/// `pin_dir` (created there if missing) and its globals set.
pub fn load_instance(pin_dir: &Path, iface_slot: u32, direction: Direction, link: LinkKind) -> Result<Ebpf> {
    let paths: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, pin_dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let direction = u8::from(direction);
    let link = u32::from(link);
    loader
        .override_global(globals::IFACE_SLOT, &iface_slot, true)
        .override_global(globals::DIRECTION, &direction, true)
        .override_global(globals::LINK_KIND, &link, true);
    loader.load(EBPF_OBJECT).with_context(|| {
        format!(
            "loading the netwatch eBPF object with maps pinned in {}",
            pin_dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use netwatch_common::maps;

    use super::EBPF_OBJECT;

    /// Every map the kernel object declares is one the controller pins
    /// (`maps::ALL`), and the other way round: a map left off the list
    /// would not be shared, each attachment silently getting its own copy.
    #[test]
    fn the_object_declares_exactly_the_maps_the_controller_pins() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the built eBPF object parses");
        let declared: BTreeSet<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            // The loader's own sections for global data, not maps of ours.
            .filter(|name| !name.starts_with('.'))
            .collect();
        let pinned: BTreeSet<&str> = maps::ALL.into_iter().collect();
        assert_eq!(declared, pinned, "maps in the object vs netwatch_common::maps::ALL");
        assert_eq!(pinned.len(), maps::ALL.len(), "a name listed twice in maps::ALL");
    }
}
