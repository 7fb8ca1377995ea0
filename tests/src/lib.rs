//! Shared helpers of the netwatch tests: frame builders, a harness that
//! runs the real, verified datapath through BPF_PROG_TEST_RUN, network
//! namespaces, and the real `netwatch` binary.

pub mod bench;
pub mod daemon;
pub mod dashboard;
pub mod frames;
pub mod harness;
pub mod lab;
pub mod nats;
pub mod netns;
pub mod prometheus;
pub mod reference;

/// Whether BPF and namespaces are usable. Without them a test skips,
/// unless `NETWATCH_REQUIRE_PRIVILEGED=1` (CI), where it fails.
pub fn privileged() -> bool {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("NETWATCH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("this test needs root (BPF, network namespaces) and NETWATCH_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("skipping: needs root for BPF and network namespaces");
    // `cargo xtask test --allow-skip` collects the names of skipped tests.
    if let Some(log) = std::env::var_os("NETWATCH_SKIP_LOG") {
        use std::io::Write as _;
        let binary = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .map(|s| s.rsplit_once('-').map_or(s.clone(), |(name, _hash)| name.to_string()))
            .unwrap_or_default();
        let test = std::thread::current().name().unwrap_or("?").to_string();
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(file, "{binary}::{test}");
        }
    }
    false
}

/// Returns early from a test when it cannot run here.
#[macro_export]
macro_rules! require_privileged {
    () => {
        if !$crate::privileged() {
            return;
        }
    };
}

/// How long to wait for something the system under test does: `d`, times
/// `NETWATCH_TEST_PATIENCE` where that is set. A kernel run under qemu's
/// emulation (`cargo xtask test --kernel`) sets it: everything there,
/// verifying programs above all, takes several times longer.
pub fn patience(d: std::time::Duration) -> std::time::Duration {
    let factor = std::env::var("NETWATCH_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}

/// A name unique to this test process, for pin directories and namespaces.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "nwt{}{}{}",
        std::process::id() % 100_000,
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A pin directory of its own for one `netwatch run` of a test.
pub fn pin_dir() -> String {
    format!("/sys/fs/bpf/{}", unique("p"))
}

/// A directory of its own under the system's temp directory, removed with
/// everything in it when dropped: also when the test fails.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl TempDir {
    /// A temporary directory of mode 0700, as netwatch's state directory
    /// must be when it exists already.
    pub fn private(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = Self::new(tag);
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)).expect("chmod temp dir");
        dir
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `netwatch.toml` in a directory of its own, removed (with the
/// directory) when dropped.
pub struct ConfigFile {
    _dir: TempDir,
    path: std::path::PathBuf,
}

impl ConfigFile {
    pub fn new(text: impl AsRef<str>) -> Self {
        let dir = TempDir::new("cfg");
        let path = dir.join("netwatch.toml");
        let file = ConfigFile { _dir: dir, path };
        file.write(text.as_ref());
        file
    }

    /// Replaces the file's text (as an edit before a SIGHUP does).
    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text).expect("writing the config file");
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The path as `--config` takes it.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 temp path")
    }
}

/// What a finished command wrote to stderr.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that a command succeeded, with its stderr if it did not.
#[track_caller]
pub fn assert_success(out: &std::process::Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

/// Asserts that a command failed with `says` on its stderr; returns the
/// stderr for further checks.
#[track_caller]
pub fn assert_fails_saying(out: &std::process::Output, says: &str) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "succeeded, expected a failure saying {says:?}: {err}"
    );
    assert!(err.contains(says), "{err:?} does not say {says:?}");
    err
}
