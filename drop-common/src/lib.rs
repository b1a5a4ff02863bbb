//! Types shared by the XDP program (`drop-ebpf`) and user space (`drop-net`).
#![no_std]
