//! The datapath stamps times in seconds of CLOCK_MONOTONIC (flag events
//! in its nanoseconds); people read wall-clock RFC 3339.

use std::time::{Duration, SystemTime};

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Now, in CLOCK_MONOTONIC nanoseconds (as `bpf_ktime_get_ns`).
pub fn boot_nanos() -> u64 {
    clock(libc::CLOCK_MONOTONIC).as_nanos() as u64
}

/// Now, in the datapath's seconds.
pub fn boot_secs() -> u32 {
    clock(libc::CLOCK_MONOTONIC).as_secs() as u32
}

/// Wall-clock time of a datapath timestamp.
pub fn to_system(boot: u32) -> SystemTime {
    let now_boot = clock(libc::CLOCK_MONOTONIC);
    let now = SystemTime::now();
    let stamp = Duration::from_secs(boot as u64);
    if stamp <= now_boot {
        now - (now_boot - stamp)
    } else {
        now + (stamp - now_boot)
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// RFC 3339 of a datapath timestamp.
pub fn boot_rfc3339(boot: u32) -> String {
    rfc3339(to_system(boot))
}

pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// CLOCK_BOOTTIME: like CLOCK_MONOTONIC, but it keeps counting through a
/// suspend, and never steps.
pub fn boottime() -> Duration {
    clock(libc::CLOCK_BOOTTIME)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): boot-time stamps
/// compare only within one boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
