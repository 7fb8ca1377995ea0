//! Shared by the build scripts that build an eBPF crate of this
//! workspace for bpfel-unknown-none (netwatch-user/build.rs: the
//! product's programs; tests/build.rs: the benchmark's): the nightly
//! toolchain through aya-build, with bpf-linker from the project's tools
//! folder (made by `cargo xtask setup`) or PATH.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds the eBPF crate `name` (in the workspace folder of that name);
/// aya-build puts its object in OUT_DIR.
pub fn build_ebpf_crate(name: &str) -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().context("workspace root")?;
    let tools_bin = workspace.join(".tools/bin");
    println!("cargo:rerun-if-changed={}", tools_bin.join("bpf-linker").display());
    if !tools_bin.join("bpf-linker").exists() && which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker not found in {} nor on PATH: run `cargo xtask setup` first",
            tools_bin.display()
        ));
    }
    // The nested cargo that aya-build spawns inherits this PATH.
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools_bin];
    paths.extend(env::split_paths(&path));
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", env::join_paths(paths)?) };

    let dir = workspace.join(name);
    let package = Package {
        name,
        root_dir: dir.to_str().context("non-UTF-8 path")?,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}

fn which_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.exists())
}
