//! Builds the benchmark's own eBPF crate (`netwatch-bench-ebpf`: the
//! live-frames traffic generator and a bare XDP_DROP) for
//! bpfel-unknown-none, as netwatch-user/build.rs builds the product's;
//! the object is embedded in the benchmark (`bench::programs`).

#[path = "../build-support/ebpf.rs"]
mod ebpf;

fn main() -> anyhow::Result<()> {
    ebpf::build_ebpf_crate("netwatch-bench-ebpf")
}
