//! Metrics every Outpost process exposes, whatever it does: `outpost_build_info`
//! and the standard `process_*` metrics of the Prometheus client libraries,
//! so the dashboards and alert rules fleets already run work unchanged.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `outpost_build_info` | gauge, always 1 | `version`, `component` (`runtime`, `agent`, `fleet`), `target` |
//! | `process_cpu_seconds_total` | counter | (user + system CPU time) |
//! | `process_resident_memory_bytes` | gauge | |
//! | `process_virtual_memory_bytes` | gauge | |
//! | `process_open_fds` | gauge | |
//! | `process_max_fds` | gauge | (soft limit; absent when unlimited) |
//! | `process_start_time_seconds` | gauge | (Unix time) |
//!
//! The process metrics are read from `/proc/self` at each scrape (Linux);
//! a value the kernel does not give is left out, and on other systems none
//! is emitted, rather than a scrape failing. Both are [`Collector`]s: the
//! device server registers them itself (the agent gets them through it) and
//! the fleet server registers them in its own registry.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// `outpost_build_info`: which program, which version, built for what. The
/// caller names itself, since the runtime library is built into the agent
/// and the fleet server too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    component: &'static str,
    version: &'static str,
}

impl BuildInfo {
    /// `component` is the program (`runtime`, `agent`, `fleet`); `version`
    /// its crate's `env!("CARGO_PKG_VERSION")`. Both are compile-time
    /// strings, so nothing from outside reaches the labels.
    pub fn new(component: &'static str, version: &'static str) -> BuildInfo {
        BuildInfo { component, version }
    }

    /// The runtime's own: what `outpost-runtime serve` reports.
    pub fn runtime() -> BuildInfo {
        BuildInfo::new("runtime", env!("CARGO_PKG_VERSION"))
    }

    pub fn component(&self) -> &'static str {
        self.component
    }

    pub fn version(&self) -> &'static str {
        self.version
    }
}

/// What the binary was built for: `arch-os`, plus the C library when there
/// is one (`aarch64-linux-gnu`, `armv7`… shows as `arm-linux-musl`). Cargo
/// gives the full target triple only to build scripts; this is what the
/// compiler knows without one, and what tells device builds apart.
pub fn build_target() -> String {
    let env = if cfg!(target_env = "gnu") {
        "-gnu"
    } else if cfg!(target_env = "musl") {
        "-musl"
    } else if cfg!(target_env = "msvc") {
        "-msvc"
    } else {
        ""
    };
    format!("{}-{}{env}", std::env::consts::ARCH, std::env::consts::OS)
}

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = [("version", self.version), ("component", self.component), ("target", &build_target())];
        let gauge = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "outpost_build_info",
            "Version, component and build target of this program (value is always 1)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(family.encode_family(&labels)?)
    }
}

/// The standard `process_*` metrics of this process (module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(cpu) = s.cpu_seconds {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            ("process_resident_memory", "Resident memory size in bytes", Some(Unit::Bytes), s.resident_bytes),
            ("process_virtual_memory", "Virtual memory size in bytes", Some(Unit::Bytes), s.virtual_bytes),
            ("process_open_fds", "Number of open file descriptors", None, s.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors", None, s.max_fds),
            (
                "process_start_time",
                "Start time of the process since unix epoch in seconds",
                Some(Unit::Seconds),
                s.start_time_seconds,
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// One reading of the process; `None` for what could not be read.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self` now (Linux); all `None` elsewhere.
    pub fn read() -> ProcessStats {
        #[cfg(target_os = "linux")]
        {
            linux::read()
        }
        #[cfg(not(target_os = "linux"))]
        {
            ProcessStats::default()
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{BufRead, BufReader, Read};
    use std::sync::OnceLock;

    use super::ProcessStats;

    /// `/proc/self/stat` is one line of a few hundred bytes (the command
    /// name in it is at most 16); more than this means it is not that file.
    const STAT_LIMIT: u64 = 4096;
    /// `/proc/stat` grows with CPUs and interrupts; `btime` comes after
    /// them. Read once per process (the boot time does not change).
    const PROC_STAT_LIMIT: u64 = 4 << 20;

    pub(super) fn read() -> ProcessStats {
        let ticks = clock_ticks();
        let stat = read_stat();
        let field = |i: usize| stat.as_ref().and_then(|f| f.get(i).copied());
        ProcessStats {
            cpu_seconds: field(UTIME).zip(field(STIME)).map(|(u, s)| (u + s) as f64 / ticks),
            resident_bytes: field(RSS).map(|pages| pages as f64 * page_size()),
            virtual_bytes: field(VSIZE).map(|b| b as f64),
            open_fds: open_fds(),
            max_fds: max_fds(),
            start_time_seconds: field(STARTTIME).and_then(|start| boot_time().map(|boot| boot + start as f64 / ticks)),
        }
    }

    // Indices in the fields after the command name, i.e. proc(5)'s field
    // number minus 3 (field 3, `state`, is index 0).
    const UTIME: usize = 14 - 3;
    const STIME: usize = 15 - 3;
    const STARTTIME: usize = 22 - 3;
    const VSIZE: usize = 23 - 3;
    const RSS: usize = 24 - 3;

    /// The numeric fields of `/proc/self/stat` after `(comm)`; the command
    /// name may hold spaces and parentheses, so split after the last `)`.
    /// A field that is not a number (the state letter) reads as 0.
    fn read_stat() -> Option<Vec<u64>> {
        let mut text = String::new();
        std::fs::File::open("/proc/self/stat").ok()?.take(STAT_LIMIT).read_to_string(&mut text).ok()?;
        parse_stat(&text)
    }

    pub(super) fn parse_stat(text: &str) -> Option<Vec<u64>> {
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        (fields.len() > RSS).then_some(fields)
    }

    fn clock_ticks() -> f64 {
        // SAFETY: sysconf has no preconditions; it only reads a constant.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // 100 is what Linux has exported to user space on every architecture.
        if t > 0 {
            t as f64
        } else {
            100.0
        }
    }

    fn page_size() -> f64 {
        // SAFETY: as above.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            p as f64
        } else {
            4096.0
        }
    }

    /// Entries of `/proc/self/fd` (the directory's own descriptor included,
    /// as the Prometheus client libraries count it). Bounded by the fd limit.
    fn open_fds() -> Option<f64> {
        let dir = std::fs::read_dir("/proc/self/fd").ok()?;
        Some(dir.filter(|e| e.is_ok()).count() as f64)
    }

    fn max_fds() -> Option<f64> {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `limit` is a valid, writable rlimit for the call's duration.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as f64)
    }

    /// Boot time (Unix seconds) from `/proc/stat`'s `btime`, read once.
    fn boot_time() -> Option<f64> {
        static BOOT: OnceLock<Option<f64>> = OnceLock::new();
        *BOOT.get_or_init(|| {
            let file = std::fs::File::open("/proc/stat").ok()?;
            let mut reader = BufReader::new(file.take(PROC_STAT_LIMIT));
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).ok()? == 0 {
                    return None;
                }
                if let Some(v) = line.strip_prefix("btime ") {
                    return v.trim().parse::<u64>().ok().map(|b| b as f64);
                }
            }
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_after_a_command_name_with_spaces_and_parens() {
        let line = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 1 0 12345 8192000 300 18446744073709551615";
        let fields = linux::parse_stat(line).expect("parses");
        assert_eq!(fields[14 - 3], 150, "utime");
        assert_eq!(fields[15 - 3], 50, "stime");
        assert_eq!(fields[22 - 3], 12345, "starttime");
        assert_eq!(fields[23 - 3], 8_192_000, "vsize");
        assert_eq!(fields[24 - 3], 300, "rss");
        assert_eq!(linux::parse_stat("4242 (truncated"), None);
        assert_eq!(linux::parse_stat("4242 (x) S 1 2"), None, "too few fields");
    }

    #[test]
    fn this_process_reads_plausibly() {
        let s = ProcessStats::read();
        assert!(s.resident_bytes.is_some_and(|b| b > 0.0), "{s:?}");
        assert!(s.virtual_bytes >= s.resident_bytes, "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3.0), "{s:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        // Whole-second boot time and clock-tick start: a second or two of slack.
        assert!(s.start_time_seconds.is_some_and(|t| t <= now + 2.0 && t > now - 3600.0), "{s:?} now {now}");
        assert!(s.cpu_seconds.is_some_and(|c| c >= 0.0), "{s:?}");
    }

    #[test]
    fn build_target_names_arch_and_os() {
        let t = build_target();
        assert!(t.starts_with(std::env::consts::ARCH) && t.contains(std::env::consts::OS), "{t}");
    }
}
