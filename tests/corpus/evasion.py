#!/usr/bin/env python3
"""The differential test's corpus: frames that try to slip udp/137 and
tcp/5190 past a filter, and the same frames on control ports (udp/53,
tcp/80), built with scapy, a packet library independent of netwatch.

Prints one JSON object per line. Each object is a *group*: one datagram (a
UDP read or one TCP SYN), sent as one or more frames (several for a
fragmented datagram):

    id        unique name, e.g. "v6-tcp5190-ext-mixed-7"
    case      the evasion technique, shared by the four targets
    desc      a short human description
    family    4 or 6
    target    "udp137", "tcp5190" (rule ports) or "udp53", "tcp80" (controls)
    proto     "udp" or "tcp";  dport: the destination port
    src       source address;  sport: source port, unique in the corpus, so
              a datagram read or a SYN-ACK maps back to exactly one group
    l2        "eth", "vlan", "qinq", "vlan3", "pppoe" or "vlan-pppoe"
    truncated whether the frames are cut short on purpose
    fail_closed  whether netwatch's documented fail-closed policy drops
              the group in enforce mode whatever its ports: an IPv6
              extension-header chain longer than --ext-walk, or a TCP first
              fragment without the whole TCP header (RFC 1858), or more
              than two VLAN tags
    frames    [{"eth": hex Ethernet frame,
                "l3": hex IP packet without L2 header (what an L3 device
                      such as tun receives), or null}]

Run by tests/tests/differential.rs with the addresses of its namespaces.
"""

import argparse
import json
import logging
import sys

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.all import raw  # noqa: E402
from scapy.layers.inet import IP, TCP, UDP, IPOption  # noqa: E402
from scapy.layers.inet import (  # noqa: E402
    IPOption_EOL,
    IPOption_LSRR,
    IPOption_NOP,
    IPOption_RR,
    IPOption_Router_Alert,
    IPOption_Timestamp,
)
from scapy.layers.inet6 import (  # noqa: E402
    HBHOptUnknown,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.layers.ipsec import AH  # noqa: E402
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.layers.ppp import PPP, PPPoE  # noqa: E402
from scapy.packet import Raw  # noqa: E402

TARGETS = {
    "udp137": ("udp", 137),
    "tcp5190": ("tcp", 5190),
    "udp53": ("udp", 53),
    "tcp80": ("tcp", 80),
}

NH_HOP, NH_ROUTING, NH_FRAG, NH_AH, NH_DEST = 0, 43, 44, 51, 60
NH_TCP, NH_UDP = 6, 17


class Ctx:
    def __init__(self, args):
        self.a = args
        self.next_sport = 20000
        self.out = []
        self.ids = set()

    def sport(self):
        self.next_sport += 1
        return self.next_sport


# ---------------------------------------------------------------------------
# Layer 4


def l4(proto, sport, dport, small=False, payload_len=24):
    """A UDP datagram or a TCP SYN (scapy computes the checksum once it
    sits under its IP header)."""
    if proto == "udp":
        data = b"nw" * (2 if small else payload_len // 2)
        return UDP(sport=sport, dport=dport) / Raw(data)
    opts = [] if small else [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (sport, 0)), ("NOP", None), ("WScale", 7)]
    return TCP(sport=sport, dport=dport, flags="S", seq=0x10000 * sport + 7, window=64240, options=opts)


def nh_of(proto):
    return NH_UDP if proto == "udp" else NH_TCP


# ---------------------------------------------------------------------------
# IPv6 extension headers, each given its next header explicitly


def ext(kind, nh, n=0):
    if kind == "dst":
        return IPv6ExtHdrDestOpt(nh=nh, options=[PadN(optdata=b"\0" * 4)])
    if kind == "dst-long":
        return IPv6ExtHdrDestOpt(nh=nh, options=[HBHOptUnknown(otype=0x1E, optdata=b"L" * 200)])
    if kind == "dst-9opts":
        return IPv6ExtHdrDestOpt(nh=nh, options=[HBHOptUnknown(otype=0x1E, optdata=b"o" * 2)] * 9)
    if kind == "dst-padn-long":
        return IPv6ExtHdrDestOpt(nh=nh, options=[PadN(optdata=b"\0" * 100)])
    if kind == "hbh":
        return IPv6ExtHdrHopByHop(nh=nh, options=[PadN(optdata=b"\0" * 4)])
    if kind == "rh0":
        return IPv6ExtHdrRouting(nh=nh, type=0, segleft=0, addresses=["2001:db8:ffff::99"])
    if kind == "rh4":
        # Segment routing header, segments left 0, one segment.
        return IPv6ExtHdrRouting(nh=nh, type=4, segleft=0, reserved=0, addresses=["2001:db8:ffff::99"])
    if kind == "frag":
        return IPv6ExtHdrFragment(nh=nh, offset=0, m=0, id=0x5000 + n)
    if kind == "ah":
        return AH(nh=nh, payloadlen=4, spi=0x100 + n, seq=1, icv=b"\xa5" * 12)
    raise ValueError(kind)


EXT_NH = {
    "dst": NH_DEST,
    "dst-long": NH_DEST,
    "dst-9opts": NH_DEST,
    "dst-padn-long": NH_DEST,
    "hbh": NH_HOP,
    "rh0": NH_ROUTING,
    "rh4": NH_ROUTING,
    "frag": NH_FRAG,
    "ah": NH_AH,
}


def ip6_with(c, exts, upper, upper_nh):
    """IPv6 / exts... / upper with every next-header field set."""
    kinds = list(exts)
    nhs = [EXT_NH[k] for k in kinds] + [upper_nh]
    pkt = IPv6(src=c.a.src6, dst=c.a.dst6, nh=nhs[0])
    for i, k in enumerate(kinds):
        pkt = pkt / ext(k, nhs[i + 1], i)
    return pkt / upper


def ip4_with(c, upper, proto, options=None, ident=1):
    return IP(src=c.a.src4, dst=c.a.dst4, id=ident, proto=nh_of(proto), options=options or []) / upper


# ---------------------------------------------------------------------------
# Fragmentation by hand: exact offsets, in any order


def frags4(c, proto, l4pkt, cuts, ident, options=None, order="in"):
    full = raw(ip4_with(c, l4pkt, proto, options, ident))
    ihl = (full[0] & 0x0F) * 4
    payload = full[ihl:]
    out = []
    for off, end in spans(cuts, len(payload)):
        more = end < len(payload)
        pkt = IP(
            src=c.a.src4,
            dst=c.a.dst4,
            id=ident,
            proto=nh_of(proto),
            flags="MF" if more else 0,
            frag=off // 8,
            options=options or [],
        ) / Raw(payload[off:end])
        out.append(raw(pkt))
    return out[::-1] if order == "reverse" else out


def frags6(c, proto, l4pkt, cuts, ident, pre=(), post=(), order="in"):
    """Fragments of IPv6 / pre... / Fragment / post... / L4: `pre` is the
    unfragmentable part, `post` headers travel in the fragments."""
    upper_nh = nh_of(proto)
    # Fragmentable part with its checksum computed over the whole datagram.
    full = raw(ip6_with(c, list(pre) + list(post), l4pkt, upper_nh))
    pre_len = sum(len(raw(ext(k, 0, i))) for i, k in enumerate(pre))
    fragmentable = full[40 + pre_len :]
    first_nh = EXT_NH[post[0]] if post else upper_nh
    out = []
    for off, end in spans(cuts, len(fragmentable)):
        more = end < len(fragmentable)
        kinds = list(pre)
        nhs = [EXT_NH[k] for k in kinds] + [NH_FRAG]
        pkt = IPv6(src=c.a.src6, dst=c.a.dst6, nh=nhs[0])
        for i, k in enumerate(kinds):
            pkt = pkt / ext(k, nhs[i + 1], i)
        pkt = pkt / IPv6ExtHdrFragment(nh=first_nh, offset=off // 8, m=1 if more else 0, id=ident)
        out.append(raw(pkt / Raw(fragmentable[off:end])))
    return out[::-1] if order == "reverse" else out


def spans(cuts, total):
    edges = [0] + [x for x in cuts if 0 < x < total] + [total]
    return list(zip(edges, edges[1:]))


# ---------------------------------------------------------------------------
# Layer 2


def l2_frame(c, family, ip_bytes, l2):
    eth = Ether(src=c.a.src_mac, dst=c.a.dst_mac)
    ethertype = 0x0800 if family == 4 else 0x86DD
    ppp = 0x0021 if family == 4 else 0x0057
    if l2 == "eth":
        frame = eth / Raw(ip_bytes)
        frame.type = ethertype
    elif l2 == "vlan":
        frame = eth / Dot1Q(vlan=20, type=ethertype) / Raw(ip_bytes)
    elif l2 == "qinq":
        frame = eth / Dot1AD(vlan=100, type=0x8100) / Dot1Q(vlan=20, type=ethertype) / Raw(ip_bytes)
    elif l2 == "vlan3":
        frame = (
            eth
            / Dot1AD(vlan=100, type=0x8100)
            / Dot1Q(vlan=20, type=0x8100)
            / Dot1Q(vlan=30, type=ethertype)
            / Raw(ip_bytes)
        )
    elif l2 == "pppoe":
        frame = eth / PPPoE(version=1, type=1, code=0, sessionid=0x1234) / PPP(proto=ppp) / Raw(ip_bytes)
        frame.type = 0x8864
    elif l2 == "vlan-pppoe":
        frame = (
            eth
            / Dot1Q(vlan=20, type=0x8864)
            / PPPoE(version=1, type=1, code=0, sessionid=0x1234)
            / PPP(proto=ppp)
            / Raw(ip_bytes)
        )
    else:
        raise ValueError(l2)
    return raw(frame)


def emit(c, case, desc, family, target, sport, ips, l2="eth", trailer=b"", truncated=False, fail_closed=False):
    """One group: `ips` are the IP packets (bytes) in sending order."""
    proto, dport = TARGETS[target]
    gid = f"v{family}-{target}-{case}"
    assert gid not in c.ids, gid
    c.ids.add(gid)
    frames = []
    for ip in ips:
        eth = l2_frame(c, family, ip, l2) + trailer
        frames.append({"eth": eth.hex(), "l3": (ip + trailer).hex()})
    c.out.append(
        {
            "id": gid,
            "case": case,
            "desc": desc,
            "family": family,
            "target": target,
            "proto": proto,
            "dport": dport,
            "src": c.a.src4 if family == 4 else c.a.src6,
            "sport": sport,
            "l2": l2,
            "truncated": truncated,
            "fail_closed": fail_closed,
            "frames": frames,
        }
    )


# ---------------------------------------------------------------------------
# The cases


def common(c, family, target):
    """Cases for both families: plain, trailers, tags and PPPoE, truncation."""
    proto, dport = TARGETS[target]

    def pkt(sport, small=False):
        up = l4(proto, sport, dport, small=small)
        if family == 4:
            return raw(ip4_with(c, up, proto, ident=sport))
        return raw(ip6_with(c, [], up, nh_of(proto)))

    s = c.sport()
    emit(c, "plain", "plain packet", family, target, s, [pkt(s)])

    s = c.sport()
    if family == 4:
        ip = pkt(s, small=True)
        pad = b"\0" * max(0, 60 - 14 - len(ip))
        emit(c, "eth-pad", f"short packet, Ethernet zero padding ({len(pad)} B) to 60", family, target, s, [ip], trailer=pad)
    else:
        emit(c, "eth-pad", "16 zero bytes after the IP packet", family, target, s, [pkt(s)], trailer=b"\0" * 16)
    s = c.sport()
    emit(c, "eth-trailer", "32 junk bytes after the IP packet", family, target, s, [pkt(s)], trailer=b"\xee" * 32)

    for l2, desc in [
        ("vlan", "802.1Q tag"),
        ("qinq", "802.1ad + 802.1Q tags"),
        ("vlan3", "three VLAN tags (802.1ad, 802.1Q, 802.1Q)"),
        ("pppoe", "PPPoE session (0x8864), PPP protocol " + ("0x0021" if family == 4 else "0x0057")),
        ("vlan-pppoe", "802.1Q tag, then PPPoE session"),
    ]:
        s = c.sport()
        # netwatch parses two tags; a deeper stack fails closed.
        emit(c, l2, desc, family, target, s, [pkt(s)], l2=l2, fail_closed=l2 == "vlan3")

    s = c.sport()
    ip = pkt(s)
    cut = 12 if family == 4 else 24
    emit(c, "trunc-ip", f"cut after {cut} bytes of the IP header", family, target, s, [ip[:cut]], truncated=True)
    s = c.sport()
    ip = pkt(s)
    hdr = 20 if family == 4 else 40
    cut = 4 if proto == "udp" else 10
    emit(
        c,
        "trunc-l4",
        f"cut after {cut} bytes of the {proto.upper()} header",
        family,
        target,
        s,
        [ip[: hdr + cut]],
        truncated=True,
    )


def ipv4_only(c, target):
    proto, dport = TARGETS[target]
    for ihl in range(6, 16):
        n = (ihl - 5) * 4
        opts = [IPOption_NOP()] * (n - 1) + [IPOption_EOL()]
        s = c.sport()
        ip = raw(ip4_with(c, l4(proto, s, dport), proto, opts, ident=s))
        assert (ip[0] & 0xF) == ihl
        emit(c, f"ipopt-ihl{ihl}", f"IPv4 options, IHL {ihl} (NOPs, EOL)", 4, target, s, [ip])

    for case, desc, opts in [
        ("ipopt-rr", "IPv4 record route option, IHL 15", [IPOption_RR(routers=["0.0.0.0"] * 9)]),
        ("ipopt-ts", "IPv4 timestamp option", [IPOption_Timestamp(flg=0, timestamp=[0] * 4)]),
        ("ipopt-ra", "IPv4 router alert option", [IPOption_Router_Alert()]),
        ("ipopt-lsrr", "IPv4 loose source route, route exhausted", [IPOption_LSRR(routers=[c.a.dst4], pointer=8)]),
        ("ipopt-unknown", "IPv4 unknown option 0x9e, 10 bytes", [IPOption(b"\x9e\x0a" + b"\0" * 8)]),
    ]:
        s = c.sport()
        ip = raw(ip4_with(c, l4(proto, s, dport), proto, opts, ident=s))
        emit(c, case, desc + f" (IHL {ip[0] & 0xF})", 4, target, s, [ip])

    # Fragments.
    s = c.sport()
    up = l4(proto, s, dport, payload_len=48)
    emit(c, "frag-in", "3 fragments, in order", 4, target, s, frags4(c, proto, up, [24, 48], s))
    s = c.sport()
    up = l4(proto, s, dport, payload_len=48)
    emit(c, "frag-rev", "3 fragments, reverse order", 4, target, s, frags4(c, proto, up, [24, 48], s, order="reverse"))
    if proto == "udp":
        s = c.sport()
        up = l4(proto, s, dport, payload_len=48)
        emit(c, "frag-udp8", "first fragment holds only the 8-byte UDP header", 4, target, s, frags4(c, proto, up, [8], s))
        s = c.sport()
        up = l4(proto, s, dport, payload_len=48)
        emit(
            c, "frag-first-only", "a lone first fragment (never completed)", 4, target, s, frags4(c, proto, up, [24], s)[:1]
        )
    else:
        for first in (8, 16):
            s = c.sport()
            emit(
                c,
                f"frag-tiny{first}",
                f"tiny fragment: first holds {first} bytes of the TCP header (RFC 1858)",
                4,
                target,
                s,
                frags4(c, proto, l4(proto, s, dport), [first], s),
                fail_closed=True,
            )
        s = c.sport()
        emit(
            c,
            "frag-tiny8-rev",
            "tiny fragment (8 bytes of TCP), sent in reverse order",
            4,
            target,
            s,
            frags4(c, proto, l4(proto, s, dport), [8, 24], s, order="reverse"),
            fail_closed=True,
        )
        for first, ihl in ((8, 15), (16, 10)):
            opts = [IPOption_NOP()] * ((ihl - 5) * 4 - 1) + [IPOption_EOL()]
            s = c.sport()
            emit(
                c,
                f"frag-tiny{first}-ihl{ihl}",
                f"tiny fragment ({first} bytes of TCP) behind IPv4 options, IHL {ihl}",
                4,
                target,
                s,
                frags4(c, proto, l4(proto, s, dport), [first], s, options=opts),
                fail_closed=True,
            )


def ipv6_only(c, target):
    proto, dport = TARGETS[target]
    unh = nh_of(proto)

    def one(case, desc, exts):
        s = c.sport()
        beyond = len(exts) > c.a.ext_walk
        emit(c, case, desc, 6, target, s, [raw(ip6_with(c, exts, l4(proto, s, dport), unh))], fail_closed=beyond)

    for n in range(1, 21):
        one(f"ext-dst-{n}", f"{n} destination options header(s)", ["dst"] * n)
    one("ext-dst-long", "destination options, one 200-byte option", ["dst-long"])
    one("ext-dst-9opts", "destination options holding 9 options", ["dst-9opts"])
    one("ext-padn-long", "destination options, one 100-byte PadN", ["dst-padn-long"])
    one("ext-hbh", "hop-by-hop options", ["hbh"])
    one("ext-hbh-dst", "hop-by-hop, then destination options", ["hbh", "dst"])
    one("ext-dst-hbh", "destination options, then hop-by-hop (not first)", ["dst", "hbh"])
    one("ext-rh0", "routing header type 0, segments left 0", ["rh0"])
    one("ext-rh4", "routing header type 4 (SRH), segments left 0", ["rh4"])
    one("ext-frag-atomic", "atomic fragment header (offset 0, M=0)", ["frag"])
    one("ext-frag-atomic-2", "two atomic fragment headers", ["frag", "frag"])
    one("ext-ah", "authentication header", ["ah"])
    one("ext-dst-ah", "destination options, then authentication header", ["dst", "ah"])
    one("ext-hbh-rh0-frag-dst", "hop-by-hop, routing 0, atomic fragment, long destination options", ["hbh", "rh0", "frag", "dst-long"])
    for n in (7, 9, 12, 16, 20):
        mixed = ["hbh", "rh0", "frag"] + ["dst-long" if i % 3 == 0 else "dst" for i in range(n - 3)]
        one(f"ext-mixed-{n}", f"chain of {n}: hop-by-hop, routing 0, atomic fragment, destination options", mixed)

    # Fragments.
    s = c.sport()
    up = l4(proto, s, dport, payload_len=48)
    emit(c, "frag-in", "3 fragments, in order", 6, target, s, frags6(c, proto, up, [24, 48], s))
    s = c.sport()
    up = l4(proto, s, dport, payload_len=48)
    emit(c, "frag-rev", "3 fragments, reverse order", 6, target, s, frags6(c, proto, up, [24, 48], s, order="reverse"))
    s = c.sport()
    up = l4(proto, s, dport, payload_len=48)
    emit(
        c,
        "frag-behind-ext",
        "2 fragments behind hop-by-hop and destination options",
        6,
        target,
        s,
        frags6(c, proto, up, [24], s, pre=["hbh", "dst"]),
    )
    s = c.sport()
    up = l4(proto, s, dport, payload_len=48)
    emit(
        c,
        "frag-ext-inside",
        "2 fragments, destination options inside the fragmentable part",
        6,
        target,
        s,
        frags6(c, proto, up, [32], s, post=["dst"]),
    )
    s = c.sport()
    up = l4(proto, s, dport, payload_len=48)
    emit(
        c,
        "frag-l4-in-second",
        "first fragment holds only a destination options header, L4 in the second (RFC 7112)",
        6,
        target,
        s,
        frags6(c, proto, up, [8], s, post=["dst"]),
    )
    if proto == "udp":
        s = c.sport()
        up = l4(proto, s, dport, payload_len=48)
        emit(c, "frag-udp8", "first fragment holds only the 8-byte UDP header", 6, target, s, frags6(c, proto, up, [8], s))
        s = c.sport()
        up = l4(proto, s, dport, payload_len=48)
        emit(
            c, "frag-first-only", "a lone first fragment (never completed)", 6, target, s, frags6(c, proto, up, [24], s)[:1]
        )
    else:
        for first in (8, 16):
            s = c.sport()
            emit(
                c,
                f"frag-tiny{first}",
                f"tiny fragment: first holds {first} bytes of the TCP header",
                6,
                target,
                s,
                frags6(c, proto, l4(proto, s, dport), [first], s),
            )
        s = c.sport()
        emit(
            c,
            "frag-tiny8-rev",
            "tiny fragment (8 bytes of TCP), sent in reverse order",
            6,
            target,
            s,
            frags6(c, proto, l4(proto, s, dport), [8, 24], s, order="reverse"),
        )
        s = c.sport()
        emit(
            c,
            "frag-tiny8-ext7",
            "tiny fragment (8 bytes of TCP) behind 7 extension headers",
            6,
            target,
            s,
            frags6(c, proto, l4(proto, s, dport), [8], s, pre=["hbh", "dst", "dst", "rh0", "dst", "dst"]),
        )

    # Truncated inside an extension header.
    s = c.sport()
    ip = raw(ip6_with(c, ["dst-long"], l4(proto, s, dport), unh))
    emit(c, "trunc-ext", "cut inside a destination options header", 6, target, s, [ip[:40 + 60]], truncated=True)
    s = c.sport()
    ip = raw(ip6_with(c, ["dst"] * 8, l4(proto, s, dport), unh))
    emit(c, "trunc-ext8", "8 destination options headers, cut inside the 8th", 6, target, s, [ip[:40 + 7 * 8 + 4]], truncated=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ext-walk", type=int, default=12, help="IPv6 extension headers netwatch walks")
    p.add_argument("--src4", default="198.18.20.1")
    p.add_argument("--dst4", default="198.18.20.2")
    p.add_argument("--src6", default="2001:db8:20::1")
    p.add_argument("--dst6", default="2001:db8:20::2")
    p.add_argument("--src-mac", default="02:00:00:00:20:01")
    p.add_argument("--dst-mac", default="02:00:00:00:20:02")
    c = Ctx(p.parse_args())
    for target in TARGETS:
        for family in (4, 6):
            common(c, family, target)
        ipv4_only(c, target)
        ipv6_only(c, target)
    sports = [g["sport"] for g in c.out]
    assert len(sports) == len(set(sports)), "source ports must be unique"
    for g in c.out:
        sys.stdout.write(json.dumps(g, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
