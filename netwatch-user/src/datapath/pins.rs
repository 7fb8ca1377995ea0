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

/// Refuses a bpffs that only this process's mount namespace has: under
/// `ip netns exec` (which gives the process a fresh /sys without the
/// host's bpffs) the one found or mounted at /sys/fs/bpf dies with the
/// process, so pins would not survive a restart and no other shell would
/// see them. A bpffs is shared when PID 1's mount namespace has a bpf
/// mount of the same file system (device); a service's own mount
/// namespace (systemd's ProtectSystem=) sees the host's, so it passes.
pub fn refuse_private_bpffs(pin_dir: &Path) -> Result<()> {
    let bpffs = pin_dir.parent().unwrap_or(Path::new("/"));
    // The pin directory (made by now) is on the bpffs, or is one.
    if bpffs_is_private(pin_dir) == Some(true) {
        bail!(
            "the BPF filesystem at {} is private to this process's mount namespace (as under `ip netns exec`, which \
             mounts a fresh /sys): pins in {} would vanish when netwatch exits, counters would restart from zero and \
             `netwatch status` from another shell would not find them. Enter only the network namespace instead \
             (`nsenter --net=/run/netns/NS netwatch run ...`), or give --pin-dir (pin_dir) on a bpffs the host shares, \
             e.g. after `mount --bind /sys/fs/bpf /run/netwatch-bpf` on the host: --pin-dir /run/netwatch-bpf/netwatch \
             (--allow-private-bpffs runs anyway, for a throwaway set-up)",
            bpffs.display(),
            pin_dir.display()
        );
    }
    Ok(())
}

/// `Some(true)` when the bpffs holding `path` is not mounted anywhere in
/// PID 1's mount namespace; `None` when that cannot be told (no access to
/// PID 1's mounts).
fn bpffs_is_private(path: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    // PID 1's mounts, not its namespace link (reading that needs ptrace
    // access, which a container may not grant): in the same namespace
    // the bpffs is among them.
    let dev = fs::metadata(path).ok()?.dev();
    let device = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let mounts = fs::read_to_string("/proc/1/mountinfo").ok()?;
    Some(!mounts.lines().any(|line| is_bpf_mount_of(line, &device)))
}

/// Whether a /proc/PID/mountinfo line is a bpf mount of `device`
/// (`major:minor`).
fn is_bpf_mount_of(line: &str, device: &str) -> bool {
    line.split_whitespace().nth(2) == Some(device)
        && line
            .split_once(" - ")
            .is_some_and(|(_, fs)| fs.split_whitespace().next() == Some("bpf"))
}

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
    match try_lock_pin_dir(pin_dir)? {
        Some(lock) => Ok(lock),
        None => bail!(
            "another `netwatch run` is using {}; stop it first, or give this one its own --pin-dir",
            pin_dir.display()
        ),
    }
}

/// The lock `run` holds on the pin directory, or `None` while a `run`
/// holds it: `detach` takes it too, so it never unpins the maps under a
/// live controller.
pub fn try_lock_pin_dir(pin_dir: &Path) -> Result<Option<PinDirLock>> {
    let dir = fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    match dir.try_lock() {
        Ok(()) => Ok(Some(PinDirLock { _file: dir })),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", pin_dir.display())),
    }
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

#[cfg(test)]
mod tests {
    use super::is_bpf_mount_of;

    #[test]
    fn bpf_mounts_are_told_by_device_and_type() {
        let line = "40 23 0:34 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:18 - bpf bpf rw,mode=700";
        assert!(is_bpf_mount_of(line, "0:34"));
        assert!(!is_bpf_mount_of(line, "0:35"));
        let sysfs = "23 29 0:34 / /sys rw,nosuid shared:7 - sysfs sysfs rw";
        assert!(!is_bpf_mount_of(sysfs, "0:34"));
    }
}
