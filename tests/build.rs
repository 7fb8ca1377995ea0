//! Builds the benchmark's own eBPF crate (`netwatch-bench-ebpf`: the
//! live-frames traffic generator and a bare XDP_DROP) for
//! bpfel-unknown-none, as netwatch-user/build.rs builds the product's;
//! the object is embedded in the benchmark (`bench::programs`).

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
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

    let dir = workspace.join("netwatch-bench-ebpf");
    let bench = Package {
        name: "netwatch-bench-ebpf",
        root_dir: dir.to_str().context("non-UTF-8 path")?,
        ..Default::default()
    };
    aya_build::build_ebpf([bench], Toolchain::default())
}

fn which_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.exists())
}
