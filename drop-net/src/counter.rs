//! The XDP counter: load, attach, read, test-run.

use std::fmt;

use aya::TestRun as _;
use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::programs::{ProgramError, Xdp, xdp::XdpLinkId};
use aya::{Ebpf, EbpfError, TestRunOptions};
use drop_common::{DESTINATIONS_MAP, DstCount, DstKey, ETH_HLEN, PROGRAM, STATS_MAP, Stat};
use thiserror::Error;
use tracing::{info, warn};

use crate::report::{Count, Destination, Stats};

/// The object built by `cargo xtask build-ebpf`, or an empty slice when it was not built (see
/// build.rs).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drop-xdp.o"));

/// Errors of the XDP counter. Each message names only this layer's step; the kernel's or aya's
/// reason is the `source()`.
#[derive(Debug, Error)]
pub enum XdpError {
    #[error(
        "this drop-net was built without the XDP object; run `cargo xtask build-ebpf`, then rebuild"
    )]
    NotBuilt,
    #[error("loading the XDP object")]
    Load(#[source] EbpfError),
    #[error("the XDP object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("{action} XDP program {PROGRAM}")]
    Program {
        action: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching XDP program {PROGRAM} to {ifname} in {mode} mode")]
    Attach {
        ifname: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("already attached to {ifname}; detach first")]
    AlreadyAttached { ifname: String },
    #[error("reading map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("test frame of {len} bytes is shorter than an Ethernet header ({ETH_HLEN} bytes)")]
    FrameTooShort { len: usize },
    #[error("no free {what} slot in the balancer's maps")]
    Full { what: &'static str },
    #[error("filling the Maglev ring: {0}")]
    Maglev(String),
    #[error("MTU {0} is below IPv4's minimum of 68")]
    Mtu(u32),
    #[error("the balancer's pin folder {dir}")]
    PinDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning or taking over the balancer's XDP link: {0}")]
    Pin(String),
    #[error("a pinned map of another build: {0}")]
    PinnedLayout(String),
    #[error("not supported: {0}")]
    Unsupported(String),
}

/// How the program is attached (`ip link set dev IF xdpgeneric|xdpdrv|xdp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// In the kernel's network stack, after the skb is built (`xdpgeneric`); works on any device.
    Generic,
    /// In the driver, before any skb (`xdpdrv`); the device's driver must support XDP.
    Native,
    /// Native if the driver supports it, else generic (`xdp`).
    #[default]
    Auto,
}

impl XdpMode {
    pub(crate) fn to_aya(self) -> aya::programs::XdpMode {
        match self {
            XdpMode::Generic => aya::programs::XdpMode::Skb,
            XdpMode::Native => aya::programs::XdpMode::Driver,
            XdpMode::Auto => aya::programs::XdpMode::Default,
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Generic => "generic",
            XdpMode::Native => "native",
            XdpMode::Auto => "auto",
        })
    }
}

/// An XDP program's return value (`enum xdp_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpVerdict {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    /// Not an `xdp_action` the kernel knows.
    Unknown(u32),
}

impl From<u32> for XdpVerdict {
    fn from(action: u32) -> Self {
        match action {
            0 => XdpVerdict::Aborted,
            1 => XdpVerdict::Drop,
            2 => XdpVerdict::Pass,
            3 => XdpVerdict::Tx,
            4 => XdpVerdict::Redirect,
            n => XdpVerdict::Unknown(n),
        }
    }
}

/// Result of [`XdpCounter::test_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    pub verdict: XdpVerdict,
    /// Mean time of one run, as the kernel measured it.
    pub duration_ns: u64,
}

struct Attachment {
    ifname: String,
    mode: XdpMode,
    link: XdpLinkId,
}

/// The loaded counter program and its maps. Dropping it detaches the program and unloads it.
pub struct XdpCounter {
    ebpf: Ebpf,
    attached: Option<Attachment>,
}

impl XdpCounter {
    /// Loads the embedded object and verifies the program (`bpftool prog load`). Needs
    /// CAP_BPF/CAP_NET_ADMIN (root).
    pub fn load() -> Result<XdpCounter, XdpError> {
        Self::load_object(OBJECT)
    }

    /// Like [`XdpCounter::load`], from the given object bytes.
    pub fn load_object(object: &[u8]) -> Result<XdpCounter, XdpError> {
        if object.is_empty() {
            return Err(XdpError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(object).map_err(XdpError::Load)?;
        program_mut(&mut ebpf)?
            .load()
            .map_err(|source| XdpError::Program {
                action: "verifying and loading",
                source,
            })?;
        Ok(XdpCounter {
            ebpf,
            attached: None,
        })
    }

    /// Attaches the program to `ifname` of the calling thread's network namespace
    /// (`ip link set dev IFNAME xdp… obj …`).
    pub fn attach(&mut self, ifname: &str, mode: XdpMode) -> Result<(), XdpError> {
        if let Some(current) = &self.attached {
            return Err(XdpError::AlreadyAttached {
                ifname: current.ifname.clone(),
            });
        }
        let link = program_mut(&mut self.ebpf)?
            .attach(ifname, mode.to_aya())
            .map_err(|source| XdpError::Attach {
                ifname: ifname.to_owned(),
                mode,
                source,
            })?;
        info!(ifname, %mode, "xdp counter attached");
        self.attached = Some(Attachment {
            ifname: ifname.to_owned(),
            mode,
            link,
        });
        Ok(())
    }

    /// The interface and mode the program is attached with, if any.
    pub fn attached(&self) -> Option<(&str, XdpMode)> {
        self.attached.as_ref().map(|a| (a.ifname.as_str(), a.mode))
    }

    /// Detaches the program (`ip link set dev IFNAME xdp off`); does nothing when not attached.
    /// The program stays loaded and its counters keep their values.
    pub fn detach(&mut self) -> Result<(), XdpError> {
        let Some(attachment) = self.attached.take() else {
            return Ok(());
        };
        program_mut(&mut self.ebpf)?
            .detach(attachment.link)
            .map_err(|source| XdpError::Program {
                action: "detaching",
                source,
            })?;
        info!(ifname = attachment.ifname, "xdp counter detached");
        Ok(())
    }

    /// Frames and bytes per destination since the program was loaded, summed over all CPUs,
    /// sorted by destination.
    pub fn destinations(&self) -> Result<Vec<(Destination, Count)>, XdpError> {
        let map_err = |source| XdpError::Map {
            name: DESTINATIONS_MAP,
            source,
        };
        let map = self.ebpf.map(DESTINATIONS_MAP).ok_or(XdpError::Missing {
            what: "map",
            name: DESTINATIONS_MAP,
        })?;
        let map = PerCpuHashMap::<&MapData, DstKey, DstCount>::try_from(map).map_err(map_err)?;
        let mut out = map
            .iter()
            .map(|entry| {
                let (key, per_cpu) = entry.map_err(map_err)?;
                Ok((Destination::from(key), Count::sum(&per_cpu)))
            })
            .collect::<Result<Vec<_>, XdpError>>()?;
        out.sort_unstable_by_key(|(dst, _)| *dst);
        Ok(out)
    }

    /// The global counters, summed over all CPUs.
    pub fn stats(&self) -> Result<Stats, XdpError> {
        let map_err = |source| XdpError::Map {
            name: STATS_MAP,
            source,
        };
        let map = self.ebpf.map(STATS_MAP).ok_or(XdpError::Missing {
            what: "map",
            name: STATS_MAP,
        })?;
        let map = PerCpuArray::<&MapData, u64>::try_from(map).map_err(map_err)?;
        let mut slots: [Vec<u64>; Stat::ALL.len()] = Default::default();
        for (slot, stat) in slots.iter_mut().zip(Stat::ALL) {
            *slot = map.get(&stat.index(), 0).map_err(map_err)?.to_vec();
        }
        Ok(Stats::from_slots(&slots))
    }

    /// Runs the program `repeat` times (at least once) on `frame` with `BPF_PROG_TEST_RUN`, on
    /// the calling CPU and without any device. Each run counts like a received frame, so the
    /// counters grow by `repeat`.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRun, XdpError> {
        // The kernel refuses shorter input with a bare EINVAL; say why instead.
        if frame.len() < ETH_HLEN {
            return Err(XdpError::FrameTooShort { len: frame.len() });
        }
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .ok_or(MISSING_PROGRAM)?
            .try_into()
            .map_err(looking_up)?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat: repeat.max(1),
            ..Default::default()
        };
        let result = program.test_run(opts).map_err(|source| XdpError::Program {
            action: "test-running",
            source,
        })?;
        Ok(TestRun {
            verdict: XdpVerdict::from(result.return_value),
            duration_ns: u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX),
        })
    }
}

impl Drop for XdpCounter {
    fn drop(&mut self) {
        // Dropping `ebpf` would also close the link; detaching here logs a failure.
        if let Err(err) = self.detach() {
            warn!(error = %err, "detaching the xdp counter on drop");
        }
    }
}

const MISSING_PROGRAM: XdpError = XdpError::Missing {
    what: "program",
    name: PROGRAM,
};

fn looking_up(source: ProgramError) -> XdpError {
    XdpError::Program {
        action: "looking up",
        source,
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    ebpf.program_mut(PROGRAM)
        .ok_or(MISSING_PROGRAM)?
        .try_into()
        .map_err(looking_up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_object_says_how_to_build_it() {
        let err = XdpCounter::load_object(&[])
            .err()
            .expect("an empty object must not load");
        assert!(matches!(err, XdpError::NotBuilt));
        assert!(err.to_string().contains("cargo xtask build-ebpf"), "{err}");
    }

    #[test]
    fn verdicts_follow_xdp_action() {
        assert_eq!(XdpVerdict::from(0), XdpVerdict::Aborted);
        assert_eq!(XdpVerdict::from(2), XdpVerdict::Pass);
        assert_eq!(XdpVerdict::from(4), XdpVerdict::Redirect);
        assert_eq!(XdpVerdict::from(9), XdpVerdict::Unknown(9));
    }

    #[test]
    fn modes_map_onto_aya() {
        assert_eq!(XdpMode::Generic.to_aya(), aya::programs::XdpMode::Skb);
        assert_eq!(XdpMode::Native.to_aya(), aya::programs::XdpMode::Driver);
        assert_eq!(XdpMode::Auto.to_aya(), aya::programs::XdpMode::Default);
        assert_eq!(XdpMode::Native.to_string(), "native");
    }
}
