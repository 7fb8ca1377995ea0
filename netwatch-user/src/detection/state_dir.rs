//! The state directory (`state_dir`): netwatch owns it or refuses it.
//!
//! The incident database lives in a directory of its own, mode 0700.
//! netwatch creates that directory when it does not exist; one that does
//! exist must already be what netwatch would have made — owned by the
//! user netwatch runs as, mode 0700 (as systemd's `StateDirectoryMode=0700`
//! makes `/var/lib/netwatch`) — or `run` refuses it, naming it. netwatch
//! never changes the permissions of a directory it did not create, so
//! `--state-dir /tmp` or `state_dir = "/var/lib"` cannot break the host.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Result, bail};

/// Checks `dir` before `run` opens the incident database in it (see the
/// module's documentation).
pub fn check_state_dir(dir: &Path) -> Result<()> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        // netwatch creates it, mode 0700.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("state directory {} (state_dir, --state-dir): {e}", dir.display()),
    };
    let hint = "netwatch keeps its incident database in a directory of its own and never changes the permissions of \
                one it did not create: name a directory that does not exist yet (netwatch creates it, mode 0700), \
                e.g. /var/lib/netwatch, or make it with `install -d -m 0700 DIR`";
    if !meta.is_dir() {
        bail!(
            "state directory {} (state_dir, --state-dir) is not a directory",
            dir.display()
        );
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        bail!(
            "state directory {} (state_dir, --state-dir) is owned by uid {}, not by the user netwatch runs as (uid {euid}); {hint}",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o700 {
        bail!(
            "state directory {} (state_dir, --state-dir) has mode {mode:04o}{}, not 0700; {hint}",
            dir.display(),
            if mode & 0o002 != 0 { " (world-writable)" } else { "" }
        );
    }
    Ok(())
}
