//! What the datapath enforces: rules, lists and mode, validated.

use std::{fmt, str::FromStr};

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;
pub use netwatch_common::{Action, Mode, Protocol, Role};
use netwatch_common::{MAX_CIDRS, MAX_RULES};

/// `IFACE[:wan|lan|host]`, as given to `--iface` and `interfaces = [...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceSpec {
    pub name: String,
    pub role: Role,
}

impl FromStr for IfaceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, role) = match s.split_once(':') {
            None => (s, Role::Host),
            Some((name, role)) => match Role::from_label(role) {
                Some(role) => (name, role),
                None => bail!("interface {s:?}: role {role:?} is not one of wan, lan, host"),
            },
        };
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            bail!("interface {s:?}: {name:?} is not a valid interface name (1-15 bytes, no '/' or space)");
        }
        Ok(IfaceSpec {
            name: name.to_string(),
            role,
        })
    }
}

/// `count` or `drop`, as `--rule` and the rules' `inbound`/`outbound`
/// name them.
pub fn parse_action(s: &str) -> Result<Action> {
    Action::from_label(s).ok_or_else(|| anyhow!("action {s:?} is not one of count, drop"))
}

/// Scan detection of a rule: a source is flagged when it reaches
/// `threshold` distinct destinations within `window_secs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detection {
    pub threshold: u32,
    pub window_secs: u32,
    /// Auto-block a flagged source on this rule's port for this long
    /// (enforce mode only); `None` = off (the default).
    pub block_secs: Option<u32>,
    /// Reply-aware flagging: a source is also flagged once its failed
    /// first contacts outnumber its answered ones by this many (0 = off).
    pub failed_contacts: u32,
    /// How long a first contact waits for its answer before it counts
    /// as failed.
    pub contact_secs: u32,
}

/// 20 distinct destinations in 5 minutes: Zeek's address-scan window
/// (25 hosts in 5 min), bro-simple-scan's knock-knock count (20 hosts),
/// between psad's danger level 1 (10) and Zeek's 25.
pub const DEFAULT_THRESHOLD: u32 = 20;
pub const DEFAULT_WINDOW_SECS: u32 = 300;
pub const DEFAULT_BLOCK_SECS: u32 = 3600;
/// Thresholds above this are beyond the sketch's stated accuracy.
pub const MAX_THRESHOLD: u32 = 2000;
pub const MAX_WINDOW_SECS: u32 = 86_400;
pub const MAX_BLOCK_SECS: u32 = 7 * 86_400;
/// Threshold random walk (Jung, Paxson, Berger, Balakrishnan 2004) with
/// their parameters: a benign host's first contact succeeds with
/// probability 0.8, a scanner's with 0.2, so each failure multiplies the
/// odds of scanning by 0.8 / 0.2 = 4 and each success divides them by 4;
/// deciding at odds of 99 (a false-positive rate of 1 % at a detection
/// rate of 99 %) takes ceil(ln 99 / ln 4) = 4 failures more than
/// successes.
pub const DEFAULT_FAILED_CONTACTS: u32 = 4;
/// A LAN or Internet name server answers within tens of milliseconds,
/// a Windows host's NetBIOS stack within one; two seconds leaves room
/// for a busy one and still flags a silent sweep within 3.5 s of its
/// fourth probe (the controller judges every half second).
pub const DEFAULT_CONTACT_SECS: u32 = 2;
pub const MAX_CONTACT_SECS: u32 = 60;

impl Default for Detection {
    fn default() -> Self {
        Detection {
            threshold: DEFAULT_THRESHOLD,
            window_secs: DEFAULT_WINDOW_SECS,
            block_secs: None,
            failed_contacts: DEFAULT_FAILED_CONTACTS,
            contact_secs: DEFAULT_CONTACT_SECS,
        }
    }
}

impl Detection {
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_THRESHOLD).contains(&self.threshold) {
            bail!(
                "threshold {} is out of range 2-{MAX_THRESHOLD} distinct destinations",
                self.threshold
            );
        }
        if !(1..=MAX_WINDOW_SECS).contains(&self.window_secs) {
            bail!("window_secs {} is out of range 1-{MAX_WINDOW_SECS}", self.window_secs);
        }
        if let Some(ttl) = self.block_secs
            && !(1..=MAX_BLOCK_SECS).contains(&ttl)
        {
            bail!("block_secs {ttl} is out of range 1-{MAX_BLOCK_SECS} (auto-blocks always expire)");
        }
        let max_failed = netwatch_common::CONTACTS_PER_WINDOW as u32;
        if self.failed_contacts != 0 && !(2..=max_failed).contains(&self.failed_contacts) {
            bail!(
                "failed_contacts {} is out of range 2-{max_failed} (0 turns reply-aware flagging off)",
                self.failed_contacts
            );
        }
        if !(1..=MAX_CONTACT_SECS).contains(&self.contact_secs) {
            bail!(
                "contact_secs {} is out of range 1-{MAX_CONTACT_SECS}",
                self.contact_secs
            );
        }
        Ok(())
    }
}

/// A (protocol, destination port) rule with an action per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub protocol: Protocol,
    pub port: u16,
    pub inbound: Action,
    pub outbound: Action,
    pub detection: Detection,
}

impl Rule {
    pub fn new(protocol: Protocol, port: u16, inbound: Action, outbound: Action) -> Result<Self> {
        if port == 0 {
            bail!("{}/0: port must be 1-65535", protocol.label());
        }
        let mut detection = Detection::default();
        // A one-way UDP service (udp/138 mailslots, syslog) never
        // answers: its every first contact would look failed. Reply-aware
        // flagging is on by default where answers are the protocol's:
        // NBNS (udp/137) and TCP.
        if protocol == Protocol::Udp && port != 137 {
            detection.failed_contacts = 0;
        }
        Ok(Rule {
            protocol,
            port,
            inbound,
            outbound,
            detection,
        })
    }
    pub fn label(&self) -> String {
        format!("{}/{}", self.protocol.label(), self.port)
    }
    /// udp/137 towards a recent web visitor is a reverse lookup.
    pub fn is_netbios_ns(&self) -> bool {
        self.protocol == Protocol::Udp && self.port == 137
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} inbound={} outbound={}",
            self.label(),
            self.inbound.label(),
            self.outbound.label()
        )
    }
}

pub fn parse_protocol(s: &str) -> Result<Protocol> {
    Protocol::from_label(s).ok_or_else(|| anyhow!("protocol {s:?} is not one of udp, tcp"))
}

pub fn parse_port(s: &str) -> Result<u16> {
    let port: u32 = s.parse().map_err(|_| anyhow!("port {s:?} is not a number"))?;
    if !(1..=65535).contains(&port) {
        bail!("port {port} is out of range 1-65535");
    }
    Ok(port as u16)
}

/// `PROTO/PORT[=ACTION | =INBOUND,OUTBOUND]`, as given to `--rule`.
/// Without an action the rule drops both ways (in enforce mode).
impl FromStr for Rule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let wrap = |e: anyhow::Error| {
            anyhow!(
                "rule {s:?}: {e:#} (expected PROTO/PORT[=ACTION|=INBOUND,OUTBOUND], e.g. udp/138=drop or tcp/445=count,drop)"
            )
        };
        let (target, actions) = s.split_once('=').unwrap_or((s, "drop"));
        let (proto, port) = target.split_once('/').ok_or_else(|| wrap(anyhow!("missing '/'")))?;
        let protocol = parse_protocol(proto).map_err(wrap)?;
        let port = parse_port(port).map_err(wrap)?;
        let (inbound, outbound) = match actions.split_once(',') {
            Some((i, o)) => (parse_action(i).map_err(wrap)?, parse_action(o).map_err(wrap)?),
            None => {
                let a = parse_action(actions).map_err(wrap)?;
                (a, a)
            }
        };
        Rule::new(protocol, port, inbound, outbound).map_err(wrap)
    }
}

/// The defaults: NetBIOS name service and AOL/ICQ OSCAR, dropped both
/// ways when the mode is `enforce`.
pub fn default_rules() -> Vec<Rule> {
    vec![
        Rule::new(Protocol::Udp, 137, Action::Drop, Action::Drop).expect("valid"),
        Rule::new(Protocol::Tcp, 5190, Action::Drop, Action::Drop).expect("valid"),
    ]
}

pub const DEFAULT_WEB_PORTS: [u16; 2] = [80, 443];
pub const MAX_WEB_PORTS: usize = netwatch_common::MAX_WEB_PORTS;
pub const DEFAULT_VISITOR_SECS: u32 = 120;

/// Parses a CIDR (or a bare address, taken as /32 or /128) and insists on
/// a network address, so `198.18.0.1/24` is caught as a likely typo.
pub fn parse_cidr(s: &str) -> Result<IpNet> {
    let net: IpNet = match s.parse() {
        Ok(net) => net,
        Err(_) => match s.parse::<std::net::IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                bail!("{s:?} is not a CIDR (e.g. 198.18.0.0/24, 2001:db8::/32) or an IP address")
            }
        },
    };
    if net.trunc() != net {
        bail!("{s:?} has host bits set; did you mean {}?", net.trunc());
    }
    Ok(net)
}

/// Rules, lists and mode: everything that a reload may change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub rules: Vec<Rule>,
    pub allowlist: Vec<IpNet>,
    pub blocklist: Vec<IpNet>,
    /// TCP ports whose visitors' NetBIOS reverse lookups are not scans.
    pub web_ports: Vec<u16>,
    /// How long a visitor is remembered.
    pub visitor_secs: u32,
}

impl Policy {
    /// The given rules and mode, no lists, default web ports.
    pub fn new(mode: Mode, rules: Vec<Rule>) -> Self {
        Policy {
            mode,
            rules,
            allowlist: vec![],
            blocklist: vec![],
            web_ports: DEFAULT_WEB_PORTS.to_vec(),
            visitor_secs: DEFAULT_VISITOR_SECS,
        }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<()> {
        if self.rules.len() > MAX_RULES as usize {
            bail!("{} rules given; at most {MAX_RULES} are supported", self.rules.len());
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if self.rules[..i]
                .iter()
                .any(|r| r.protocol == rule.protocol && r.port == rule.port)
            {
                bail!("rule {} is given twice", rule.label());
            }
        }
        for (name, list) in [("allowlist", &self.allowlist), ("blocklist", &self.blocklist)] {
            let v4 = list.iter().filter(|n| matches!(n, IpNet::V4(_))).count();
            if v4 > MAX_CIDRS as usize || list.len() - v4 > MAX_CIDRS as usize {
                bail!("{name} has more than {MAX_CIDRS} entries per address family");
            }
            // Sets and prefix walks, not pairwise scans: lists of 16 384
            // entries are checked on every start and reload.
            let mut seen = std::collections::HashSet::new();
            for net in list.iter() {
                if !seen.insert(*net) {
                    bail!("{name} lists {net} twice");
                }
            }
            for net in list.iter() {
                if let Some(wider) = covering(&seen, net, false) {
                    bail!("{name}: {net} overlaps {wider}, which already covers it; list one of them");
                }
            }
        }
        check_allow_block(&self.allowlist, &self.blocklist)
    }
}

/// The entry of `set` that contains `net` (`net` itself only when
/// `inclusive`), found by walking `net`'s shorter prefixes.
fn covering(set: &std::collections::HashSet<IpNet>, net: &IpNet, inclusive: bool) -> Option<IpNet> {
    let longest = if inclusive {
        net.prefix_len()
    } else {
        net.prefix_len().checked_sub(1)?
    };
    (0..=longest)
        .rev()
        .map(|len| IpNet::new(net.addr(), len).expect("shorter prefix").trunc())
        .find(|wider| set.contains(wider))
}

/// Refuses a blocklist entry inside an allowlist entry: the allowlist
/// always wins, so the block would never apply. The config and the
/// `block`/`allow` commands give the same answer.
pub fn check_allow_block<'a>(
    allowlist: impl IntoIterator<Item = &'a IpNet>,
    blocklist: impl IntoIterator<Item = &'a IpNet>,
) -> Result<()> {
    let allow: std::collections::HashSet<IpNet> = allowlist.into_iter().copied().collect();
    for block in blocklist {
        if let Some(allow) = covering(&allow, block, true) {
            bail!(
                "blocklist entry {block} is covered by allowlist entry {allow}; the allowlist always wins, so it would never apply"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl fmt::Debug>) -> String {
        format!("{:#}", r.expect_err("refused"))
    }

    /// The configuration, the command line and the JSON output name each
    /// variant by its label (netwatch-common's encodings).
    #[test]
    fn serde_and_clap_names_are_the_labels() {
        use clap::ValueEnum as _;
        fn check<T>(all: &[T], label: fn(T) -> &'static str)
        where
            T: Copy + fmt::Debug + PartialEq + serde::Serialize + serde::de::DeserializeOwned,
        {
            for v in all.iter().copied() {
                assert_eq!(serde_json::to_value(v).unwrap(), label(v), "{v:?}");
                let back: T = serde_json::from_value(label(v).into()).unwrap();
                assert_eq!(back, v);
            }
        }
        check(&Mode::ALL, Mode::label);
        check(&Role::ALL, Role::label);
        check(&Action::ALL, Action::label);
        for c in crate::detection::incidents::Classification::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.label());
        }
        let names: Vec<String> = Mode::value_variants()
            .iter()
            .map(|m| m.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(names, ["monitor", "enforce"]);
        assert_eq!(
            err(parse_action("reject")),
            "action \"reject\" is not one of count, drop"
        );
        assert_eq!(err(parse_protocol("icmp")), "protocol \"icmp\" is not one of udp, tcp");
        assert_eq!(
            err("eth0:dmz".parse::<IfaceSpec>()),
            "interface \"eth0:dmz\": role \"dmz\" is not one of wan, lan, host"
        );
    }

    #[test]
    fn rules_read_as_the_readme_writes_them() {
        let r: Rule = "udp/137".parse().unwrap();
        assert_eq!(
            (r.protocol, r.port, r.inbound, r.outbound),
            (Protocol::Udp, 137, Action::Drop, Action::Drop)
        );
        let r: Rule = "tcp/445=count".parse().unwrap();
        assert_eq!((r.inbound, r.outbound), (Action::Count, Action::Count));
        let r: Rule = "udp/137=count,drop".parse().unwrap();
        assert_eq!((r.inbound, r.outbound), (Action::Count, Action::Drop));
        assert_eq!(r.to_string(), "udp/137 inbound=count outbound=drop");
        assert!(r.is_netbios_ns());
        assert_eq!(
            default_rules().iter().map(Rule::label).collect::<Vec<_>>(),
            ["udp/137", "tcp/5190"]
        );
    }

    #[test]
    fn a_bad_rule_names_itself_and_the_expected_form() {
        for (rule, says) in [
            ("udp137", "missing '/'"),
            ("icmp/1", "protocol \"icmp\" is not one of udp, tcp"),
            ("udp/0", "port 0 is out of range 1-65535"),
            ("udp/65536", "out of range"),
            ("udp/x", "port \"x\" is not a number"),
            ("udp/137=block", "action \"block\" is not one of count, drop"),
            ("udp/137=count,", "action \"\" is not one of count, drop"),
        ] {
            let message = err(rule.parse::<Rule>());
            assert!(message.contains(&format!("rule {rule:?}")), "{message}");
            assert!(message.contains(says), "{rule}: {message}");
            assert!(message.contains("expected PROTO/PORT"), "{message}");
        }
    }

    #[test]
    fn cidrs_are_networks_and_bare_addresses_are_hosts() {
        assert_eq!(parse_cidr("198.18.0.0/24").unwrap().to_string(), "198.18.0.0/24");
        assert_eq!(parse_cidr("198.18.0.7").unwrap().to_string(), "198.18.0.7/32");
        assert_eq!(parse_cidr("2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
        assert_eq!(
            err(parse_cidr("198.18.0.1/24")),
            "\"198.18.0.1/24\" has host bits set; did you mean 198.18.0.0/24?"
        );
        assert!(err(parse_cidr("nonsense")).contains("is not a CIDR"));
    }

    #[test]
    fn interfaces_take_a_role() {
        let spec: IfaceSpec = "eth0:wan".parse().unwrap();
        assert_eq!((spec.name.as_str(), spec.role), ("eth0", Role::Wan));
        assert_eq!("eth1".parse::<IfaceSpec>().unwrap().role, Role::Host);
        assert!(err("eth0:dmz".parse::<IfaceSpec>()).contains("role \"dmz\" is not one of wan, lan, host"));
        assert!(err("a-name-of-16-bytes".parse::<IfaceSpec>()).contains("is not a valid interface name"));
    }

    #[test]
    fn validation_refuses_duplicates_overlaps_and_blocks_inside_the_allowlist() {
        let nets = |list: &[&str]| list.iter().map(|s| parse_cidr(s).unwrap()).collect::<Vec<_>>();
        let mut policy = Policy::new(Mode::Enforce, default_rules());
        policy.validate().unwrap();

        policy.rules.push("udp/137=count".parse().unwrap());
        assert_eq!(err(policy.validate()), "rule udp/137 is given twice");
        policy.rules = default_rules();

        policy.allowlist = nets(&["198.18.0.0/24", "198.18.0.0/24"]);
        assert_eq!(err(policy.validate()), "allowlist lists 198.18.0.0/24 twice");
        policy.allowlist = nets(&["198.18.0.0/16", "198.18.3.0/24"]);
        assert!(err(policy.validate()).contains("allowlist: 198.18.3.0/24 overlaps 198.18.0.0/16"));

        policy.allowlist = nets(&["198.18.0.0/24"]);
        policy.blocklist = nets(&["198.18.0.9/32", "2001:db8::/32"]);
        assert!(
            err(policy.validate())
                .contains("blocklist entry 198.18.0.9/32 is covered by allowlist entry 198.18.0.0/24")
        );
        policy.blocklist = nets(&["198.19.0.0/24", "2001:db8::/32"]);
        policy.validate().unwrap();

        policy.rules = (1..=MAX_RULES as u16 + 1)
            .map(|port| Rule::new(Protocol::Udp, port, Action::Drop, Action::Drop).unwrap())
            .collect();
        assert_eq!(
            err(policy.validate()),
            format!("{} rules given; at most {MAX_RULES} are supported", MAX_RULES + 1)
        );
    }
}
