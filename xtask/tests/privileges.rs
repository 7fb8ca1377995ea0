//! `cargo xtask test` without root: it refuses, before setting anything
//! up or building, rather than letting the privileged tests skip and be
//! counted as passed. Runs the built xtask binary as `nobody`.

use std::process::Command;

#[test]
fn xtask_test_refuses_to_run_without_root() {
    let xtask = env!("CARGO_BIN_EXE_xtask");
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(xtask);
        cmd
    } else {
        Command::new(xtask)
    };
    let out = cmd
        .arg("test")
        .env_remove("NETWATCH_REQUIRE_PRIVILEGED")
        .output()
        .expect("run xtask");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "xtask test ran without root:\n{stderr}");
    assert!(
        stderr.contains("cargo xtask test needs root") && stderr.contains("--allow-skip"),
        "{stderr}"
    );
    // Refused before `setup` (which prints what it installs) or a build.
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}
