//! `cargo xtask bench`: netwatch measured beside its baselines in one
//! invocation, printed side by side with ratios (absolute figures drift
//! on shared VMs; ratios hold).

pub mod cost;
pub mod flood;
pub mod programs;
pub mod scale;

use std::time::Duration;

/// How much work each part does.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Runs per BPF_PROG_TEST_RUN call when timing one class.
    pub repeat: u32,
    /// Rounds per measurement (the median is reported).
    pub rounds: usize,
    /// Frames per flood measurement.
    pub flood_frames: u32,
    /// Distinct sources for the scale part.
    pub sources: u32,
}

impl Size {
    pub fn full() -> Self {
        Size {
            repeat: 5_000_000,
            rounds: 5,
            flood_frames: 20_000_000,
            sources: 1_000_000,
        }
    }
    pub fn quick() -> Self {
        Size {
            repeat: 200_000,
            rounds: 3,
            flood_frames: 1_000_000,
            sources: 50_000,
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Pins the calling thread to CPU 0, so generator and device under test
/// share a core as in the reference figures.
pub fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Runs `cmd`, panicking with its stderr when it fails.
pub fn sh(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
