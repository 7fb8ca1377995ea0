//! `cargo xtask test --kernel VERSION`: the privileged tests inside one of
//! Debian's own kernels, booted under qemu.
//!
//! The kernel comes from Debian's archive (`apt-get download`, unpacked
//! with `dpkg-deb -x`, never installed) into `.tools/kernels/`. The guest
//! is a busybox initramfs holding the test binaries built on the host, the
//! netwatch binary, the tools the tests drive with the libraries they link
//! and the kernel modules they need, each at the path it has on the host.
//! qemu runs it with TCG: this machine's /dev/kvm cannot run stock kernels.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, status};

/// Debian packages a kernel run needs on the host.
const KERNEL_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "zstd",
    "binutils",
];

/// Test binaries a kernel run takes unless told otherwise: the BPF program
/// tests, the namespace end-to-end tests and TC egress on either path.
pub const DEFAULT_SUITES: &str = "datapath,e2e,tc_egress";

/// Modules the tests need that the cloud kernels build as modules: veth
/// pairs and tun devices, VLAN devices, and the clsact qdisc with its BPF
/// classifier (TC attachment where the kernel has no TCX).
const GUEST_MODULES: &[&str] = &["veth", "tun", "8021q", "sch_ingress", "cls_bpf"];

/// Host programs the tests run, copied into the guest with their libraries.
const GUEST_TOOLS: &[&str] = &[
    "dash", "ip", "tc", "bpftool", "nsenter", "setpriv", "unshare", "mount", "umount", "nbtscan", "nmap", "ethtool",
    "promtool",
];

/// Data files those programs read.
const GUEST_FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/services",
    "/etc/protocols",
    "/etc/nsswitch.conf",
    "/usr/share/nmap",
];

/// How many times longer the tests wait for things under emulation
/// (`NETWATCH_TEST_PATIENCE`, tests/src/lib.rs).
const PATIENCE: u32 = 8;

/// Printed by the guest as its last line: the tests' exit status.
const EXIT_MARKER: &str = "NETWATCH-GUEST-EXIT=";
/// Printed by the guest's init once the system is up.
const UP_MARKER: &str = "NETWATCH-GUEST-UP";

/// A whole kernel run must end within this; qemu is killed after it.
const RUN_TIMEOUT_SECS: u32 = 40 * 60;

pub fn test_in_kernel(root: &Path, version: &str, suites: &str, args: &[String]) -> Result<()> {
    setup::ensure_debian_packages(KERNEL_PACKAGES)?;
    let kernel = fetch_kernel(root, version)?;
    let binaries = build_tests(root, suites)?;
    let netwatch = root.join("target/debug/netwatch");
    let work = root.join("target/kernel-tests").join(&kernel.package);
    let initrd = build_initramfs(&work, &kernel, &netwatch, &binaries, args)?;
    boot(&kernel, &initrd, &binaries)
}

struct Kernel {
    package: String,
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The newest Debian cloud kernel image of `version` (e.g. `6.1`), unpacked
/// under `.tools/kernels/`, downloaded unless it is there already.
fn fetch_kernel(root: &Path, version: &str) -> Result<Kernel> {
    if version.is_empty() || !version.chars().all(|c| c.is_ascii_digit() || c == '.') {
        bail!("--kernel {version:?}: give a kernel version such as 6.1 or 6.12");
    }
    let pattern = format!(
        "^linux-image-{}[.-].*-cloud-amd64-unsigned$",
        version.replace('.', "\\.")
    );
    let search = || -> Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", &pattern])
            .output()
            .context("running apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(" - ").next().map(str::to_string))
            .collect())
    };
    let mut found = search()?;
    if found.is_empty() {
        status(Command::new("apt-get").args(["update", "-q"]))?;
        found = search()?;
    }
    let Some(package) = found.into_iter().max_by_key(|name| natural_key(name)) else {
        bail!(
            "--kernel {version}: Debian's archive has no cloud kernel image for it \
             (no package matches {pattern}); Debian 12 has 6.1 and 6.12"
        );
    };
    let dir = root.join(".tools/kernels").join(&package);
    if !dir.join("boot").exists() {
        let download = root.join(".tools/kernels/download");
        let _ = fs::remove_dir_all(&download);
        fs::create_dir_all(&download)?;
        println!("kernel: downloading {package}");
        status(
            Command::new("apt-get")
                .args(["download", "-q", &package])
                .current_dir(&download),
        )?;
        let deb = fs::read_dir(&download)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let unpacking = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&unpacking);
        status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacking))?;
        fs::rename(&unpacking, &dir)?;
        fs::remove_dir_all(&download)?;
    }
    let release = fs::read_dir(dir.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{} has no lib/modules/<release>", dir.display()))?;
    Ok(Kernel {
        vmlinuz: dir.join(format!("boot/vmlinuz-{release}")),
        modules: dir.join("lib/modules").join(&release),
        package,
        release,
    })
}

/// Orders `linux-image-6.1.0-9-...` before `linux-image-6.1.0-50-...`.
fn natural_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

/// A test binary to run in the guest.
struct TestBinary {
    name: String,
    path: PathBuf,
}

/// Builds netwatch and the named test binaries on the host.
fn build_tests(root: &Path, suites: &str) -> Result<Vec<TestBinary>> {
    status(crate::cargo(root).args(["build", "--bin", "netwatch"]))?;
    let mut cmd = crate::cargo(root);
    cmd.args(["test", "--no-run", "--message-format=json", "-p", "netwatch-tests"]);
    let names: Vec<&str> = suites.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    for name in &names {
        cmd.args(["--test", name]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries ({suites}) failed");
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact" && msg["target"]["kind"][0] == "test";
        if let (true, Some(path)) = (is_test, msg["executable"].as_str()) {
            let name = msg["target"]["name"].as_str().unwrap_or_default().to_string();
            binaries.push(TestBinary {
                name,
                path: path.into(),
            });
        }
    }
    binaries.sort_by_key(|b| names.iter().position(|n| *n == b.name));
    if binaries.len() != names.len() {
        bail!(
            "--suites {suites}: found test binaries for {:?} only",
            binaries.iter().map(|b| &b.name).collect::<Vec<_>>()
        );
    }
    Ok(binaries)
}

/// Writes the guest's initramfs and returns its path.
fn build_initramfs(
    work: &Path,
    kernel: &Kernel,
    netwatch: &Path,
    tests: &[TestBinary],
    args: &[String],
) -> Result<PathBuf> {
    let guest = work.join("root");
    let _ = fs::remove_dir_all(&guest);
    for dir in ["bin", "proc", "sys", "dev", "tmp", "run", "var", "mnt"] {
        fs::create_dir_all(guest.join(dir))?;
    }
    std::os::unix::fs::symlink("../run", guest.join("var/run"))?;
    fs::copy("/bin/busybox", guest.join("bin/busybox")).context("copying /bin/busybox (busybox-static)")?;

    let modules = guest.join("lib/modules").join(&kernel.release);
    fs::create_dir_all(&modules)?;
    let order = module_load_order(&kernel.modules, GUEST_MODULES)?;
    for (name, bytes) in &order {
        fs::write(modules.join(format!("{name}.ko")), bytes)?;
    }
    let list: String = order.iter().map(|(name, _)| format!("{name}.ko\n")).collect();
    fs::write(modules.join("load.list"), list)?;

    let mut copied = BTreeSet::new();
    for tool in GUEST_TOOLS {
        let path = which(tool).with_context(|| format!("{tool} is not installed (cargo xtask setup installs it)"))?;
        copy_program(&guest, &path, false, &mut copied)?;
    }
    copy_program(&guest, netwatch, true, &mut copied)?;
    for test in tests {
        copy_program(&guest, &test.path, true, &mut copied)?;
    }
    for file in GUEST_FILES {
        let to = guest.join(file.trim_start_matches('/'));
        let parent = to.parent().expect("absolute path");
        fs::create_dir_all(parent)?;
        status(Command::new("cp").arg("-a").arg(file).arg(parent))?;
    }

    fs::write(guest.join("init"), INIT)?;
    fs::write(guest.join("tests.sh"), tests_script(netwatch, tests, args))?;
    make_executable(&guest.join("init"))?;

    let initrd = work.join("initrd.cpio");
    let files = walk(&guest)?;
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&guest)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&initrd)?)
        .spawn()
        .context("running cpio")?;
    let mut stdin = cpio.stdin.take().expect("piped");
    for file in files {
        writeln!(stdin, "{}", file.strip_prefix(&guest)?.display())?;
    }
    drop(stdin);
    if !cpio.wait()?.success() {
        bail!("cpio failed writing {}", initrd.display());
    }
    fs::remove_dir_all(&guest)?;
    Ok(initrd)
}

/// `wanted` and the modules they depend on, dependencies first, each
/// decompressed. Dependencies come from each module's `depends=` field
/// (the packages ship no modules.dep: depmod runs at install).
fn module_load_order(dir: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut paths = BTreeMap::new();
    for path in walk(dir)? {
        let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if let Some((name, _)) = file.split_once(".ko") {
            paths.insert(name.replace('-', "_"), path);
        }
    }
    fn visit(name: &str, paths: &BTreeMap<String, PathBuf>, order: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let path = paths
            .get(name)
            .with_context(|| format!("the kernel has no module {name}"))?;
        let bytes = decompress(path)?;
        for dep in module_depends(&bytes) {
            visit(&dep.replace('-', "_"), paths, order)?;
        }
        order.push((name.to_string(), bytes));
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        visit(name, &paths, &mut order)?;
    }
    Ok(order)
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool).arg("-dc").arg(path).output()?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// The `depends=` list of a module's `.modinfo` strings.
fn module_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &module[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Copies a program to the same path in the guest, with every library
/// `ldd` says it loads; `strip` drops debug info (test binaries are big).
fn copy_program(guest: &Path, program: &Path, strip: bool, copied: &mut BTreeSet<PathBuf>) -> Result<()> {
    let mut files = vec![program.to_path_buf()];
    let ldd = Command::new("ldd").arg(program).output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split("=>").last().unwrap_or_default().trim();
        if let Some(path) = path.split_whitespace().next().filter(|p| p.starts_with('/')) {
            files.push(path.into());
        }
    }
    for file in files {
        if !copied.insert(file.clone()) {
            continue;
        }
        let to = guest.join(file.strip_prefix("/")?);
        fs::create_dir_all(to.parent().expect("absolute path"))?;
        if strip && file == program {
            status(Command::new("objcopy").arg("--strip-debug").arg(&file).arg(&to))?;
        } else {
            fs::copy(&file, &to).with_context(|| format!("copying {}", file.display()))?;
        }
    }
    Ok(())
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    Ok(out)
}

/// The guest's PID 1: mounts, modules, loopback, the tests, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# busybox's own sh runs its applets before PATH: scripts get Debian's shell
# so that `ip` in them is iproute2.
ln -sf /usr/bin/dash /bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# /tmp stays on the initramfs: the checkout (and so the test binaries,
# copied to their host paths) may itself live under /tmp.
chmod 1777 /tmp
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf
release=$(uname -r)
for m in $(cat /lib/modules/$release/load.list); do
    insmod /lib/modules/$release/$m || echo "insmod $m failed"
done
ip link set lo up
echo "NETWATCH-GUEST-UP $release $(cut -d' ' -f1 /proc/uptime)"
sh /tests.sh
echo "NETWATCH-GUEST-EXIT=$?"
poweroff -f
"#;

/// Runs every test binary one test at a time (they share the kernel).
fn tests_script(netwatch: &Path, tests: &[TestBinary], args: &[String]) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
    let mut script = format!(
        "export NETWATCH_BIN={} NETWATCH_REQUIRE_PRIVILEGED=1 NETWATCH_TEST_PATIENCE={PATIENCE} RUST_BACKTRACE=1 TMPDIR=/tmp\ncd /tmp\nfailed=0\n",
        quote(&netwatch.display().to_string())
    );
    for test in tests {
        let _ = writeln!(
            script,
            "echo '== {name}'\n{path} --test-threads=1 {args} 2>&1 || failed=1",
            name = test.name,
            path = quote(&test.path.display().to_string()),
            args = args.join(" ")
        );
    }
    script.push_str("exit $failed\n");
    script
}

fn boot(kernel: &Kernel, initrd: &Path, tests: &[TestBinary]) -> Result<()> {
    println!("kernel: booting {} under qemu (TCG)", kernel.release);
    let started = Instant::now();
    let mut qemu = Command::new("timeout")
        .args(["--signal=KILL", &RUN_TIMEOUT_SECS.to_string(), "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "4G"])
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut exit = None;
    let mut boot_secs = None;
    let mut current = String::new();
    let mut results = Vec::new();
    for line in BufReader::new(qemu.stdout.take().expect("piped")).lines() {
        let line = line?;
        let line = line.trim_end_matches('\r');
        println!("{line}");
        if let Some(rest) = line.strip_prefix(UP_MARKER) {
            boot_secs = rest.split_whitespace().nth(1).map(str::to_string);
        } else if let Some(name) = line.strip_prefix("== ") {
            current = name.to_string();
        } else if line.starts_with("test result:") {
            results.push(format!("{current}: {}", line.trim_start_matches("test result: ")));
        } else if let Some(code) = line.strip_prefix(EXIT_MARKER) {
            exit = code.trim().parse::<i32>().ok();
        }
    }
    qemu.wait()?;
    println!(
        "\nkernel {}: booted in {} s, {} s in all",
        kernel.release,
        boot_secs.as_deref().unwrap_or("?"),
        started.elapsed().as_secs()
    );
    for r in &results {
        println!("  {r}");
    }
    match exit {
        Some(0) if results.len() == tests.len() => Ok(()),
        Some(0) => bail!(
            "kernel {}: only {} of {} test binaries reported",
            kernel.release,
            results.len(),
            tests.len()
        ),
        Some(code) => bail!("kernel {}: tests failed (exit status {code})", kernel.release),
        None => bail!(
            "kernel {}: the guest stopped without reporting (crash, or killed after {RUN_TIMEOUT_SECS} s)",
            kernel.release
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{module_depends, natural_key};

    #[test]
    fn newest_kernel_package_wins() {
        let mut names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-50-cloud-amd64-unsigned",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names[1], "linux-image-6.1.0-50-cloud-amd64-unsigned");
    }

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=garp,mrp\0name=8021q\0";
        assert_eq!(module_depends(ko), ["garp", "mrp"]);
        assert!(module_depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(module_depends(b"\0name=veth\0").is_empty());
    }
}
