//! The programs the benchmarks run: netwatch's (through the test
//! harness), xdp-tools' xdp-filter as its users load it, a bare
//! `XDP_DROP`, and the live-frames generator.

use std::{
    path::PathBuf,
    process::Command,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use aya_obj::programs::XdpAttachType;

use crate::{bench::sh, netns::Netns};

/// An XDP program that can be timed with BPF_PROG_TEST_RUN.
pub trait Timed {
    fn program(&self) -> &Xdp;

    /// Mean ns per run over `repeat` runs (the kernel's own figure).
    fn ns_per_run(&self, frame: &[u8], repeat: u32) -> f64 {
        self.timed(frame, repeat).0
    }

    /// Mean ns per run over `repeat` runs and the program's verdict
    /// (its return value; the same for every run of the one frame).
    fn timed(&self, frame: &[u8], repeat: u32) -> (f64, u32) {
        let r = crate::harness::run_xdp(self.program(), frame, repeat).expect("BPF_PROG_TEST_RUN");
        (r.duration.as_nanos() as f64, r.return_value)
    }
}

/// The benchmark's own BPF object (netwatch-bench-ebpf, built by
/// tests/build.rs): the generator and the bare `XDP_DROP` program.
static BENCH_GEN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch-bench-gen"));

/// The bench object: the bare `XDP_DROP` program and the generator.
pub struct BenchObject {
    ebpf: Ebpf,
    /// The generator's address rotation as the AF_PACKET sender keeps it
    /// (the BPF generator keeps its own in the `GEN` map).
    rotation: Mutex<Rotation>,
}

/// Which address the generator rewrites, through how many values, and
/// where it is: the same state as the BPF generator's `GenState`.
#[derive(Clone, Copy, Default)]
struct Rotation {
    next: u32,
    count: u32,
    base: u32,
    /// 0: the source address; 1: the destination address.
    field: u32,
}

impl Rotation {
    /// Rewrites `frame` as the BPF generator would (same offsets: the
    /// IPv4 address, or the low 32 bits of the IPv6 one) and advances.
    fn apply(&mut self, frame: &mut [u8]) {
        if self.count == 0 {
            return;
        }
        let ipv6 = frame.len() >= 14 && frame[12..14] == [0x86, 0xdd];
        let at = match (ipv6, self.field) {
            (false, 0) => 14 + 12,
            (false, _) => 14 + 16,
            (true, 0) => 14 + 8 + 12,
            (true, _) => 14 + 8 + 28,
        };
        if at + 4 <= frame.len() {
            frame[at..at + 4].copy_from_slice(&self.base.wrapping_add(self.next).to_be_bytes());
            self.next = if self.next + 1 >= self.count { 0 } else { self.next + 1 };
        }
    }
}

/// Whether this kernel runs XDP programs with `BPF_F_TEST_XDP_LIVE_FRAMES`
/// (some kernels refuse the flag with EPERM even to root); learnt from
/// the first flood.
static LIVE_FRAMES: OnceLock<bool> = OnceLock::new();

/// Whether floods come from the live-frames generator (several Mpps) or,
/// where the kernel refuses live frames, from the AF_PACKET sender
/// (about 1-1.5 Mpps, so a flood rate measures the sender, not the
/// filter). `None` before the first flood.
pub fn live_frames() -> Option<bool> {
    LIVE_FRAMES.get().copied()
}

pub const GEN: &str = "netwatch_bench_gen";
pub const DROP: &str = "netwatch_bench_drop";

impl BenchObject {
    pub fn load() -> Self {
        let mut ebpf = Ebpf::load(BENCH_GEN_OBJECT).expect("load bench object");
        for name in [GEN, DROP] {
            let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().expect("bench program verifies");
        }
        BenchObject {
            ebpf,
            rotation: Mutex::new(Rotation::default()),
        }
    }

    pub fn drop_program(&self) -> &Xdp {
        self.ebpf.program(DROP).unwrap().try_into().unwrap()
    }

    /// Attaches the bare XDP_DROP program to `dev` in `ns` (native mode).
    pub fn attach_drop(&mut self, ns: &Netns, dev: &str) -> aya::programs::xdp::XdpLinkId {
        let index = ifindex_in(ns, dev);
        let p: &mut Xdp = self.ebpf.program_mut(DROP).unwrap().try_into().unwrap();
        // The ifindex means something only inside the namespace.
        ns.run(|| p.attach_to_if_index(index, XdpMode::Driver))
            .expect("attach XDP_DROP")
    }

    pub fn detach_drop(&mut self, id: aya::programs::xdp::XdpLinkId) {
        let p: &mut Xdp = self.ebpf.program_mut(DROP).unwrap().try_into().unwrap();
        p.detach(id).expect("detach XDP_DROP");
    }

    /// Sets how many distinct source addresses the generator cycles
    /// through (0: leave frames as they are).
    pub fn set_sources(&mut self, sources: u32, base: u32) {
        self.set_rotation(0, sources, base);
    }

    /// Sets how many distinct destination addresses the generator cycles
    /// through: one source scanning at full rate.
    pub fn set_destinations(&mut self, destinations: u32, base: u32) {
        self.set_rotation(1, destinations, base);
    }

    /// `base` is the first IPv4 address, or the low 32 bits of the first
    /// IPv6 address, as a host-order integer.
    fn set_rotation(&mut self, field: u32, count: u32, base: u32) {
        let mut map: Array<_, [u32; 4]> = Array::try_from(self.ebpf.map_mut("GEN").unwrap()).unwrap();
        map.set(0, [0, count, base, field], 0).unwrap();
        *self.rotation.lock().unwrap() = Rotation {
            next: 0,
            count,
            base,
            field,
        };
    }

    /// Transmits `frames` copies of `frame` out of `dev` in `ns` (they
    /// arrive at its veth peer), each rewritten by the address rotation;
    /// returns the wall time it took. The live-frames generator where the
    /// kernel allows it, else the AF_PACKET sender (see [`live_frames`]).
    pub fn flood(&self, ns: &Netns, dev: &str, frame: &[u8], frames: u32) -> Duration {
        let index = ifindex_in(ns, dev);
        if LIVE_FRAMES.get() != Some(&false) {
            match self.flood_live(ns, index, frame, frames) {
                Ok(took) => {
                    let _ = LIVE_FRAMES.set(true);
                    return took;
                }
                // Refused before a single frame was run: nothing was sent.
                Err(err) if LIVE_FRAMES.get().is_none() => {
                    eprintln!(
                        "traffic generator: this kernel refuses BPF_F_TEST_XDP_LIVE_FRAMES ({err}); \
                         floods come from an AF_PACKET sender (its rate, not the filter's, bounds a flood)"
                    );
                    let _ = LIVE_FRAMES.set(false);
                }
                Err(err) => panic!("live-frames generator: {err}"),
            }
        }
        // The sender runs in a thread of its own (inside `ns`): it takes
        // the rotation along and gives it back.
        let mut rotation = *self.rotation.lock().unwrap();
        let (took, rotation) = ns.run(move || {
            super::pin_to_cpu0();
            let took = send_packets(index, frame, frames, &mut rotation);
            (took, rotation)
        });
        *self.rotation.lock().unwrap() = rotation;
        took
    }

    fn flood_live(&self, ns: &Netns, index: u32, frame: &[u8], frames: u32) -> Result<Duration, String> {
        let program: &Xdp = self.ebpf.program(GEN).unwrap().try_into().unwrap();
        ns.run(|| {
            super::pin_to_cpu0();
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
            // (the kernel wants data_end == the frame's length).
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&index.to_ne_bytes());
            let opts = TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: frames,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            };
            let start = Instant::now();
            program.test_run(opts).map_err(|e| format!("{e:?}"))?;
            Ok(start.elapsed())
        })
    }
}

/// Frames per `sendmmsg` call.
const BATCH: usize = 64;

/// Sends `frames` copies of `frame`, rewritten by `rotation`, out of
/// interface `index` through an AF_PACKET socket that bypasses the qdisc
/// (the frame goes straight to the veth's transmit, and on to its peer).
/// Every frame is delivered: a frame the veth refuses (its peer's XDP
/// ring full: ENOBUFS) is sent again. Bounded: panics after 120 s.
fn send_packets(index: u32, frame: &[u8], frames: u32, rotation: &mut Rotation) -> Duration {
    // SAFETY: plain socket calls on a socket this function owns; every
    // pointer handed to the kernel points into live local buffers.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        assert_eq!(rc, 0, "PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let rc = libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(
            rc,
            0,
            "binding the AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );

        let mut bufs = vec![frame.to_vec(); BATCH];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = std::mem::zeroed();
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(120);
        let mut sent = 0u32;
        while sent < frames {
            let n = BATCH.min((frames - sent) as usize);
            for buf in &mut bufs[..n] {
                rotation.apply(buf);
            }
            let mut done = 0;
            while done < n {
                let rc = libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (n - done) as u32, 0);
                if rc > 0 {
                    done += rc as usize;
                    continue;
                }
                let err = std::io::Error::last_os_error();
                assert!(
                    matches!(err.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)),
                    "AF_PACKET send: {err}"
                );
                assert!(
                    Instant::now() < deadline,
                    "AF_PACKET sender: stuck at {sent} of {frames} frames"
                );
                libc::sched_yield();
            }
            sent += n as u32;
        }
        libc::close(fd);
        start.elapsed()
    }
}

impl Timed for Xdp {
    fn program(&self) -> &Xdp {
        self
    }
}

pub struct DropProgram<'a>(pub &'a BenchObject);

impl Timed for DropProgram<'_> {
    fn program(&self) -> &Xdp {
        self.0.drop_program()
    }
}

pub fn ifindex_in(ns: &Netns, dev: &str) -> u32 {
    let dev = dev.to_string();
    ns.run(move || netwatch_user::datapath::ifindex(&dev).expect("interface"))
}

/// xdp-filter loaded on `dev` in `ns` with `features`, dropping udp/137
/// and tcp/5190; unloaded on drop.
pub struct XdpFilter {
    ns_name: String,
    dev: String,
    pin: PathBuf,
    /// libxdp's bpffs directory for this instance (`LIBXDP_BPFFS`): its
    /// own, so removing it never touches what another process pinned in
    /// the shared `/sys/fs/bpf/xdp`.
    libxdp_dir: PathBuf,
    program: Xdp,
}

/// `xdp-filter ARGS` in `ns`, with libxdp pinning under `libxdp_dir`.
fn xdp_filter(ns_name: &str, libxdp_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns_name}"))
        .arg("xdp-filter")
        .env("LIBXDP_BPFFS", libxdp_dir);
    cmd
}

impl XdpFilter {
    /// xdp-filter with `features` on `dev`, through libxdp's dispatcher
    /// (how xdp-filter loads by default).
    pub fn load(ns: &Netns, dev: &str, features: &str) -> Self {
        Self::load_as(ns, dev, features, true)
    }

    /// As [`XdpFilter::load`]; `dispatcher: false` attaches xdp-filter's
    /// program itself (`LIBXDP_SKIP_DISPATCHER`), so timing it leaves out
    /// the dispatcher's call.
    pub fn load_as(ns: &Netns, dev: &str, features: &str, dispatcher: bool) -> Self {
        let libxdp_dir = PathBuf::from("/sys/fs/bpf").join(crate::unique("libxdp"));
        std::fs::create_dir(&libxdp_dir).expect("libxdp pin directory");
        let xdp_filter = || xdp_filter(&ns.name, &libxdp_dir);
        let mut load = xdp_filter();
        if !dispatcher {
            load.env("LIBXDP_SKIP_DISPATCHER", "1");
        }
        sh(load.args(["load", dev, "-m", "native", "-f", features]));
        if features.contains("udp") || features == "all" {
            sh(xdp_filter().args(["port", "137", "-p", "udp"]));
        }
        if features.contains("tcp") || features == "all" {
            sh(xdp_filter().args(["port", "5190", "-p", "tcp"]));
        }
        let link: serde_json::Value =
            serde_json::from_str(&sh(Command::new("ip").args(["-n", &ns.name, "-j", "link", "show", dev]))).unwrap();
        let id = link[0]["xdp"]["prog"]["id"]
            .as_u64()
            .expect("xdp-filter attached a program");
        let pin = PathBuf::from("/sys/fs/bpf").join(crate::unique("xdpf"));
        sh(Command::new("bpftool")
            .args(["prog", "pin", "id", &id.to_string()])
            .arg(&pin));
        let program = Xdp::from_pin(&pin, XdpAttachType::Interface).expect("open xdp-filter's program");
        XdpFilter {
            ns_name: ns.name.clone(),
            dev: dev.to_string(),
            pin,
            libxdp_dir,
            program,
        }
    }
}

impl Timed for XdpFilter {
    fn program(&self) -> &Xdp {
        &self.program
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
        let _ = xdp_filter(&self.ns_name, &self.libxdp_dir)
            .args(["unload", &self.dev])
            .output();
        // This instance's libxdp directory, which the unload left empty.
        let _ = std::fs::remove_dir(self.libxdp_dir.join("xdp"));
        let _ = std::fs::remove_dir(&self.libxdp_dir);
    }
}
