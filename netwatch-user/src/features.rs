//! What the running kernel must have for netwatch's programs, checked
//! before anything is loaded: a kernel that lacks a feature is refused
//! with its name and the Linux version that brought it, not with a
//! verifier dump.
//!
//! Every feature is probed (a map created, a tiny program loaded and
//! closed at once), except BPF links for XDP, which cannot be probed
//! without attaching something: aya attaches XDP through a link on 5.9+
//! and falls back to netlink silently, so that one is the kernel version.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};
use log::debug;

/// A kernel feature netwatch's programs use.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    /// The Linux version that brought it.
    pub since: (u32, u32),
    /// What netwatch uses it for.
    pub used_for: &'static str,
    /// Whether the running kernel has it.
    pub probe: fn() -> Probe,
}

/// Every feature, oldest first; the last is the floor. Keep the README's
/// Requirements table in step (a unit test checks).
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "BPF programs of type sched_cls (TC)",
        since: (4, 1),
        used_for: "the TC egress program",
        probe: || is_program_supported(ProgramType::SchedClassifier).map_err(text),
    },
    Feature {
        name: "per-CPU array maps",
        since: (4, 6),
        used_for: "the counters",
        probe: || is_map_supported(MapType::PerCpuArray).map_err(text),
    },
    Feature {
        name: "XDP programs",
        since: (4, 8),
        used_for: "the ingress program",
        probe: || is_program_supported(ProgramType::Xdp).map_err(text),
    },
    Feature {
        name: "the bpf_skb_pull_data helper in TC programs",
        since: (4, 9),
        used_for: "reading headers of non-linear packets on egress",
        probe: || is_helper_supported(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_skb_pull_data).map_err(text),
    },
    Feature {
        name: "LRU hash maps",
        since: (4, 10),
        used_for: "per-source state, visitors and handshakes",
        probe: || is_map_supported(MapType::LruHash).map_err(text),
    },
    Feature {
        name: "LPM trie maps",
        since: (4, 11),
        used_for: "the allowlist and blocklist",
        probe: || is_map_supported(MapType::LpmTrie).map_err(text),
    },
    Feature {
        name: "BPF global data",
        since: (5, 2),
        used_for: "per-attachment constants (interface slot, direction, link type)",
        // aya's answer is a bare bool, false also when bpf(2) itself is
        // refused (no capability, a seccomp filter): ask only once a map
        // can be made, so "cannot tell" never reads as "missing".
        probe: || {
            is_map_supported(MapType::Array)
                .map_err(text)
                .map(|_| aya::features().bpf_global_data())
        },
    },
    Feature {
        name: "the bpf_jiffies64 helper",
        since: (5, 5),
        used_for: "the flood cache's clock",
        probe: || is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_jiffies64).map_err(text),
    },
    Feature {
        name: "BPF ring buffer maps",
        since: (5, 8),
        used_for: "flag events to the controller",
        probe: || is_map_supported(MapType::RingBuf).map_err(text),
    },
    Feature {
        name: "BPF links for XDP",
        since: (5, 9),
        used_for: "pinned XDP attachments that survive a controller restart",
        probe: || {
            KernelVersion::current()
                .map(|v| v >= KernelVersion::new(5, 9, 0))
                .map_err(text)
        },
    },
    Feature {
        name: "the bpf_ktime_get_coarse_ns helper",
        since: (5, 11),
        used_for: "list entry and auto-block expiry",
        probe: || is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_ktime_get_coarse_ns).map_err(text),
    },
    Feature {
        name: "BPF atomic fetch-and-or instructions",
        since: (5, 12),
        used_for: "per-source flags shared by all CPUs",
        probe: atomic_fetch_supported,
    },
];

/// The oldest kernel that has every feature.
pub fn floor() -> (u32, u32) {
    FEATURES.iter().map(|f| f.since).max().expect("features")
}

/// What a probe found: `Ok(true)` present, `Ok(false)` missing, `Err`
/// when it could not tell (e.g. not root): then the load decides.
pub type Probe = Result<bool, String>;

/// The refusal message for a kernel, or `None` when nothing is missing.
/// Probes that could not tell refuse nothing.
pub fn refusal(kernel: &str, results: &[(Feature, Probe)]) -> Option<String> {
    let missing: Vec<&Feature> = results
        .iter()
        .filter(|(_, probe)| matches!(probe, Ok(false)))
        .map(|(f, _)| f)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut out = format!("this kernel (Linux {kernel}) lacks what netwatch needs:");
    for f in &missing {
        let _ = write!(
            out,
            "\n  - {} (Linux {}.{}), for {}",
            f.name, f.since.0, f.since.1, f.used_for
        );
    }
    let (major, minor) = floor();
    let _ = write!(
        out,
        "\nnetwatch needs Linux {major}.{minor} or newer (see Requirements in the README)"
    );
    Some(out)
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Loads a five-instruction XDP program that does an atomic fetch-or on
/// the stack. Kernels before 5.12 know only atomic add and refuse it with
/// EINVAL.
fn atomic_fetch_supported() -> Probe {
    #[repr(C)]
    struct Insn {
        code: u8,
        regs: u8,
        off: i16,
        imm: i32,
    }
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
    }
    const R0: u8 = 0;
    const R1: u8 = 1;
    const R10: u8 = 10;
    let insns = [
        // *(u64 *)(r10 - 8) = 0
        Insn {
            code: 0x7a,
            regs: R10,
            off: -8,
            imm: 0,
        },
        // r1 = 1
        Insn {
            code: 0xb7,
            regs: R1,
            off: 0,
            imm: 1,
        },
        // r1 = atomic_fetch_or((u64 *)(r10 - 8), r1)
        Insn {
            code: 0xdb,
            regs: R10 | (R1 << 4),
            off: -8,
            imm: 0x40 | 0x01,
        },
        // r0 = XDP_PASS; exit
        Insn {
            code: 0xb7,
            regs: R0,
            off: 0,
            imm: 2,
        },
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let attr = ProgLoad {
        prog_type: 6, // BPF_PROG_TYPE_XDP
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    const BPF_PROG_LOAD: libc::c_long = 5;
    // SAFETY: attr and what it points to outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            size_of::<ProgLoad>() as u32,
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor the kernel just gave us.
        unsafe { libc::close(fd as i32) };
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) => Ok(false),
        _ => Err(format!("loading a probe program: {err}")),
    }
}

/// Refuses to go on when the running kernel lacks a feature.
pub fn check() -> Result<()> {
    let results: Vec<(Feature, Probe)> = FEATURES.iter().map(|f| (*f, (f.probe)())).collect();
    for (f, probe) in &results {
        debug!("kernel feature {}: {probe:?}", f.name);
    }
    let mut uname: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct.
    let kernel = if unsafe { libc::uname(&mut uname) } == 0 {
        // SAFETY: uname NUL-terminates release.
        unsafe { std::ffi::CStr::from_ptr(uname.release.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    } else {
        "unknown version".to_string()
    };
    if let Some(message) = refusal(&kernel, &results) {
        bail!("{message}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(probe: impl Fn(&Feature) -> Probe) -> Vec<(Feature, Probe)> {
        FEATURES.iter().map(|f| (*f, probe(f))).collect()
    }

    #[test]
    fn nothing_missing_refuses_nothing() {
        assert_eq!(refusal("6.18.0", &all(|_| Ok(true))), None);
        // A probe that cannot tell (not root) leaves it to the load.
        assert_eq!(refusal("6.18.0", &all(|_| Err("EPERM".into()))), None);
    }

    #[test]
    fn the_refusal_names_each_missing_feature_its_version_and_the_floor() {
        // Debian 11's 5.10: no coarse clock helper, no atomic fetch-or.
        let results = all(|f| Ok(f.since <= (5, 10)));
        let message = refusal("5.10.0-30-amd64", &results).expect("refused");
        assert_eq!(
            message,
            "this kernel (Linux 5.10.0-30-amd64) lacks what netwatch needs:\n  \
             - the bpf_ktime_get_coarse_ns helper (Linux 5.11), for list entry and auto-block expiry\n  \
             - BPF atomic fetch-and-or instructions (Linux 5.12), for per-source flags shared by all CPUs\n\
             netwatch needs Linux 5.12 or newer (see Requirements in the README)"
        );
        // 5.4: the ring buffer is one of them; unknown probes are not.
        let results = all(|f| {
            if f.since == (5, 2) {
                Err("?".into())
            } else {
                Ok(f.since <= (5, 4))
            }
        });
        let message = refusal("5.4.0", &results).expect("refused");
        assert!(message.contains("BPF ring buffer maps (Linux 5.8)"), "{message}");
        assert!(!message.contains("global data"), "{message}");
    }

    #[test]
    fn the_floor_is_the_newest_feature_and_the_readme_says_so() {
        assert_eq!(floor(), (5, 12));
        assert!(FEATURES.windows(2).all(|w| w[0].since <= w[1].since));
        let readme = include_str!("../../README.md");
        assert!(readme.contains("Linux 5.12 or newer"), "README states another floor");
        for f in FEATURES {
            let row = format!("| {} | {}.{} |", f.name, f.since.0, f.since.1);
            assert!(readme.contains(&row), "README Requirements lacks the row {row:?}");
        }
    }

    /// The running kernel (the test machine's) has everything: the
    /// probes answer, and they answer yes.
    #[test]
    fn this_kernel_passes_when_probing_is_allowed() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        for f in FEATURES {
            assert_eq!((f.probe)(), Ok(true), "{}", f.name);
        }
        check().unwrap();
    }
}
