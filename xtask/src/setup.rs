//! `cargo xtask setup`: everything a fresh machine lacks, idempotently.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::status;

/// bpf-linker release known to build here; its `llvm-N` features must
/// include the nightly's LLVM major version.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURES: &[u32] = &[21, 22, 23];

/// Debian packages the tests and the lab drive: real NetBIOS clients and
/// scanners, a port scanner, iproute2 for namespaces, promtool, NATS.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "nbtscan",
    "samba-common-bin",
    "nmap",
    "prometheus",
    // The fuzz and hardening tests find attached programs with it.
    "bpftool",
    // The font the README charts are drawn with.
    "fonts-dejavu-core",
    // The differential test's corpus is built by scapy in a venv.
    "python3-venv",
    // The unit test of the systemd unit: its system call filter's groups
    // (systemd-analyze syscall-filter) applied with libseccomp.
    "systemd",
    "python3-seccomp",
    // The package test (`cargo xtask deb --test`): a minimal Debian root
    // to install into, and man/groff to render the man pages.
    "debootstrap",
    "man-db",
    // The fleet tests start their own NATS JetStream servers.
    "nats-server",
];

/// The packet library that builds the differential test's corpus
/// (tests/corpus/evasion.py), installed from PyPI into `.tools/venv`.
const SCAPY_VERSION: &str = "2.8.0";

/// What the benchmarks compare netwatch with.
pub const BENCH_PACKAGES: &[&str] = &["xdp-tools", "nftables", "iptables"];

pub fn setup(root: &Path) -> Result<()> {
    let nightly = nightly_info()?;
    ensure_rust_src(&nightly)?;
    ensure_bpf_linker(root, &nightly)?;
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    ensure_scapy(root)?;
    crate::deb::ensure_cargo_deb(root)?;
    Ok(())
}

/// A venv at `.tools/venv` with scapy, unless it is there already.
fn ensure_scapy(root: &Path) -> Result<()> {
    let venv = root.join(".tools/venv");
    let python = venv.join("bin/python");
    let has_scapy = || {
        Command::new(&python)
            .args([
                "-c",
                &format!("import importlib.metadata as m, sys; sys.exit(m.version('scapy') != '{SCAPY_VERSION}')"),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if has_scapy() {
        return Ok(());
    }
    if !python.exists() {
        println!("setup: creating {}", venv.display());
        status(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    println!("setup: installing scapy {SCAPY_VERSION} into {}", venv.display());
    status(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .arg(format!("scapy=={SCAPY_VERSION}")),
    )?;
    if !has_scapy() {
        bail!(
            "scapy {SCAPY_VERSION} is still missing from {} after pip install",
            venv.display()
        );
    }
    Ok(())
}

/// PATH with the project's tools folder first.
pub fn path_with_tools(root: &Path) -> std::ffi::OsString {
    let mut paths = vec![root.join(".tools/bin")];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(paths).expect("PATH")
}

struct Nightly {
    /// e.g. `1.97.0-nightly`
    release: String,
    llvm_major: u32,
    sysroot: PathBuf,
}

fn nightly_info() -> Result<Nightly> {
    let out = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .context("running `rustc +nightly -vV`")?;
    if !out.status.success() {
        bail!(
            "the nightly Rust toolchain is missing (`rustc +nightly -vV` failed: {}).\n\
             The eBPF side is built with nightly (-Z build-std); install it with `rustup toolchain install nightly`.",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .with_context(|| format!("`rustc +nightly -vV` printed no {name:?} line"))
    };
    let release = field("release:")?;
    let llvm = field("LLVM version:")?;
    let llvm_major: u32 = llvm
        .split('.')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("LLVM version {llvm:?}"))?;
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim());
    Ok(Nightly {
        release,
        llvm_major,
        sysroot,
    })
}

fn ensure_rust_src(nightly: &Nightly) -> Result<()> {
    if nightly.sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Builds bpf-linker into `.tools/bin`, linked against the nightly's own
/// libLLVM (through a prefix of symlinks), unless the right one is there.
fn ensure_bpf_linker(root: &Path, nightly: &Nightly) -> Result<()> {
    let tools = root.join(".tools");
    let stamp = tools.join("bpf-linker.stamp");
    let want = format!(
        "bpf-linker {BPF_LINKER_VERSION} for rustc {} (LLVM {})",
        nightly.release, nightly.llvm_major
    );
    let linker = tools.join("bin/bpf-linker");
    if linker.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        let works = Command::new(&linker)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if works {
            return Ok(());
        }
    }
    if !BPF_LINKER_LLVM_FEATURES.contains(&nightly.llvm_major) {
        bail!(
            "the nightly toolchain ({}) uses LLVM {}, but bpf-linker {BPF_LINKER_VERSION} only has features for LLVM {:?}; \
             a nightly built on one of those is needed",
            nightly.release,
            nightly.llvm_major,
            BPF_LINKER_LLVM_FEATURES
        );
    }
    let lib_dir = nightly.sysroot.join("lib");
    let libllvm = fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {} (the nightly's own LLVM)", lib_dir.display()))?;
    let prefix = tools.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".into(), libllvm.file_name().unwrap().to_os_string()] {
        let link = prefix_lib.join(&name);
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    );
    status(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--force", "--no-default-features"])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--features", &format!("llvm-{}", nightly.llvm_major)])
            .arg("--root")
            .arg(&tools)
            .env("LLVM_PREFIX", &prefix)
            // The stable toolchain builds the linker itself.
            .env_remove("RUSTUP_TOOLCHAIN"),
    )?;
    fs::write(&stamp, want)?;
    Ok(())
}

pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
