//! The pin directory: on bpffs (mounted where the system has not), root
//! only, locked by the running controller, and holding maps whose layout
//! matches this build.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use log::info;
use netwatch_common::maps;

use super::load::EBPF_OBJECT;

/// Creates the pin directory with root-only permissions, or checks that
/// an existing one is on bpffs.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && parent == Path::new(BPFFS_ROOT) {
        mount_bpffs()?;
    }
    if !is_bpffs(parent) && !is_bpffs(pin_dir) {
        bail!(
            "{} is not on a BPF filesystem (bpffs); mount one with `mount -t bpf bpf {}` or choose another --pin-dir",
            parent.display(),
            parent.display()
        );
    }
    for dir in [pin_dir.to_path_buf(), pin_dir.join("links")] {
        fs::create_dir_all(&dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting permissions of {}", dir.display()))?;
    }
    check_pinned_layout(pin_dir)
}

const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf where the system has not (as bpftool does).
fn mount_bpffs() -> Result<()> {
    use nix::mount::{MsFlags, mount};
    if let Err(errno) = mount(Some("bpf"), BPFFS_ROOT, Some("bpf"), MsFlags::empty(), None::<&str>) {
        let err = std::io::Error::from(errno);
        bail!("{BPFFS_ROOT} is not a BPF filesystem and mounting one there failed: {err}");
    }
    info!("mounted bpffs at {BPFFS_ROOT}");
    Ok(())
}

/// Holds an exclusive lock on the pin directory while `run` is running,
/// so two controllers never fight over the same maps and links.
pub struct PinDirLock {
    _file: fs::File,
}

pub fn lock_pin_dir(pin_dir: &Path) -> Result<PinDirLock> {
    let dir = fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    if dir.try_lock().is_err() {
        bail!(
            "another `netwatch run` is using {}; stop it first, or give this one its own --pin-dir",
            pin_dir.display()
        );
    }
    Ok(PinDirLock { _file: dir })
}

fn is_bpffs(path: &Path) -> bool {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    statfs(path).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC)
}

/// The shape of a map: what must agree between a pin and this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapLayout {
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "key {} B, value {} B, {} entries",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Refuses pins whose layout differs from this build's maps (a foreign
/// object, or an incompatible older netwatch), instead of reading garbage.
pub(super) fn check_pinned_layout(pin_dir: &Path) -> Result<()> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| anyhow!("parsing the eBPF object: {e}"))?;
    for name in maps::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let m = object
            .maps
            .get(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        let expected = MapLayout {
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
        };
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("{} exists but is not a pinned BPF map", path.display()))?;
        let pinned = MapLayout {
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if pinned != expected {
            bail!(
                "pinned map {} has layout ({pinned}) but this netwatch expects ({expected}); it was made by another \
                 program or an incompatible netwatch version: run `netwatch detach --pin-dir {}` to remove it",
                path.display(),
                pin_dir.display()
            );
        }
    }
    Ok(())
}

/// The pin directory is root-only (0700): say so rather than "not found".
pub(super) fn ensure_accessible(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied reading {}: netwatch's pinned maps are root-only; run this as root",
            dir.display()
        ),
        _ => Ok(()),
    }
}
