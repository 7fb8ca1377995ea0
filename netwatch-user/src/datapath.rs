//! Loading, pinning and attaching the eBPF datapath, and writing policy
//! into its maps.
//!
//! Every map is pinned by name under the pin directory, so counters and
//! enforcement state outlive the controller. Each attachment (XDP on an
//! interface, TC egress on an interface) is its own program instance with
//! the interface slot and direction set as load-time constants, sharing
//! the pinned maps. Links are pinned under `links/` so that a restarted
//! controller re-adopts them and `netwatch detach` can remove them even
//! after a crash.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        LinkOrder, ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
    sys::SyscallError,
};
use log::{debug, info, warn};

use netwatch_common::{
    ATTACHED_TC, ATTACHED_TC_NETLINK, ATTACHED_XDP, Counter, Direction, IfaceInfo, LinkKind, ListEntry, MAX_IFACES,
    MAX_RULES, PortRule, PortRules, RuleInfo, Settings, globals, maps,
};

use crate::{
    policy::Role,
    tc::{self, TcAttach, TcPath},
};

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch"));

pub const XDP_PROGRAM: &str = "netwatch_xdp";
pub const TC_PROGRAM: &str = "netwatch_tc";

/// How an XDP program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    Generic,
}

/// Loads one instance of the object with its maps bound to the pins in
/// `pin_dir` (created there if missing) and its globals set.
pub fn load_instance(pin_dir: &Path, iface_slot: u32, direction: Direction, link: LinkKind) -> Result<Ebpf> {
    let paths: Vec<(&str, PathBuf)> = maps::ALL.iter().map(|m| (*m, pin_dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let direction = direction as u32;
    let link = link as u32;
    loader
        .override_global(globals::IFACE_SLOT, &iface_slot, true)
        .override_global(globals::DIRECTION, &direction, true)
        .override_global(globals::LINK_KIND, &link, true);
    loader.load(EBPF_OBJECT).with_context(|| {
        format!(
            "loading the netwatch eBPF object with maps pinned in {}",
            pin_dir.display()
        )
    })
}

/// Creates the pin directory with root-only permissions, or checks that
/// an existing one is on bpffs.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && parent == Path::new(BPFFS_ROOT) {
        mount_bpffs()?;
    }
    if !is_bpffs(parent) && !is_bpffs(pin_dir) {
        bail!(
            "{} is not on a BPF filesystem (bpffs); mount one with `mount -t bpf bpf {}` or choose another --pin-dir",
            parent.display(),
            parent.display()
        );
    }
    for dir in [pin_dir.to_path_buf(), pin_dir.join("links")] {
        fs::create_dir_all(&dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting permissions of {}", dir.display()))?;
    }
    check_pinned_layout(pin_dir)
}

const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf where the system has not (as bpftool does).
fn mount_bpffs() -> Result<()> {
    let target = std::ffi::CString::new(BPFFS_ROOT)?;
    let fstype = std::ffi::CString::new("bpf")?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!("{BPFFS_ROOT} is not a BPF filesystem and mounting one there failed: {err}");
    }
    info!("mounted bpffs at {BPFFS_ROOT}");
    Ok(())
}

/// Holds an exclusive lock on the pin directory while `run` is running,
/// so two controllers never fight over the same maps and links.
pub struct PinDirLock {
    _file: fs::File,
}

pub fn lock_pin_dir(pin_dir: &Path) -> Result<PinDirLock> {
    use std::os::fd::AsRawFd as _;
    let dir = fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `netwatch run` is using {}; stop it first, or give this one its own --pin-dir",
            pin_dir.display()
        );
    }
    Ok(PinDirLock { _file: dir })
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// The shape of a map: what must agree between a pin and this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapLayout {
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "key {} B, value {} B, {} entries",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Refuses pins whose layout differs from this build's maps (a foreign
/// object, or an incompatible older netwatch), instead of reading garbage.
fn check_pinned_layout(pin_dir: &Path) -> Result<()> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| anyhow!("parsing the eBPF object: {e}"))?;
    for name in maps::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let m = object
            .maps
            .get(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        let expected = MapLayout {
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
        };
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("{} exists but is not a pinned BPF map", path.display()))?;
        let pinned = MapLayout {
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if pinned != expected {
            bail!(
                "pinned map {} has layout ({pinned}) but this netwatch expects ({expected}); it was made by another \
                 program or an incompatible netwatch version: run `netwatch detach --pin-dir {}` to remove it",
                path.display(),
                pin_dir.display()
            );
        }
    }
    Ok(())
}

/// Handle on the pinned maps, for the controller and the query commands.
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// Opens the pin directory of a netwatch that has run at least once.
    pub fn open(dir: &Path) -> Result<Self> {
        ensure_accessible(dir)?;
        if !dir.join(maps::SETTINGS).exists() {
            bail!(
                "no netwatch state in {}: is `netwatch run` running (or did it ever run) with this --pin-dir?",
                dir.display()
            );
        }
        check_pinned_layout(dir)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map_by_name(&self, name: &str) -> Result<Map> {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
        Map::from_map_data(data).with_context(|| format!("pinned map {}", path.display()))
    }

    pub fn array<V: aya::Pod>(&self, name: &str) -> Result<Array<MapData, V>> {
        Ok(Array::try_from(self.map_by_name(name)?)?)
    }

    pub fn per_cpu_array<V: aya::Pod>(&self, name: &str) -> Result<PerCpuArray<MapData, V>> {
        Ok(PerCpuArray::try_from(self.map_by_name(name)?)?)
    }

    pub fn lpm<K: aya::Pod>(&self, name: &str) -> Result<LpmTrie<MapData, K, ListEntry>> {
        Ok(LpmTrie::try_from(self.map_by_name(name)?)?)
    }

    pub fn settings(&self) -> Result<Settings> {
        Ok(self.array::<Settings>(maps::SETTINGS)?.get(&0, 0)?)
    }

    /// Every interface slot that has been used (its counters persist).
    pub fn iface_slots(&self) -> Result<Vec<(u32, IfaceInfo)>> {
        let map = self.array::<IfaceInfo>(maps::IFACE_INFO)?;
        let mut out = Vec::new();
        for slot in 0..MAX_IFACES {
            let info = map.get(&slot, 0)?;
            if info.name[0] != 0 {
                out.push((slot, info));
            }
        }
        Ok(out)
    }

    /// The rule slots of the policy version in force.
    pub fn rules(&self) -> Result<Vec<(u32, RuleInfo)>> {
        let live = self.settings()?.active & 1;
        Ok(self
            .rule_slots_all()?
            .into_iter()
            .filter(|(_, info)| info.in_use & (1 << live) != 0)
            .collect())
    }

    /// The rule slots of the version in force, with the rule the datapath
    /// applies for each.
    pub fn rules_in_force(&self) -> Result<Vec<(u32, RuleInfo, PortRule)>> {
        let live = self.settings()?.active & 1;
        let port_rules = self.array::<PortRules>(maps::PORT_RULES)?;
        self.rules()?
            .into_iter()
            .map(|(slot, info)| Ok((slot, info, *port_rules.get(&info.port_rule_index(), 0)?.version(live))))
            .collect()
    }

    /// Every rule slot, used or not.
    pub fn rule_slots_all(&self) -> Result<Vec<(u32, RuleInfo)>> {
        let map = self.array::<RuleInfo>(maps::RULE_INFO)?;
        (0..MAX_RULES).map(|slot| Ok((slot, map.get(&slot, 0)?))).collect()
    }

    /// Sum over CPUs of one per-CPU counter.
    pub fn counter_sum(map: &PerCpuArray<MapData, Counter>, index: u32) -> Result<Counter> {
        let values = map.get(&index, 0)?;
        Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }
}

/// Finds the slot an interface had before (by name), or a free one.
pub fn claim_iface_slot(maps: &PinnedMaps, name: &str, role: Role, ifindex: u32) -> Result<u32> {
    let mut map = maps.array::<IfaceInfo>(maps::IFACE_INFO)?;
    let infos: Vec<IfaceInfo> = (0..MAX_IFACES).map(|s| map.get(&s, 0)).collect::<Result<_, _>>()?;
    let name_bytes = iface_name_bytes(name)?;
    let slot = infos
        .iter()
        .position(|i| i.name == name_bytes)
        .or_else(|| infos.iter().position(|i| i.in_use == 0 && i.name == [0; 16]))
        .or_else(|| infos.iter().position(|i| i.in_use == 0))
        .ok_or_else(|| anyhow!("more than {MAX_IFACES} interfaces"))? as u32;
    let mut info = infos[slot as usize];
    if info.name != name_bytes {
        info = IfaceInfo::default();
    }
    info.in_use = 1;
    info.role = role.as_u32();
    info.ifindex = ifindex;
    info.name = name_bytes;
    map.set(slot, info, 0)?;
    Ok(slot)
}

pub fn update_iface(maps: &PinnedMaps, slot: u32, f: impl FnOnce(&mut IfaceInfo)) -> Result<()> {
    let mut map = maps.array::<IfaceInfo>(maps::IFACE_INFO)?;
    let mut info = map.get(&slot, 0)?;
    f(&mut info);
    map.set(slot, info, 0)?;
    Ok(())
}

fn iface_name_bytes(name: &str) -> Result<[u8; 16]> {
    let mut out = [0u8; 16];
    if name.is_empty() || name.len() > 15 {
        bail!("interface name {name:?} must be 1 to 15 bytes");
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

pub fn iface_name(info: &IfaceInfo) -> String {
    let end = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
    String::from_utf8_lossy(&info.name[..end]).into_owned()
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c_name = std::ffi::CString::new(name).map_err(|_| anyhow!("interface name {name:?} contains NUL"))?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("interface {name:?} does not exist in this network namespace");
    }
    Ok(index)
}

/// Where frames on `iface` start, from its link type (`ARPHRD_*`, as
/// SIOCGIFHWADDR reports it in this network namespace). A device whose
/// frames netwatch cannot parse is refused, never attached blind.
pub fn link_kind(iface: &str) -> Result<LinkKind> {
    const ARPHRD_ETHER: u16 = 1;
    const ARPHRD_PPP: u16 = 512;
    const ARPHRD_RAWIP: u16 = 519;
    const ARPHRD_TUNNEL: u16 = 768;
    const ARPHRD_TUNNEL6: u16 = 769;
    const ARPHRD_LOOPBACK: u16 = 772;
    const ARPHRD_SIT: u16 = 776;
    const ARPHRD_IPGRE: u16 = 778;
    const ARPHRD_IP6GRE: u16 = 823;
    const ARPHRD_NONE: u16 = 0xfffe;
    let kind = link_type(iface)?;
    match kind {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(LinkKind::Ethernet),
        ARPHRD_NONE | ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_IPGRE
        | ARPHRD_IP6GRE => Ok(LinkKind::Ip),
        other => bail!(
            "interface {iface:?} has link type {other} (ARPHRD_*), whose frames netwatch cannot parse; it \
             supports Ethernet-framed devices (Ethernet, veth, bridge, bond, VLAN, PPPoE's physical port) and \
             L3 devices (tun, ppp, wireguard, ipip, sit, gre, ip6tnl)"
        ),
    }
}

/// The `ARPHRD_*` link type of `iface` in this network namespace.
fn link_type(iface: &str) -> Result<u16> {
    let name = std::ffi::CString::new(iface).map_err(|_| anyhow!("interface name {iface:?} contains NUL"))?;
    // SAFETY: an ifreq is plain data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > req.ifr_name.len() {
        bail!("interface name {iface:?} is longer than 15 bytes");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a socket to read link types");
    }
    // SAFETY: fd is a new descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCGIFHWADDR fills `req.ifr_ifru.ifru_hwaddr`.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the link type of interface {iface:?}"));
    }
    // SAFETY: the ioctl succeeded, so the hwaddr member is set.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// The pin of `hook` on `iface` under `links/`. bpffs refuses names with
/// a '.', which VLAN devices (`eth0.100`) have; no interface name holds a
/// ':', so a '.' becomes ':'.
fn link_pin(pin_dir: &Path, hook: &str, iface: &str) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{hook}_{}", iface.replace('.', ":")))
}

/// The hook and interface a pin under `links/` is for.
fn parse_link_pin(name: &str) -> Option<(&str, String)> {
    let (hook, iface) = name.split_once('_')?;
    Some((hook, iface.replace(':', ".")))
}

/// Pins under `links/` that record a netlink TC filter (see `tc`):
/// the program the filter runs; the next program while it replaces the
/// filter's; and a mark that netwatch created the interface's clsact
/// qdisc (a second pin of a program: bpffs holds BPF objects only).
const TC_NL: &str = "tcnl";
const TC_NL_NEXT: &str = "tcnlnext";
const TC_NL_QDISC: &str = "tcqdisc";

/// What one attachment left under the pin directory.
enum Pinned {
    /// A BPF link pin: removing it detaches.
    Link(PathBuf),
    /// A netlink TC egress filter on this interface.
    TcNetlink(String),
}

/// The programs this controller has attached. Dropping it leaves the
/// pinned links and netlink filters in place; [`Attachments::detach`]
/// removes them.
pub struct Attachments {
    pin_dir: PathBuf,
    /// Program instances and what they own under the pin directory.
    instances: Vec<(Ebpf, Pinned)>,
}

impl Attachments {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            instances: Vec::new(),
        }
    }

    /// Attaches XDP to `iface`, natively if the driver can, else in generic
    /// mode. A link left pinned by an earlier run is re-adopted: the new
    /// program replaces the old one atomically, with no gap in counting.
    /// Returns the mode, or `None` when an earlier run's link was re-adopted
    /// (its mode is unchanged).
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        slot: u32,
        direction: Direction,
        force_generic: bool,
    ) -> Result<Option<XdpAttachMode>> {
        let link = link_kind(iface)?;
        let mut ebpf = load_instance(&self.pin_dir, slot, direction, link)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .context("XDP program missing from object")?
            .try_into()?;
        program.load().context("loading the XDP program (verifier)")?;
        let pin = link_pin(&self.pin_dir, "xdp", iface);
        let mode = match readopt(&pin)? {
            Some(old) => {
                let link = XdpLink::try_from(old)?;
                program
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the XDP program on {iface}"))?;
                info!("{iface}: re-adopted the XDP link pinned by an earlier run");
                None
            }
            None => {
                let index = ifindex(iface)?;
                let native = if force_generic {
                    Err(anyhow!("generic mode requested"))
                } else {
                    program
                        .attach_to_if_index(index, XdpMode::Driver)
                        .map_err(anyhow::Error::from)
                };
                let (id, mode) = match native {
                    Ok(id) => (id, XdpAttachMode::Native),
                    Err(err) => {
                        if !force_generic {
                            info!("{iface}: native XDP not available ({err:#}); attaching in generic (SKB) mode");
                        }
                        let id = program
                            .attach_to_if_index(index, XdpMode::Skb)
                            .with_context(|| format!("attaching XDP to {iface}"))?;
                        (id, XdpAttachMode::Generic)
                    }
                };
                let link = FdLink::try_from(program.take_link(id)?)
                    .with_context(|| format!("{iface}: XDP attached through netlink, not a BPF link"))?;
                link.pin(&pin)
                    .with_context(|| format!("pinning XDP link at {}", pin.display()))?;
                Some(mode)
            }
        };
        self.instances.push((ebpf, Pinned::Link(pin)));
        Ok(mode)
    }

    /// Attaches the TC egress program to `iface`, through TCX or netlink
    /// as `setting` and the kernel decide (see `tc`). What an earlier run
    /// left attached is re-adopted: its program is replaced in place, with
    /// no gap. An earlier run's attachment through the other path is
    /// removed once the new one is in place. Returns the path taken.
    pub fn attach_tc_egress(&mut self, iface: &str, slot: u32, setting: TcAttach) -> Result<TcPath> {
        let link = link_kind(iface)?;
        let index = ifindex(iface)?;
        let path = tc::resolve(setting, tc::tcx_supported(iface)?, iface)?;
        let mut ebpf = load_instance(&self.pin_dir, slot, Direction::Outbound, link)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .context("TC program missing from object")?
            .try_into()?;
        program.load().context("loading the TC program (verifier)")?;
        let tcx_pin = link_pin(&self.pin_dir, "tc", iface);
        let pinned = match path {
            TcPath::Tcx => {
                match readopt(&tcx_pin)? {
                    Some(old) => {
                        let link = SchedClassifierLink::try_from(old)?;
                        program
                            .attach_to_link(link)
                            .with_context(|| format!("replacing the TC program on {iface}"))?;
                        info!("{iface}: re-adopted the TC egress link pinned by an earlier run");
                    }
                    None => {
                        // First in line, as the netlink filter is.
                        let id = program
                            .attach_with_options(
                                iface,
                                TcAttachType::Egress,
                                TcAttachOptions::TcxOrder(LinkOrder::first()),
                            )
                            .with_context(|| format!("attaching TC egress to {iface} through TCX"))?;
                        let link = FdLink::try_from(program.take_link(id)?)?;
                        link.pin(&tcx_pin)
                            .with_context(|| format!("pinning TC link at {}", tcx_pin.display()))?;
                    }
                }
                if remove_tc_netlink(&self.pin_dir, iface)? > 0 {
                    info!("{iface}: removed the netlink TC filter of an earlier run (now TCX)");
                }
                Pinned::Link(tcx_pin)
            }
            TcPath::Netlink => {
                attach_tc_netlink(&self.pin_dir, program, iface, index)?;
                if tcx_pin.exists() {
                    fs::remove_file(&tcx_pin).with_context(|| format!("removing {}", tcx_pin.display()))?;
                    info!("{iface}: removed the TCX link of an earlier run (now a netlink filter)");
                }
                Pinned::TcNetlink(iface.to_string())
            }
        };
        self.instances.push((ebpf, pinned));
        Ok(path)
    }

    /// Detaches every program this controller attached (by removing the
    /// link pins, and the netlink filters with their records); maps stay
    /// pinned, so counters continue next run.
    pub fn detach(self) {
        for (_, pinned) in &self.instances {
            match pinned {
                Pinned::Link(pin) => {
                    if let Err(err) = fs::remove_file(pin) {
                        warn!("removing link pin {}: {err}", pin.display());
                    }
                }
                Pinned::TcNetlink(iface) => {
                    if let Err(err) = remove_tc_netlink(&self.pin_dir, iface) {
                        warn!("removing the netlink TC filter on {iface}: {err:#}");
                    }
                }
            }
        }
    }
}

/// The id of a pinned program, if the pin exists.
fn pinned_prog_id(pin: &Path) -> Result<Option<u32>> {
    if !pin.exists() {
        return Ok(None);
    }
    let info = ProgramInfo::from_pin(pin).with_context(|| format!("{} is not a pinned BPF program", pin.display()))?;
    Ok(Some(info.id()))
}

/// netwatch's netlink filter on `iface`'s egress: the one that runs a
/// program recorded under the pin directory. `true` when it runs the
/// program of the `next` pin (a run stopped between replacing the
/// filter's program and renaming its pin).
fn find_tc_netlink(pin_dir: &Path, iface: &str, index: u32) -> Result<Vec<(tc::Filter, bool)>> {
    let record = pinned_prog_id(&link_pin(pin_dir, TC_NL, iface))?;
    let next = pinned_prog_id(&link_pin(pin_dir, TC_NL_NEXT, iface))?;
    if record.is_none() && next.is_none() {
        return Ok(Vec::new());
    }
    let filters =
        tc::filters(index, tc::Hook::Egress).with_context(|| format!("listing the TC egress filters of {iface}"))?;
    Ok(filters
        .into_iter()
        .filter_map(|f| match f.prog_id {
            Some(id) if Some(id) == record => Some((f, false)),
            Some(id) if Some(id) == next => Some((f, true)),
            _ => None,
        })
        .collect())
}

/// Pins `program` at `pin` through a temporary name and a rename, so the
/// record of a filter is never missing.
fn repin(program: &mut SchedClassifier, pin_dir: &Path, hook: &str, iface: &str) -> Result<()> {
    let next = link_pin(pin_dir, TC_NL_NEXT, iface);
    let pin = link_pin(pin_dir, hook, iface);
    if !next.exists() {
        program
            .pin(&next)
            .with_context(|| format!("pinning the TC program at {}", next.display()))?;
    }
    fs::rename(&next, &pin).with_context(|| format!("renaming {} to {}", next.display(), pin.display()))
}

/// Attaches `program` as a `bpf` filter on `iface`'s clsact egress hook,
/// replacing the program of netwatch's filter there if an earlier run
/// left one (same priority and handle: one filter, no gap).
fn attach_tc_netlink(pin_dir: &Path, program: &mut SchedClassifier, iface: &str, index: u32) -> Result<()> {
    let next = link_pin(pin_dir, TC_NL_NEXT, iface);
    let mut found = find_tc_netlink(pin_dir, iface, index)?;
    if let Some((_, true)) = found.first() {
        // The earlier run replaced the program but did not rename its pin.
        fs::rename(&next, link_pin(pin_dir, TC_NL, iface)).context("completing an earlier run's re-pin")?;
    }
    if next.exists() {
        fs::remove_file(&next).with_context(|| format!("removing {}", next.display()))?;
    }
    // Extra netwatch filters (a second one can only come from an older
    // netwatch or a hand-made copy): one is enough.
    for (extra, _) in found.iter().skip(1) {
        warn!(
            "{iface}: removing a duplicate netwatch TC filter (pref {})",
            extra.priority
        );
        tc::delete_filter(index, tc::Hook::Egress, extra)?;
    }
    program
        .pin(&next)
        .with_context(|| format!("pinning the TC program at {}", next.display()))?;
    match found.drain(..).next() {
        Some((filter, _)) => {
            let old = SchedClassifierLink::attached(
                iface,
                TcAttachType::Egress,
                filter.priority,
                TcHandle::from(filter.handle),
                None,
            )?;
            let id = program
                .attach_to_link(old)
                .with_context(|| format!("replacing the program of the TC filter on {iface}"))?;
            // The filter outlives this process: never detach it on drop.
            std::mem::forget(program.take_link(id)?);
            repin(program, pin_dir, TC_NL, iface)?;
            info!(
                "{iface}: re-adopted the netlink TC egress filter of an earlier run (pref {})",
                filter.priority
            );
        }
        None => {
            // Recorded before the filter exists: a crash in between leaves a
            // record without a filter (re-attached next run), never a
            // filter without a record.
            repin(program, pin_dir, TC_NL, iface)?;
            let added_clsact = !tc::has_clsact(index).with_context(|| format!("listing the qdiscs of {iface}"))?;
            if added_clsact {
                aya::programs::tc::qdisc_add_clsact(iface)
                    .with_context(|| format!("adding a clsact qdisc to {iface}"))?;
                program
                    .pin(link_pin(pin_dir, TC_NL_QDISC, iface))
                    .with_context(|| format!("recording that netwatch added the clsact qdisc of {iface}"))?;
            }
            // First in line: a filter before netwatch's that ends
            // classification (any non-direct-action match does) would hide
            // packets from it; netwatch's own pass lets the others run.
            let others = tc::filters(index, tc::Hook::Egress)
                .with_context(|| format!("listing the TC egress filters of {iface}"))?;
            let priority = match others.iter().map(|f| f.priority).min() {
                None => 0, // the kernel's choice, 49152
                Some(first) if first > 1 => first - 1,
                Some(_) => {
                    warn!("{iface}: another TC egress filter has pref 1 and runs before netwatch's");
                    0
                }
            };
            let attached = program.attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority,
                    ..NlOptions::default()
                }),
            );
            let id = match attached {
                Ok(id) => id,
                Err(err) => {
                    let _ = remove_tc_netlink(pin_dir, iface);
                    let empty = || -> io::Result<bool> {
                        Ok(tc::filters(index, tc::Hook::Ingress)?.is_empty()
                            && tc::filters(index, tc::Hook::Egress)?.is_empty())
                    };
                    if added_clsact && empty().unwrap_or(false) {
                        let _ = tc::delete_clsact(index);
                    }
                    return Err(err).with_context(|| format!("attaching TC egress to {iface} through netlink"));
                }
            };
            std::mem::forget(program.take_link(id)?);
        }
    }
    Ok(())
}

/// Removes netwatch's netlink TC filter on `iface` and its records, and
/// the clsact qdisc if netwatch added it and no filter is left on it.
/// Other filters are never touched. Returns the number of pins removed.
fn remove_tc_netlink(pin_dir: &Path, iface: &str) -> Result<usize> {
    let pins = [TC_NL, TC_NL_NEXT, TC_NL_QDISC].map(|hook| link_pin(pin_dir, hook, iface));
    if !pins.iter().any(|p| p.exists()) {
        return Ok(0);
    }
    // Gone with its interface otherwise.
    if let Ok(index) = ifindex(iface) {
        let ours = find_tc_netlink(pin_dir, iface, index)?;
        for (filter, _) in &ours {
            tc::delete_filter(index, tc::Hook::Egress, filter)
                .with_context(|| format!("removing netwatch's TC egress filter on {iface}"))?;
            info!(
                "{iface}: removed the netlink TC egress filter (pref {})",
                filter.priority
            );
        }
        // Only where netwatch's filter was found: this is the interface
        // (and network namespace) netwatch added the qdisc to.
        if !ours.is_empty() && pins[2].exists() && tc::has_clsact(index)? {
            let left = tc::filters(index, tc::Hook::Ingress)?.len() + tc::filters(index, tc::Hook::Egress)?.len();
            if left == 0 {
                tc::delete_clsact(index)
                    .with_context(|| format!("removing the clsact qdisc netwatch added to {iface}"))?;
                info!("{iface}: removed the clsact qdisc netwatch added");
            } else {
                info!("{iface}: left the clsact qdisc netwatch added in place: {left} other filters use it");
            }
        }
    }
    let mut removed = 0;
    for pin in &pins {
        if pin.exists() {
            fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Opens a link pinned by an earlier run, if any.
fn readopt(pin: &Path) -> Result<Option<FdLink>> {
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => Ok(Some(FdLink::from(pinned))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(err) => Err(err).with_context(|| format!("opening pinned link {}", pin.display())),
    }
}

/// The pin directory is root-only (0700): say so rather than "not found".
fn ensure_accessible(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied reading {}: netwatch's pinned maps are root-only; run this as root",
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// Removes every program, link and map netwatch pinned under `pin_dir`.
/// Returns the number of pins removed.
pub fn detach_all(pin_dir: &Path) -> Result<usize> {
    ensure_accessible(pin_dir)?;
    if !pin_dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    let links = pin_dir.join("links");
    if links.exists() {
        // Netlink filters first: their records identify them.
        let mut tc_netlink = std::collections::BTreeSet::new();
        for entry in fs::read_dir(&links)? {
            let name = entry?.file_name();
            if let Some((hook, iface)) = name.to_str().and_then(parse_link_pin)
                && [TC_NL, TC_NL_NEXT, TC_NL_QDISC].contains(&hook)
            {
                tc_netlink.insert(iface);
            }
        }
        for iface in tc_netlink {
            removed += remove_tc_netlink(pin_dir, &iface)?;
        }
        for entry in fs::read_dir(&links)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            debug!("removed link pin {}", path.display());
            removed += 1;
        }
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for name in maps::ALL {
        let path = pin_dir.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
    }
    let lock = pin_dir.join(crate::install::LOCK_DIR);
    if lock.exists() {
        fs::remove_dir(&lock).with_context(|| format!("removing {}", lock.display()))?;
    }
    fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "removing {} (it holds files netwatch did not make; left in place)",
            pin_dir.display()
        )
    })?;
    Ok(removed)
}

/// Marks what is attached to an interface slot, for `status`.
/// `xdp` is `Some(None)` for a re-adopted XDP link, whose mode is as
/// recorded before.
pub fn mark_attached(
    maps: &PinnedMaps,
    slot: u32,
    xdp: Option<Option<XdpAttachMode>>,
    tc: Option<TcPath>,
) -> Result<()> {
    update_iface(maps, slot, |info| {
        if let Some(mode) = xdp {
            info.attached |= ATTACHED_XDP;
            if let Some(mode) = mode {
                info.xdp_generic = (mode == XdpAttachMode::Generic) as u8;
            }
        }
        if let Some(path) = tc {
            info.attached |= ATTACHED_TC;
            info.attached &= !ATTACHED_TC_NETLINK;
            if path == TcPath::Netlink {
                info.attached |= ATTACHED_TC_NETLINK;
            }
        }
    })
}

/// Notices interfaces that went away (or were replaced) while attached:
/// the kernel detached their programs; mark them so, keep their counters.
pub fn check_interfaces(maps: &PinnedMaps) -> Result<()> {
    for (slot, info) in maps.iface_slots()? {
        if info.attached == 0 {
            continue;
        }
        let name = iface_name(&info);
        if ifindex(&name).ok() != Some(info.ifindex) {
            warn!("interface {name} disappeared while attached: its programs are gone, its counters are kept");
            update_iface(maps, slot, |i| i.attached = 0)?;
        }
    }
    Ok(())
}

/// Clears the attached bits of every slot (the controller is going away).
pub fn mark_all_detached(maps: &PinnedMaps) -> Result<()> {
    for slot in 0..MAX_IFACES {
        update_iface(maps, slot, |info| {
            info.attached = 0;
            info.in_use = 0;
            info.ifindex = 0;
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_have_no_dot_and_name_their_interface() {
        let pin = link_pin(Path::new("/sys/fs/bpf/netwatch"), TC_NL, "eth0.100");
        assert_eq!(pin, Path::new("/sys/fs/bpf/netwatch/links/tcnl_eth0:100"));
        let name = pin.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_link_pin(name), Some((TC_NL, "eth0.100".to_string())));
        assert_eq!(parse_link_pin("tc_wg_home"), Some(("tc", "wg_home".to_string())));
        assert_eq!(
            parse_link_pin("tcqdisc_br-lan"),
            Some((TC_NL_QDISC, "br-lan".to_string()))
        );
    }
}
