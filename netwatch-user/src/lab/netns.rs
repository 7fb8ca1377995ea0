//! Small helpers for work inside a named network namespace (the lab and
//! the tests): run a closure on a thread that entered it, and a plain
//! HTTP GET for the metrics endpoint there.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// Runs `f` on a thread that has entered `/run/netns/NAME`; the calling
/// thread's namespace is untouched.
pub fn run_in<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // On this thread only.
            if let Err(errno) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
                bail!("entering {path}: {}", std::io::Error::from(errno));
            }
            Ok(f())
        })
        .join()
        .expect("thread in network namespace")
    })
}

/// A minimal HTTP/1.0 GET; returns the body of a 200 response.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let addr_parsed = addr.parse().map_err(std::io::Error::other)?;
    let mut stream = TcpStream::connect_timeout(&addr_parsed, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("{head}\n{body}")));
    }
    Ok(body.to_string())
}

/// A TCP connection from a chosen local IPv4 address (std cannot bind
/// before connecting): how the lab and the tests make many distinct web
/// visitors from one namespace.
pub fn tcp_connect_from(local: std::net::Ipv4Addr, remote: std::net::SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a descriptor we own, with valid
    // sockaddr_in structures.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let l = sockaddr(local, 0);
        let r = sockaddr(*remote.ip(), remote.port());
        if libc::bind(fd, &l as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &r as *const _ as *const libc::sockaddr, len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}
