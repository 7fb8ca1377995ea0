//! Library half of the benchmark's eBPF crate (empty): lets build
//! scripts depend on it.
#![no_std]
