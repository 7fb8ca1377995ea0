//! Project tasks: `cargo xtask setup | run | test`.
//!
//! `setup` makes a fresh machine ready (rust-src for the nightly,
//! bpf-linker built against the nightly's own LLVM into `.tools/`, the
//! Debian packages the tests drive); `run` and `test` call it first, so
//! the README's two commands work on a fresh machine.

mod deb;
mod kernel;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing netwatch needs (idempotent).
    Setup,
    /// Build netwatch (release) and run it. Without arguments it runs the
    /// namespace lab demo (`netwatch lab`); otherwise the arguments are
    /// passed to netwatch, e.g. `cargo xtask run -- run --iface eth0:wan`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The packet fuzzer, longer than CI's million frames: every frame runs
    /// through the attached programs and is checked against the reference
    /// classifier.
    Fuzz {
        /// Frames to feed.
        #[arg(long, default_value_t = 20_000_000)]
        frames: u64,
        /// Seed (a failing run prints the one that reproduces it).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Redraw the README's charts (docs/img/*.png) from the dashboard's
    /// queries against a real Prometheus scraping a real netwatch run
    /// (about 80 s).
    Charts,
    /// cargo clippy -D warnings on the host crates and on the eBPF crate
    /// (for its BPF target).
    Lint,
    /// Benchmarks: per-packet cost, flood drop rate, controller at scale,
    /// time to flag, each beside its baselines. `--quick` is the small
    /// version CI runs; part names (`cost`, `flood`, `scale`) select parts.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package target/debian/netwatch_*.deb (cargo-deb,
    /// installed into .tools/). `--test` builds it as two versions and
    /// checks install, upgrade and purge with dpkg in a throwaway Debian
    /// root (see xtask/src/deb.rs).
    Deb {
        /// Package version, with revision (default: the crate's, `-1`).
        #[arg(long, value_name = "VERSION", conflicts_with = "test")]
        deb_version: Option<String>,
        #[arg(long)]
        test: bool,
    },
    /// Run every test: unit tests, BPF program tests and namespace tests.
    /// Extra arguments go to cargo-nextest (e.g. a test name filter).
    /// Needs root (BPF, network namespaces): without it, it refuses to
    /// run unless given `--allow-skip`.
    Test {
        /// Without root, run anyway: the tests that need root skip, and
        /// the run ends with how many did and which.
        #[arg(long)]
        allow_skip: bool,
        /// Run inside this Debian kernel (e.g. 6.1, 6.12) booted under
        /// qemu instead of the running one: the test binaries named by
        /// `--suites`, with ARGS as test name filters.
        #[arg(long, value_name = "VERSION")]
        kernel: Option<String>,
        /// Test binaries a `--kernel` run takes.
        #[arg(long, value_name = "LIST", default_value = kernel::DEFAULT_SUITES, requires = "kernel")]
        suites: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::setup(&root),
        Task::Run { args } => {
            setup::setup(&root)?;
            run(&root, &args)
        }
        Task::Bench { args } => {
            setup::setup(&root)?;
            setup::ensure_debian_packages(setup::BENCH_PACKAGES)?;
            bench(&root, &args)
        }
        Task::Fuzz { frames, seed } => {
            setup::setup(&root)?;
            status(cargo(&root).args(["build", "--bin", "netwatch"]))?;
            let mut cmd = cargo(&root);
            cmd.args(["nextest", "run", "--test", "fuzz", "--no-capture"])
                .env("NETWATCH_FUZZ_FRAMES", frames.to_string())
                .env("NETWATCH_BIN", root.join("target/debug/netwatch"));
            if let Some(seed) = seed {
                cmd.env("NETWATCH_FUZZ_SEED", seed.to_string());
            }
            status(&mut cmd)
        }
        Task::Charts => {
            setup::setup(&root)?;
            status(cargo(&root).args(["build", "--bin", "netwatch", "--bin", "netwatch-charts"]))?;
            status(
                Command::new(root.join("target/debug/netwatch-charts"))
                    .env("NETWATCH_BIN", root.join("target/debug/netwatch")),
            )
        }
        Task::Deb { deb_version, test } => {
            setup::setup(&root)?;
            if test {
                deb::test(&root)
            } else {
                deb::build(&root, deb_version.as_deref()).map(drop)
            }
        }
        Task::Lint => {
            setup::setup(&root)?;
            lint(&root)
        }
        Task::Test {
            allow_skip,
            kernel,
            suites,
            args,
        } => {
            // Before setup or a build: a run that would report privileged
            // tests green without running them must not start.
            let require = std::env::var("NETWATCH_REQUIRE_PRIVILEGED").ok();
            let privileges = Privileges::decide(effective_uid(), allow_skip, require.as_deref())?;
            setup::setup(&root)?;
            match kernel {
                // The guest is root whoever runs qemu: nothing skips there.
                Some(version) => kernel::test_in_kernel(&root, &version, &suites, &args),
                None => test(&root, &args, privileges),
            }
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, failing with its name when it fails.
pub fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn run(root: &Path, args: &[String]) -> Result<()> {
    status(cargo(root).args(["build", "--release", "--bin", "netwatch"]))?;
    let bin = root.join("target/release/netwatch");
    status(Command::new(bin).args(netwatch_args(args)))
}

/// What `cargo xtask run ARGS` runs netwatch with: the lab without
/// arguments (the README's demo, tested as `netwatch lab` in e2e.rs).
fn netwatch_args(args: &[String]) -> Vec<String> {
    if args.is_empty() {
        vec!["lab".into()]
    } else {
        args.to_vec()
    }
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    status(cargo(root).args(["build", "--release", "--bin", "netwatch", "--bin", "netwatch-bench"]))?;
    status(
        Command::new(root.join("target/release/netwatch-bench"))
            .args(args)
            .env("NETWATCH_BIN", root.join("target/release/netwatch")),
    )
}

fn lint(root: &Path) -> Result<()> {
    status(cargo(root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "netwatch-ebpf",
        "--exclude",
        "netwatch-bench-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The BPF crates, for their target.
    for crate_dir in ["netwatch-ebpf", "netwatch-bench-ebpf"] {
        status(
            Command::new("cargo")
                .current_dir(root.join(crate_dir))
                .args([
                    "+nightly",
                    "clippy",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env("PATH", setup::path_with_tools(root)),
        )?;
    }
    Ok(())
}

/// How `cargo xtask test` treats the tests that need root.
#[derive(Debug, PartialEq, Eq)]
enum Privileges {
    /// Running as root: every test runs, and one that still cannot get
    /// what it needs fails (`NETWATCH_REQUIRE_PRIVILEGED=1`).
    Required,
    /// Not root and `--allow-skip`: privileged tests skip, and the run
    /// reports how many and which.
    SkipAllowed,
}

impl Privileges {
    fn decide(euid: u32, allow_skip: bool, require_env: Option<&str>) -> Result<Self> {
        if euid == 0 {
            return Ok(Privileges::Required);
        }
        if allow_skip && require_env == Some("1") {
            bail!("--allow-skip contradicts NETWATCH_REQUIRE_PRIVILEGED=1");
        }
        if allow_skip {
            return Ok(Privileges::SkipAllowed);
        }
        bail!(
            "cargo xtask test needs root (uid 0; this is uid {euid}): most tests load BPF programs and make network \
             namespaces, and without root they would skip and be reported as passed. Run it as root \
             (e.g. `sudo -E cargo xtask test`), or `cargo xtask test --allow-skip` to run what can run \
             and be told what was skipped."
        )
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn test(root: &Path, args: &[String], privileges: Privileges) -> Result<()> {
    // The namespace tests drive the real binary.
    status(cargo(root).args(["build", "--bin", "netwatch"]))?;
    let bin = root.join("target/debug/netwatch");
    let nextest = cargo(root)
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut cmd = cargo(root);
    if nextest {
        // Default members: the eBPF crate only builds for its BPF target.
        cmd.args(["nextest", "run", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--no-fail-fast"]);
    }
    cmd.args(args).env("NETWATCH_BIN", &bin);
    if !nextest {
        // Kernel state (namespaces, pins) is shared: one test at a time.
        cmd.args(["--", "--test-threads=1"]);
    }
    match privileges {
        Privileges::Required => status(cmd.env("NETWATCH_REQUIRE_PRIVILEGED", "1")),
        Privileges::SkipAllowed => {
            // Each test that skips appends its name here (tests/src/lib.rs).
            let log = std::env::temp_dir().join(format!("netwatch-skipped-{}", std::process::id()));
            let _ = std::fs::remove_file(&log);
            let result = status(cmd.env("NETWATCH_SKIP_LOG", &log));
            let skipped = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            let names: Vec<&str> = skipped.lines().collect();
            eprintln!(
                "\n{} tests needing root were SKIPPED, not run (--allow-skip):\n  {}",
                names.len(),
                names.join("\n  ")
            );
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Privileges, netwatch_args};

    #[test]
    fn xtask_run_runs_the_lab_without_arguments() {
        assert_eq!(netwatch_args(&[]), ["lab"]);
        let args: Vec<String> = ["run", "--iface", "eth0:wan"].map(String::from).into();
        assert_eq!(netwatch_args(&args), args);
    }

    #[test]
    fn the_test_suite_refuses_to_skip_unless_told() {
        assert_eq!(Privileges::decide(0, false, None).unwrap(), Privileges::Required);
        assert_eq!(Privileges::decide(0, true, Some("1")).unwrap(), Privileges::Required);
        let err = Privileges::decide(65534, false, None).unwrap_err().to_string();
        assert!(err.contains("needs root") && err.contains("--allow-skip"), "{err}");
        assert!(Privileges::decide(1000, false, Some("1")).is_err());
        assert_eq!(Privileges::decide(65534, true, None).unwrap(), Privileges::SkipAllowed);
        assert!(Privileges::decide(65534, true, Some("1")).is_err());
    }
}
