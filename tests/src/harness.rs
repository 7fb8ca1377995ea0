//! The real datapath object, loaded and verified by the kernel, fed with
//! crafted frames through BPF_PROG_TEST_RUN.

use std::path::PathBuf;

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use netwatch_common::{Direction, FlagEvent, HASH_KEY_WORDS, LinkKind, Settings};
use netwatch_user::{
    datapath::{self, PinnedMaps, TC_PROGRAM, XDP_PROGRAM},
    detection::sources::{self, Names, SourceView},
    observe::snapshot::Snapshot,
    policy::{Policy, Role},
};

pub const XDP_PASS: u32 = 2;
pub const XDP_DROP: u32 = 1;
pub const TC_ACT_UNSPEC: u32 = u32::MAX; // -1
pub const TC_ACT_SHOT: u32 = 2;

/// Which program to run frames through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp(Direction),
    TcEgress,
}

/// A loaded datapath with its own pin directory, removed on drop.
pub struct Harness {
    pub pin_dir: PathBuf,
    pub maps: PinnedMaps,
    xdp: [Ebpf; 2],
    tc: Ebpf,
    events: std::sync::Mutex<RingBuf<MapData>>,
}

pub const IFACE: &str = "test0";

impl Harness {
    /// The datapath as loaded for an Ethernet interface.
    pub fn new(policy: &Policy) -> Self {
        Self::with_link(policy, LinkKind::Ethernet)
    }

    /// The datapath as loaded for an interface whose frames start as
    /// `link` says (`LinkKind::Ip`: tun, ppp, wireguard).
    pub fn with_link(policy: &Policy, link: LinkKind) -> Self {
        Self::build(policy, link, None)
    }

    /// The datapath with a given destination-hash key instead of a fresh
    /// random one, for tests whose figures depend on the hash.
    pub fn with_hash_key(policy: &Policy, key: [u64; HASH_KEY_WORDS]) -> Self {
        Self::build(policy, LinkKind::Ethernet, Some(key))
    }

    fn build(policy: &Policy, link: LinkKind, hash_key: Option<[u64; HASH_KEY_WORDS]>) -> Self {
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(crate::unique("h"));
        datapath::prepare_pin_dir(&pin_dir).expect("pin dir");
        let load = |direction| {
            let mut ebpf = datapath::load_instance(&pin_dir, 0, direction, link).expect("load object");
            let xdp: &mut Xdp = ebpf.program_mut(XDP_PROGRAM).unwrap().try_into().unwrap();
            xdp.load().expect("XDP program passes the verifier");
            ebpf
        };
        let xdp = [load(Direction::Inbound), load(Direction::Outbound)];
        let mut tc = datapath::load_instance(&pin_dir, 0, Direction::Outbound, link).expect("load object");
        let prog: &mut SchedClassifier = tc.program_mut(TC_PROGRAM).unwrap().try_into().unwrap();
        prog.load().expect("TC program passes the verifier");
        let maps = PinnedMaps::open(&pin_dir).expect("open pins");
        datapath::claim_iface_slot(
            &maps,
            IFACE,
            Role::Host,
            1,
            netwatch_common::ATTACHED_XDP | netwatch_common::ATTACHED_TC,
        )
        .expect("slot");
        if let Some(key) = hash_key {
            // apply_policy keeps a key that is already there.
            let mut settings = maps.settings().unwrap();
            settings.hash_key = key;
            maps.array::<Settings>(netwatch_common::maps::SETTINGS)
                .unwrap()
                .set(0, settings, 0)
                .unwrap();
        }
        netwatch_user::datapath::install::apply_policy(&maps, policy).expect("apply policy");
        let events = RingBuf::try_from(maps.map_by_name(netwatch_common::maps::EVENTS).unwrap()).unwrap();
        Harness {
            pin_dir,
            maps,
            xdp,
            tc,
            events: events.into(),
        }
    }

    pub fn apply(&self, policy: &Policy) {
        netwatch_user::datapath::install::apply_policy(&self.maps, policy).expect("apply policy");
    }

    /// Runs one frame; returns the program's return value.
    pub fn run(&self, hook: Hook, frame: &[u8]) -> u32 {
        self.run_repeat(hook, frame, 1)
    }

    pub fn run_repeat(&self, hook: Hook, frame: &[u8], repeat: u32) -> u32 {
        self.try_run(hook, frame, repeat).expect("BPF_PROG_TEST_RUN")
    }

    /// Like [`Harness::run_repeat`], but returns the kernel's refusal
    /// (e.g. an skb test run with a truncated L3 header) as an error.
    pub fn try_run(&self, hook: Hook, frame: &[u8], repeat: u32) -> Result<u32, aya::programs::ProgramError> {
        self.test_run(hook, frame, repeat).map(|r| r.return_value)
    }

    /// Mean cost of one run, as the kernel measures it over `repeat` runs.
    pub fn time(&self, hook: Hook, frame: &[u8], repeat: u32) -> std::time::Duration {
        self.test_run(hook, frame, repeat).expect("BPF_PROG_TEST_RUN").duration
    }

    /// Like [`Harness::time`], with the program's verdict (the same for
    /// every run of the one frame).
    pub fn time_verdict(&self, hook: Hook, frame: &[u8], repeat: u32) -> (std::time::Duration, u32) {
        let r = self.test_run(hook, frame, repeat).expect("BPF_PROG_TEST_RUN");
        (r.duration, r.return_value)
    }

    fn test_run(&self, hook: Hook, frame: &[u8], repeat: u32) -> Result<TestRunResult, aya::programs::ProgramError> {
        match hook {
            Hook::Xdp(dir) => run_xdp(
                self.xdp[usize::from(u8::from(dir))]
                    .program(XDP_PROGRAM)
                    .unwrap()
                    .try_into()
                    .unwrap(),
                frame,
                repeat,
            ),
            Hook::TcEgress => {
                let prog: &SchedClassifier = self.tc.program(TC_PROGRAM).unwrap().try_into().unwrap();
                let mut out = vec![0u8; frame.len() + 256];
                prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    repeat,
                    ..Default::default()
                })
            }
        }
    }

    /// Instructions the verifier processed for each loaded program:
    /// the XDP program (inbound, outbound) and the TC program.
    pub fn verified_insns(&self) -> [(&'static str, u32); 3] {
        let count = |info: Result<aya::programs::ProgramInfo, _>| {
            info.expect("program info")
                .verified_instruction_count()
                .expect("kernel reports verified instructions")
        };
        let xdp = |dir: usize| {
            let prog: &Xdp = self.xdp[dir].program(XDP_PROGRAM).unwrap().try_into().unwrap();
            count(prog.info())
        };
        let tc: &SchedClassifier = self.tc.program(TC_PROGRAM).unwrap().try_into().unwrap();
        [
            ("xdp inbound", xdp(0)),
            ("xdp outbound", xdp(1)),
            ("tc egress", count(tc.info())),
        ]
    }

    /// Whether the program dropped the frame.
    pub fn dropped(&self, hook: Hook, frame: &[u8]) -> bool {
        let rv = self.run(hook, frame);
        match hook {
            Hook::Xdp(_) => {
                assert!(rv == XDP_PASS || rv == XDP_DROP, "XDP verdict {rv}");
                rv == XDP_DROP
            }
            Hook::TcEgress => {
                assert!(rv == TC_ACT_UNSPEC || rv == TC_ACT_SHOT, "TC verdict {rv}");
                rv == TC_ACT_SHOT
            }
        }
    }

    /// Flag events the datapath emitted since the last call.
    pub fn events(&self) -> Vec<FlagEvent> {
        let mut ring = self.events.lock().unwrap();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            out.extend(netwatch_user::detection::detector::parse_event(&item));
        }
        out
    }

    /// What the kernel tracks for `addr` (every rule, direction, kind).
    pub fn tracked(&self, addr: std::net::IpAddr) -> Vec<SourceView> {
        let names = Names::read(&self.maps).unwrap();
        sources::lookup(&self.maps, &names, addr).unwrap()
    }

    /// Auto-block cap slots taken right now (see [`block_slots_held`]).
    pub fn block_slots_held(&self) -> usize {
        block_slots_held(&self.pin_dir)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot::read(&self.maps).expect("snapshot")
    }

    /// Packets counted for (direction, rule, action), e.g. ("inbound", "udp/137", "dropped").
    pub fn rule_packets(&self, direction: &str, rule: &str, action: &str) -> u64 {
        self.snapshot()
            .rule_counters
            .iter()
            .filter(|c| c.direction == direction && c.rule == rule && c.action == action)
            .map(|c| c.packets)
            .sum()
    }

    /// Packets counted in a non-rule class; `class` is `unmatched`,
    /// `non_ip`, `fragment` or a malformed reason.
    pub fn class_packets(&self, direction: &str, class: &str) -> u64 {
        self.snapshot()
            .class_counters
            .iter()
            .filter(|c| c.direction == direction && (c.class == class || c.reason == Some(class)))
            .map(|c| c.packets)
            .sum()
    }

    /// Every packet counted anywhere, in one direction.
    pub fn total_packets(&self, direction: &str) -> u64 {
        let s = self.snapshot();
        s.rule_counters
            .iter()
            .filter(|c| c.direction == direction)
            .map(|c| c.packets)
            .sum::<u64>()
            + s.class_counters
                .iter()
                .filter(|c| c.direction == direction)
                .map(|c| c.packets)
                .sum::<u64>()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = datapath::detach_all(&self.pin_dir);
    }
}

/// Auto-block cap slots held in the pinned `AUTO_BLOCKS` map of
/// `pin_dir`, read as the datapath counts them: every entry of a hash map
/// keyed by source, or, for an array of expiry times, every slot whose
/// time has not passed.
pub fn block_slots_held(pin_dir: &std::path::Path) -> usize {
    use aya::maps::{Array, HashMap, Map};
    let data = MapData::from_pin(pin_dir.join(netwatch_common::maps::AUTO_BLOCKS)).expect("pinned AUTO_BLOCKS");
    let now = netwatch_user::clock::boot_secs();
    match Map::from_map_data(data).unwrap() {
        Map::HashMap(data) => {
            let map: HashMap<_, [u8; 20], u32> = HashMap::try_from(Map::HashMap(data)).unwrap();
            map.keys().count()
        }
        Map::Array(data) => {
            let map: Array<_, u32> = Array::try_from(Map::Array(data)).unwrap();
            map.iter().filter(|v| matches!(v, Ok(until) if *until > now)).count()
        }
        other => panic!("AUTO_BLOCKS is {other:?}"),
    }
}

/// Pins the calling thread to `cpu` (BPF_PROG_TEST_RUN runs the program
/// on the caller's CPU, so per-CPU state can be set up deliberately).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}"
        );
    }
}

/// Runs `frame` through an XDP program `repeat` times.
pub fn run_xdp(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<TestRunResult, aya::programs::ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })
}

pub fn policy(mode: netwatch_user::policy::Mode, rules: &[&str]) -> Policy {
    Policy::new(mode, rules.iter().map(|r| r.parse().unwrap()).collect())
}
