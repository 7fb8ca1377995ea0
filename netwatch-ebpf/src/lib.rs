//! Library half of the eBPF crate (empty): lets build scripts depend on it.
#![no_std]
