//! How the TC egress program is attached: through TCX (a BPF link, Linux
//! 6.6 and newer) or as a `bpf` filter on a `clsact` qdisc through
//! netlink (any kernel netwatch runs on), and the few netlink requests
//! netwatch makes itself to find, remove and clean up after its filter.
//!
//! A netlink filter is not a BPF link and cannot be pinned. netwatch
//! records it by pinning the *program* the filter runs under the pin
//! directory's `links/` (see `datapath`), and finds the filter again by
//! that program's id in a dump of the interface's egress filters: a
//! filter is netwatch's only if it runs a program netwatch pinned, so
//! other tools' filters are never touched.

use std::{fmt, io, os::fd::AsRawFd as _};

use anyhow::{Context as _, Result, bail};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use serde::Deserialize;

/// The operator's choice (`tc_attach` in the config, `--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// TCX where the kernel has it, else netlink.
    #[default]
    Auto,
    /// TCX only (Linux 6.6+); refused where the kernel lacks it.
    Tcx,
    /// A clsact `bpf` filter through netlink, on any kernel.
    Netlink,
}

/// How TC egress is (to be) attached to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcPath {
    Tcx,
    Netlink,
}

impl TcPath {
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        }
    }
}

impl fmt::Display for TcPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Whether the kernel has TCX: a `BPF_PROG_QUERY` for the TCX egress hook
/// of `iface` succeeds on kernels with TCX (6.6+) and fails with EINVAL
/// on older ones. It attaches nothing.
pub fn tcx_supported(iface: &str) -> Result<bool> {
    match SchedClassifier::query_tcx(iface, TcAttachType::Egress) {
        Ok(_) => Ok(true),
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(err) => Err(err).with_context(|| format!("probing for TCX on interface {iface}")),
    }
}

/// The path a setting leads to on a kernel with or without TCX.
pub fn resolve(setting: TcAttach, tcx: bool, iface: &str) -> Result<TcPath> {
    match (setting, tcx) {
        (TcAttach::Auto, true) | (TcAttach::Tcx, true) => Ok(TcPath::Tcx),
        (TcAttach::Auto, false) | (TcAttach::Netlink, _) => Ok(TcPath::Netlink),
        (TcAttach::Tcx, false) => bail!(
            "tc_attach = \"tcx\" but this kernel has no TCX (Linux 6.6 or newer) for TC egress on {iface}; \
             use tc_attach = \"auto\" or \"netlink\" (--tc-attach auto|netlink)"
        ),
    }
}

// --- netlink -------------------------------------------------------------

const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;
const CLSACT_HANDLE: u32 = 0xffff_0000;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETQDISC: u16 = 38;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR: usize = 16;
const TCMSG: usize = 20;

/// The hook of a clsact qdisc a filter sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn parent(self) -> u32 {
        (TC_H_CLSACT & 0xffff_0000)
            | match self {
                Self::Ingress => TC_H_MIN_INGRESS,
                Self::Egress => TC_H_MIN_EGRESS,
            }
    }
}

/// One filter on a clsact hook, as a dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// `bpf`, `u32`, `flower`, ...
    pub kind: String,
    /// For `bpf` filters: the program's name and id.
    pub name: Option<String>,
    pub prog_id: Option<u32>,
}

struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        Ok(Self(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// Sends one request and collects the payloads of the replies until
    /// the ack (or the end of a dump). A negative ack is the error.
    fn request(&self, msg_type: u16, flags: u16, tcm: [u32; 4], attrs: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        let len = NLMSG_HDR + TCMSG + attrs.len();
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&1u32.to_ne_bytes()); // seq
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid
        // tcmsg: family, pad, pad16, ifindex, handle, parent, info
        buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        for word in tcm {
            buf.extend_from_slice(&word.to_ne_bytes());
        }
        buf.extend_from_slice(attrs);
        // SAFETY: buf is valid for len bytes.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        // A dump ends with NLMSG_DONE, a request with its ack; the bound
        // only guards against a kernel that never says either.
        for _ in 0..100_000 {
            // SAFETY: rx is valid for its length.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), rx.as_mut_ptr().cast(), rx.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let mut data = &rx[..n as usize];
            while data.len() >= NLMSG_HDR {
                let msg_len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
                if msg_len < NLMSG_HDR || msg_len > data.len() {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let payload = &data[NLMSG_HDR..msg_len];
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(
                            payload
                                .get(0..4)
                                .ok_or_else(|| io::Error::other("short netlink error"))?
                                .try_into()
                                .expect("4 bytes"),
                        );
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        return Ok(out);
                    }
                    _ => out.push((kind, payload.to_vec())),
                }
                data = &data[msg_len.next_multiple_of(4).min(data.len())..];
            }
        }
        Err(io::Error::other("netlink reply did not end"))
    }
}

/// Attributes of a netlink message payload after a header of `skip` bytes
/// (also read by `links`).
pub(super) fn attrs(payload: &[u8], skip: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload.get(skip..).unwrap_or(&[]);
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, value))
    })
}

pub(super) fn c_string(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// The filters on one clsact hook of an interface (none without clsact).
pub fn filters(ifindex: u32, hook: Hook) -> io::Result<Vec<Filter>> {
    let replies = Socket::open()?.request(RTM_GETTFILTER, NLM_F_DUMP, [ifindex, 0, hook.parent(), 0], &[])?;
    let mut out = Vec::new();
    for (kind, payload) in replies {
        if kind != RTM_NEWTFILTER || payload.len() < TCMSG {
            continue;
        }
        let word = |i: usize| u32::from_ne_bytes(payload[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes"));
        let (handle, info) = (word(1), word(3));
        // A dump also reports each priority's chain head, with handle 0.
        if handle == 0 {
            continue;
        }
        let mut filter = Filter {
            priority: (info >> 16) as u16,
            handle,
            kind: String::new(),
            name: None,
            prog_id: None,
        };
        for (t, value) in attrs(&payload, TCMSG) {
            match t {
                TCA_KIND => filter.kind = c_string(value),
                TCA_OPTIONS => {
                    for (o, v) in attrs(value, 0) {
                        match o {
                            TCA_BPF_NAME => filter.name = Some(c_string(v)),
                            TCA_BPF_ID if v.len() >= 4 => {
                                filter.prog_id = Some(u32::from_ne_bytes(v[..4].try_into().expect("4 bytes")))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(filter);
    }
    Ok(out)
}

/// Deletes one filter (the ETH_P_ALL filter aya attaches) by priority and
/// handle.
pub fn delete_filter(ifindex: u32, hook: Hook, filter: &Filter) -> io::Result<()> {
    let protocol = (libc::ETH_P_ALL as u16).to_be() as u32;
    let info = (u32::from(filter.priority) << 16) | protocol;
    Socket::open()?.request(
        RTM_DELTFILTER,
        NLM_F_ACK,
        [ifindex, filter.handle, hook.parent(), info],
        &[],
    )?;
    Ok(())
}

/// Whether the interface has a clsact qdisc.
pub fn has_clsact(ifindex: u32) -> io::Result<bool> {
    let replies = Socket::open()?.request(RTM_GETQDISC, NLM_F_DUMP, [ifindex, 0, 0, 0], &[])?;
    Ok(replies.iter().any(|(kind, payload)| {
        *kind == RTM_NEWQDISC
            && payload.len() >= TCMSG
            && u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes")) == ifindex
            && attrs(payload, TCMSG).any(|(t, v)| t == TCA_KIND && c_string(v) == "clsact")
    }))
}

/// Deletes the clsact qdisc of an interface (with every filter on it:
/// callers check there are none but netwatch's first).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    Socket::open()?.request(
        RTM_DELQDISC,
        NLM_F_ACK,
        [ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0],
        &attr(TCA_KIND, b"clsact\0"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_resolve_by_kernel() {
        assert_eq!(resolve(TcAttach::Auto, true, "eth0").unwrap(), TcPath::Tcx);
        assert_eq!(resolve(TcAttach::Auto, false, "eth0").unwrap(), TcPath::Netlink);
        assert_eq!(resolve(TcAttach::Netlink, true, "eth0").unwrap(), TcPath::Netlink);
        assert_eq!(resolve(TcAttach::Tcx, true, "eth0").unwrap(), TcPath::Tcx);
        let err = resolve(TcAttach::Tcx, false, "eth0").unwrap_err().to_string();
        assert!(
            err.contains("6.6") && err.contains("eth0") && err.contains("--tc-attach"),
            "{err}"
        );
    }

    #[test]
    fn attributes_round_trip() {
        let mut buf = attr(TCA_KIND, b"bpf\0");
        let mut nested = attr(TCA_BPF_NAME, b"netwatch_tc\0");
        nested.extend(attr(TCA_BPF_ID, &42u32.to_ne_bytes()));
        buf.extend(attr(TCA_OPTIONS, &nested));
        let got: Vec<_> = attrs(&buf, 0).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(got[0], (TCA_KIND, b"bpf\0".to_vec()));
        let inner: Vec<_> = attrs(&got[1].1, 0).collect();
        assert_eq!(c_string(inner[0].1), "netwatch_tc");
        assert_eq!(inner[1], (TCA_BPF_ID, &42u32.to_ne_bytes()[..]));
    }
}
