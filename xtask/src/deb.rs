//! `cargo xtask deb`: the Debian package, and `--test`, its install,
//! upgrade and purge with dpkg in a throwaway Debian root.
//!
//! The package is made by cargo-deb (built from crates.io into `.tools/`
//! like bpf-linker) from the release binary, plus the man pages and shell
//! completions that binary writes from its own clap definition
//! (`netwatch generate`). The test never installs onto this machine: it
//! unpacks a cached `debootstrap --variant=minbase` root (Debian
//! packages only, made once into `.tools/`), copies it, and runs
//! `chroot ROOT dpkg ...` there; nothing is started, and the copy is
//! removed at the end.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cargo, setup, status};

/// cargo-deb release known to work here (`cargo install --locked`).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The Debian release the package test installs into.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// Installs cargo-deb into `.tools/bin`, unless that version is there.
pub fn ensure_cargo_deb(root: &Path) -> Result<PathBuf> {
    let tools = root.join(".tools");
    let bin = tools.join("bin/cargo-deb");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(bin);
    }
    println!("setup: building cargo-deb {CARGO_DEB_VERSION} into {}", tools.display());
    status(
        Command::new("cargo")
            .args(["install", "cargo-deb", "--locked", "--force"])
            .args(["--version", CARGO_DEB_VERSION])
            .arg("--root")
            .arg(&tools)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )?;
    Ok(bin)
}

/// Builds `target/debian/netwatch_VERSION_ARCH.deb` and returns its path.
/// `deb_version` overrides the package version (with revision).
pub fn build(root: &Path, deb_version: Option<&str>) -> Result<PathBuf> {
    let cargo_deb = ensure_cargo_deb(root)?;
    status(cargo(root).args(["build", "--release", "--package", "netwatch-user", "--bin", "netwatch"]))?;
    let release = root.join("target/release");
    let generated = release.join("netwatch-generated");
    let _ = fs::remove_dir_all(&generated);
    for (what, dir) in [("man", "man"), ("completions", "completions")] {
        let out = run(Command::new(release.join("netwatch"))
            .args(["generate", what])
            .arg(generated.join(dir)))?;
        ensure!(!out.is_empty(), "netwatch generate {what} wrote nothing");
    }
    // Man pages are shipped compressed (Debian policy 12.1); -n keeps the
    // archive reproducible.
    for entry in fs::read_dir(generated.join("man"))? {
        status(Command::new("gzip").args(["-9", "-n"]).arg(entry?.path()))?;
    }
    let out_dir = root.join("target/debian");
    fs::create_dir_all(&out_dir)?;
    let mut cmd = Command::new(cargo_deb);
    cmd.current_dir(root)
        .args(["--package", "netwatch-user", "--no-build", "--output"])
        .arg(&out_dir);
    if let Some(v) = deb_version {
        cmd.args(["--deb-version", v]);
    }
    let printed = run(&mut cmd)?;
    let deb = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .with_context(|| format!("cargo deb printed no .deb path: {printed}"))?;
    println!("{deb}");
    Ok(PathBuf::from(deb))
}

/// Runs a command, returning its stdout, failing with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    check(cmd, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(cmd: &Command, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A cached minimal Debian root (`.tools/debian-root/SUITE`), made once.
fn cached_root(root: &Path) -> Result<PathBuf> {
    let dir = root.join(".tools/debian-root");
    let base = dir.join(SUITE);
    let stamp = dir.join(format!("{SUITE}.stamp"));
    if stamp.exists() && base.join("usr/bin/dpkg").exists() {
        return Ok(base);
    }
    setup::ensure_debian_packages(&["debootstrap"])?;
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&dir)?;
    println!(
        "deb: debootstrap --variant=minbase {SUITE} into {} (once, about a minute)",
        base.display()
    );
    status(
        Command::new("debootstrap")
            .args(["--variant=minbase", SUITE])
            .arg(&base)
            .arg(MIRROR),
    )?;
    fs::write(&stamp, format!("debootstrap --variant=minbase {SUITE} {MIRROR}\n"))?;
    Ok(base)
}

/// A copy of the cached root, removed on drop.
struct Chroot {
    dir: PathBuf,
}

impl Drop for Chroot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Chroot {
    fn new(root: &Path) -> Result<Self> {
        let base = cached_root(root)?;
        let dir = root.join("target/debian/pkgtest-root");
        let _ = fs::remove_dir_all(&dir);
        status(Command::new("cp").arg("-a").arg(&base).arg(&dir))?;
        Ok(Chroot { dir })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    /// `chroot DIR ARGS`, in new network and mount namespaces of its own
    /// (nothing it does can see or touch this machine's interfaces or
    /// mounts), after the
    /// shell commands `setup` have run in that namespace.
    fn command(&self, setup: &str, args: &[&str]) -> Command {
        let mut script = String::from("set -e\n");
        script.push_str(setup);
        script.push_str("\nexec chroot \"$0\" \"$@\"");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .arg(&self.dir)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env_remove("NETWATCH_PIN_DIR")
        .env_remove("NETWATCH_STATE_DIR");
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        run(&mut self.command("", args))
    }

    /// Copies a file into the root's /tmp and returns its path there.
    fn put(&self, file: &Path) -> Result<String> {
        let name = file.file_name().context("file name")?.to_string_lossy().into_owned();
        fs::copy(file, self.path("/tmp").join(&name)).with_context(|| format!("copying {}", file.display()))?;
        Ok(format!("/tmp/{name}"))
    }
}

/// Builds the package twice (two versions of the same build) and checks
/// install, upgrade with a locally edited conffile, removal and purge.
pub fn test(root: &Path) -> Result<()> {
    let version = crate_version(root)?;
    let (v1, v2) = (format!("{version}-0test1"), format!("{version}-0test2"));
    // cargo-deb clears older packages from its output directory: each
    // is kept aside.
    let kept = root.join("target/debian/pkgtest-debs");
    let _ = fs::remove_dir_all(&kept);
    fs::create_dir_all(&kept)?;
    let keep = |deb: PathBuf| -> Result<PathBuf> {
        let to = kept.join(deb.file_name().context("deb file name")?);
        fs::copy(&deb, &to).with_context(|| format!("copying {}", deb.display()))?;
        Ok(to)
    };
    let old = keep(build(root, Some(&v1))?)?;
    // The same binary again, as the next version.
    let new = keep(build(root, Some(&v2))?)?;
    ensure!(old != new, "both builds wrote {}", old.display());

    check_control(&old)?;

    let chroot = Chroot::new(root)?;
    let unit = fs::read_to_string(root.join("deploy/systemd/netwatch.service"))?;
    let shipped_config = fs::read_to_string(root.join("deploy/netwatch.toml"))?;

    // Install.
    let old_in = chroot.put(&old)?;
    let out = chroot.run(&["dpkg", "-i", &old_in])?;
    ensure!(
        out.contains("not started") && out.contains("systemctl enable --now netwatch"),
        "the first install did not say how to start netwatch:\n{out}"
    );
    let installed = chroot.run(&["dpkg-query", "-W", "-f=${Status} ${Version}", "netwatch"])?;
    ensure!(
        installed == format!("install ok installed {v1}"),
        "after install: {installed}"
    );
    let printed = chroot.run(&["netwatch", "--version"])?;
    ensure!(
        printed.trim() == format!("netwatch {version}"),
        "netwatch --version printed {printed:?}"
    );
    ensure!(chroot.path("/usr/sbin/netwatch").exists(), "/usr/sbin/netwatch missing");
    ensure!(
        !chroot.path("/usr/bin/netwatch").exists(),
        "a second binary in /usr/bin"
    );
    let unit_path = [
        "/usr/lib/systemd/system/netwatch.service",
        "/lib/systemd/system/netwatch.service",
    ]
    .into_iter()
    .map(|p| chroot.path(p))
    .find(|p| p.exists())
    .context("netwatch.service is not installed")?;
    ensure!(
        fs::read_to_string(&unit_path)? == unit,
        "{} differs from deploy/systemd",
        unit_path.display()
    );
    // Installed, not enabled, not started.
    ensure!(
        !chroot
            .path("/etc/systemd/system/multi-user.target.wants/netwatch.service")
            .exists(),
        "the package enabled the service"
    );
    ensure!(
        fs::read_to_string(chroot.path("/etc/netwatch/netwatch.toml"))? == shipped_config,
        "/etc/netwatch/netwatch.toml is not deploy/netwatch.toml"
    );
    let conffiles = chroot.run(&["dpkg-query", "-W", "-f=${Conffiles}", "netwatch"])?;
    ensure!(
        conffiles.contains("/etc/netwatch/netwatch.toml"),
        "not a conffile: {conffiles}"
    );
    for doc in [
        "/usr/share/doc/netwatch/README.md",
        "/usr/share/doc/netwatch/configuration.md",
        "/usr/share/doc/netwatch/examples/netwatch.toml",
        "/usr/share/netwatch/grafana/netwatch.json",
        "/usr/share/netwatch/prometheus/netwatch.rules.yml",
    ] {
        ensure!(chroot.path(doc).is_file(), "{doc} missing");
    }
    check_man_pages(&chroot)?;
    check_completions(&chroot)?;

    // The shipped config names no interface: check-config and run refuse.
    let shipped = chroot.command("", &["netwatch", "check-config"]).output()?;
    let err = String::from_utf8_lossy(&shipped.stderr);
    ensure!(
        !shipped.status.success() && err.contains("no interface") && err.contains("/etc/netwatch/netwatch.toml"),
        "check-config of the shipped config: {} {err}",
        shipped.status
    );
    // The operator names an interface (a veth in the namespace).
    let edited = shipped_config.replace("\ninterfaces = []\n", "\ninterfaces = [\"nwpkg0:host\"]\n");
    ensure!(
        edited != shipped_config,
        "the shipped config has no `interfaces = []` line"
    );
    fs::write(chroot.path("/etc/netwatch/netwatch.toml"), &edited)?;
    let dummy = "ip link add nwpkg0 type veth peer name nwpkg1";
    let ok = run(&mut chroot.command(dummy, &["netwatch", "check-config"]))?;
    ensure!(ok.contains("OK") && ok.contains("nwpkg0:host"), "check-config: {ok}");
    // Without the interface it names the setting and the interface.
    let missing = chroot.command("", &["netwatch", "check-config"]).output()?;
    let err = String::from_utf8_lossy(&missing.stderr);
    ensure!(
        !missing.status.success() && err.contains("interfaces") && err.contains("nwpkg0"),
        "check-config without the interface: {err}"
    );
    ensure!(
        run(&mut chroot.command("", &["netwatch", "check-config", "--offline"]))?.contains("OK"),
        "check-config --offline"
    );

    // Upgrade: the local edit stays, the version changes, the package
    // still is not enabled.
    fs::create_dir_all(chroot.path("/var/lib/netwatch"))?;
    fs::write(chroot.path("/var/lib/netwatch/incidents.sqlite"), b"")?;
    let new_in = chroot.put(&new)?;
    let out = chroot.run(&["dpkg", "-i", &new_in])?;
    ensure!(
        !out.contains("not started"),
        "an upgrade printed the first-install note:\n{out}"
    );
    let installed = chroot.run(&["dpkg-query", "-W", "-f=${Status} ${Version}", "netwatch"])?;
    ensure!(
        installed == format!("install ok installed {v2}"),
        "after upgrade: {installed}"
    );
    ensure!(
        fs::read_to_string(chroot.path("/etc/netwatch/netwatch.toml"))? == edited,
        "the upgrade replaced the locally edited /etc/netwatch/netwatch.toml"
    );
    ensure!(
        !chroot.path("/etc/netwatch/netwatch.toml.dpkg-new").exists()
            && !chroot.path("/etc/netwatch/netwatch.toml.dpkg-old").exists(),
        "the upgrade left .dpkg-new/.dpkg-old files"
    );
    ensure!(
        run(&mut chroot.command(dummy, &["netwatch", "check-config"]))?.contains("nwpkg0:host"),
        "check-config after the upgrade"
    );

    // Remove keeps the conffile (and the incident database); purge
    // removes both.
    chroot.run(&["dpkg", "-r", "netwatch"])?;
    ensure!(
        !chroot.path("/usr/sbin/netwatch").exists(),
        "dpkg -r left /usr/sbin/netwatch"
    );
    ensure!(!unit_path.exists(), "dpkg -r left {}", unit_path.display());
    ensure!(
        chroot.path("/etc/netwatch/netwatch.toml").exists(),
        "dpkg -r removed the conffile"
    );
    chroot.run(&["dpkg", "--purge", "netwatch"])?;
    ensure!(
        !chroot.path("/etc/netwatch/netwatch.toml").exists(),
        "dpkg --purge left /etc/netwatch/netwatch.toml"
    );
    ensure!(
        !chroot.path("/var/lib/netwatch").exists(),
        "dpkg --purge left /var/lib/netwatch"
    );
    let gone = chroot.command("", &["dpkg-query", "-W", "netwatch"]).output()?;
    ensure!(!gone.status.success(), "dpkg still knows netwatch after the purge");
    drop(chroot);
    println!("deb test: install, check-config, upgrade keeping a local edit, remove and purge: passed");
    println!("1 passed, 0 failed");
    Ok(())
}

fn crate_version(root: &Path) -> Result<String> {
    let manifest = fs::read_to_string(root.join("Cargo.toml"))?;
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("no version in [workspace.package] of Cargo.toml")
}

/// Control fields: the clash with netdiag is declared.
fn check_control(deb: &Path) -> Result<()> {
    let field = |name: &str| -> Result<String> {
        Ok(run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?
            .trim()
            .to_string())
    };
    ensure!(field("Package")? == "netwatch", "Package: {}", field("Package")?);
    ensure!(field("Conflicts")? == "netdiag", "Conflicts: {}", field("Conflicts")?);
    let contents = run(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    ensure!(
        !contents.contains("/man1/"),
        "the package ships a section-1 man page (netdiag owns netwatch.1)"
    );
    Ok(())
}

/// netwatch.8 and a page per command, valid roff (groff warns about
/// nothing) that renders with `man -l`.
fn check_man_pages(chroot: &Chroot) -> Result<()> {
    let dir = chroot.path("/usr/share/man/man8");
    for page in [
        "netwatch",
        "netwatch-run",
        "netwatch-check-config",
        "netwatch-incidents",
        "netwatch-status",
    ] {
        let path = dir.join(format!("{page}.8.gz"));
        ensure!(path.is_file(), "{} missing", path.display());
        let roff = run(Command::new("zcat").arg(&path))?;
        let out = Command::new("sh")
            .args(["-c", "zcat \"$0\" | groff -man -Tutf8 -ww -z"])
            .arg(&path)
            .output()?;
        ensure!(
            out.status.success() && out.stderr.is_empty(),
            "groff on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            roff.starts_with(".ie") || roff.contains(".TH"),
            "{} is not roff",
            path.display()
        );
        let shown = run(Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"))?;
        ensure!(
            shown.contains("NAME") && shown.contains(page),
            "man -l {}:\n{shown}",
            path.display()
        );
        if page == "netwatch" {
            ensure!(
                shown.contains("check-config") && shown.contains("--config"),
                "netwatch.8 lacks commands or --config"
            );
        }
    }
    ensure!(
        !dir.join("netwatch-generate.8.gz").exists(),
        "the hidden `generate` has a man page"
    );
    Ok(())
}

/// The completions of the three shells name the commands; bash parses its.
fn check_completions(chroot: &Chroot) -> Result<()> {
    for file in [
        "/usr/share/bash-completion/completions/netwatch",
        "/usr/share/zsh/vendor-completions/_netwatch",
        "/usr/share/fish/vendor_completions.d/netwatch.fish",
    ] {
        let text = fs::read_to_string(chroot.path(file)).with_context(|| format!("{file} missing"))?;
        ensure!(
            text.contains("check-config") && text.contains("incidents"),
            "{file} lacks commands"
        );
    }
    run(Command::new("bash")
        .arg("-n")
        .arg(chroot.path("/usr/share/bash-completion/completions/netwatch")))?;
    Ok(())
}
