//! Code generation for the datapath: headers sit at any offset in a
//! frame, so the parser reads them as bytes (alignment 1). Without this
//! feature LLVM turns every multi-byte field read into single-byte loads
//! and shifts; with it, one load each, which the verifier allows on
//! packet and map pointers wherever the architecture has efficient
//! unaligned access (x86-64, arm64; the kernel checks, and refuses the
//! program on others). Stack accesses stay aligned: LLVM lays the stack
//! out itself.
fn main() {
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
}
