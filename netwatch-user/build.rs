//! Builds the eBPF crate (netwatch-ebpf) for bpfel-unknown-none; the
//! object is embedded in the `netwatch` binary.

#[path = "../build-support/ebpf.rs"]
mod ebpf;

fn main() -> anyhow::Result<()> {
    ebpf::build_ebpf_crate("netwatch-ebpf")
}
