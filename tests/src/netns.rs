//! Network namespaces made by a test, removed when dropped.

use std::process::{Command, Output};

pub struct Netns {
    pub name: String,
}

fn check(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = crate::unique(tag);
        check(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> Output {
        check(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside the namespace (network only; the mount
    /// namespace, and so bpffs, stay the test's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        netwatch_user::lab::netns::run_in(&self.name, f).expect("enter network namespace")
    }

    /// `sysctl -qw SETTING` inside the namespace.
    pub fn sysctl(&self, setting: &str) {
        check(self.command("sysctl").args(["-qw", setting]));
    }

    /// TCP segments this namespace has sent, retransmissions included
    /// (`OutSegs` + `RetransSegs` of /proc/net/snmp: Linux leaves
    /// retransmitted segments out of `OutSegs`).
    pub fn tcp_segments_sent(&self) -> u64 {
        let snmp = String::from_utf8(check(self.command("cat").arg("/proc/net/snmp")).stdout).unwrap();
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().expect("Tcp: header"), tcp.next().expect("Tcp: values"));
        let field = |name: &str| -> u64 {
            let column = names
                .split_whitespace()
                .position(|n| n == name)
                .unwrap_or_else(|| panic!("{name} column"));
            values.split_whitespace().nth(column).unwrap().parse().unwrap()
        };
        field("OutSegs") + field("RetransSegs")
    }

    /// Makes `addr/len` a local range of this namespace, so probes to any
    /// address in it reach this host (a scan target range).
    pub fn local_range(&self, cidr: &str) {
        self.ip(&["route", "add", "local", cidr, "dev", "lo"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A veth pair between two namespaces, with an address on each end.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    check(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]));
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
}
