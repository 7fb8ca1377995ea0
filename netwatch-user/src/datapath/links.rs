//! Link notifications from the kernel: an rtnetlink socket subscribed to
//! `RTMGRP_LINK` (`RTM_NEWLINK`, `RTM_DELLINK`), read in `run`'s loop.
//! They only tell `run` when to look again (see
//! [`super::Datapath::follow_links`]); what is attached where is always
//! judged from the kernel's interfaces as they are then.

use std::os::fd::{AsRawFd as _, OwnedFd};

use anyhow::{Context as _, Result};
use nix::{
    errno::Errno,
    sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket},
};
use tokio::io::{Interest, unix::AsyncFd};

use super::tc::{attrs, c_string};

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
const IFINFOMSG: usize = 16;
/// Datagrams read per wake-up at most, so a storm of link changes cannot
/// hold the loop.
const MAX_READS: usize = 256;

/// One link notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// An interface appeared or changed (a new interface, a rename, up,
    /// down, a program attached).
    Changed { ifindex: u32, name: Option<String> },
    /// An interface was deleted (or left this network namespace).
    Deleted { ifindex: u32, name: Option<String> },
    /// The socket's buffer overflowed: notifications were lost.
    Lost,
}

/// The subscription; needs the tokio runtime's context to be made.
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl LinkEvents {
    pub fn subscribe() -> Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )
        .context("opening a netlink socket for link events")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK)).context("subscribing to link events (RTMGRP_LINK)")?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it
        // open (and its number unchanged) until it is dropped.
        let socket = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .context("registering the link event socket")?;
        Ok(Self {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Waits for notifications; returns those queued (at least one).
    /// Cancel-safe: nothing is read before the socket is readable.
    pub async fn next(&mut self) -> Result<Vec<LinkEvent>> {
        loop {
            let mut guard = self.socket.readable_mut().await?;
            let mut out = Vec::new();
            for _ in 0..MAX_READS {
                match recv(guard.get_inner().as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                    Ok(n) => parse(&self.buf[..n], &mut out),
                    Err(Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(Errno::EINTR) => {}
                    Err(Errno::ENOBUFS) => out.push(LinkEvent::Lost),
                    Err(err) => return Err(err).context("reading link events"),
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// The link notifications in one datagram.
fn parse(mut data: &[u8], out: &mut Vec<LinkEvent>) {
    while data.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || len > data.len() {
            return;
        }
        let payload = &data[NLMSG_HDR..len];
        if (kind == RTM_NEWLINK || kind == RTM_DELLINK) && payload.len() >= IFINFOMSG {
            let ifindex = u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes"));
            let name = attrs(payload, IFINFOMSG)
                .find(|(t, _)| *t == IFLA_IFNAME)
                .map(|(_, v)| c_string(v));
            out.push(if kind == RTM_NEWLINK {
                LinkEvent::Changed { ifindex, name }
            } else {
                LinkEvent::Deleted { ifindex, name }
            });
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One message: header, ifinfomsg, an IFLA_IFNAME attribute.
    fn message(kind: u16, ifindex: u32, name: &[u8]) -> Vec<u8> {
        let mut attr = Vec::new();
        attr.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
        attr.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        attr.extend_from_slice(name);
        attr.resize(attr.len().next_multiple_of(4), 0);
        let len = NLMSG_HDR + IFINFOMSG + attr.len();
        let mut msg = Vec::new();
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]); // flags, seq, pid
        msg.extend_from_slice(&[0; 4]); // family, pad, type
        msg.extend_from_slice(&ifindex.to_ne_bytes());
        msg.extend_from_slice(&[0; 8]); // flags, change
        msg.extend_from_slice(&attr);
        msg
    }

    #[test]
    fn link_notifications_are_read_with_index_and_name() {
        let mut data = message(RTM_DELLINK, 7, b"eth1\0");
        data.extend(message(RTM_NEWLINK, 9, b"ppp0\0"));
        data.extend(message(20, 9, b"x\0")); // RTM_NEWADDR: not a link
        let mut out = Vec::new();
        parse(&data, &mut out);
        assert_eq!(
            out,
            [
                LinkEvent::Deleted {
                    ifindex: 7,
                    name: Some("eth1".into())
                },
                LinkEvent::Changed {
                    ifindex: 9,
                    name: Some("ppp0".into())
                },
            ]
        );
        // A truncated message ends the datagram, never a panic.
        let mut out = Vec::new();
        parse(&data[..20], &mut out);
        assert!(out.is_empty());
    }
}
