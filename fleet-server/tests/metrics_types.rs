//! The fleet server's `/metrics` as Prometheus reads it: scraped from a
//! running `outpost-fleet serve`, checked by `promtool check metrics`, every
//! family typed right, `outpost_build_info` naming the fleet, and the standard
//! process metrics describing the server's process (not the test's).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

/// `promtool check metrics` on `text`: its exit status and what it said.
/// promtool comes with Debian's `prometheus` package (scripts/setup.sh).
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (install the prometheus package: scripts/setup.sh)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("promtool reads");
    let out = child.wait_with_output().expect("promtool exits");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn types(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect()
}

fn type_of(text: &str, family: &str) -> Option<String> {
    types(text).into_iter().find(|(n, _)| n == family).map(|(_, t)| t)
}

/// The sample lines of exactly `name` (any labels).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .collect()
}

/// The value of the one unlabelled sample `name`.
fn value(text: &str, name: &str) -> f64 {
    let lines = samples(text, name);
    assert_eq!(lines.len(), 1, "{name}:\n{text}");
    lines[0].rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{}", lines[0]))
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

#[test]
fn fleet_metrics_are_typed_named_and_describe_the_server_process() {
    let before_start = now();
    let fleet = Fleet::start();
    // Some activity, so labelled families have series.
    fleet.provision("metrics-dev-1");
    assert_eq!(http(fleet.api_port, "GET", "/v1/devices", None, "").expect("api").0, 401);
    let (status, text) = http_get(fleet.api_port, "/metrics").expect("metrics");
    assert_eq!(status, 200);

    let (ok, said) = promtool_check(&text);
    assert!(ok && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
    let all = types(&text);
    // Labelled families show once they have a series (publishes, MQTT
    // messages, refusals and rollouts' own come with traffic); the rule
    // below holds for them as for every family present.
    assert!(all.len() >= 15, "{text}");
    for (name, kind) in &all {
        // What only grows is a counter named `_total`; nothing else is.
        assert_eq!(kind == "counter", name.ends_with("_total"), "{name} is a {kind}");
        assert_eq!(all.iter().filter(|(n, _)| n == name).count(), 1, "{name} declared twice");
    }
    for counter in [
        "outpost_fleet_api_requests_total",
        "outpost_fleet_chunks_served_total",
        "outpost_fleet_chunk_bytes_total",
        "outpost_fleet_directives_total",
        "outpost_fleet_panics_total",
        "process_cpu_seconds_total",
    ] {
        assert_eq!(type_of(&text, counter).as_deref(), Some("counter"), "{counter}:\n{text}");
    }
    for gauge in ["outpost_fleet_devices", "outpost_fleet_drifting_devices", "outpost_fleet_rollouts", "outpost_build_info"] {
        assert_eq!(type_of(&text, gauge).as_deref(), Some("gauge"), "{gauge}:\n{text}");
    }
    assert!(samples(&text, "outpost_fleet_devices").iter().any(|l| l.ends_with(" 1")), "the provisioned device:\n{text}");

    let info = samples(&text, "outpost_build_info");
    assert_eq!(info.len(), 1, "{text}");
    assert!(info[0].contains("component=\"fleet\""), "{}", info[0]);
    assert!(info[0].contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))), "{}", info[0]);
    assert!(info[0].contains(&format!("target=\"{}-{}", std::env::consts::ARCH, std::env::consts::OS)), "{}", info[0]);
    assert!(info[0].ends_with(" 1"), "{}", info[0]);

    // The server process started after this test did (so these are its
    // numbers, not the test's), and within the last minute.
    let started = value(&text, "process_start_time_seconds");
    assert!(started >= before_start - 1.0 && started <= now() + 1.0, "started {started}, test began {before_start}");
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);
    assert!(value(&text, "process_virtual_memory_bytes") >= value(&text, "process_resident_memory_bytes"));
    let fds = value(&text, "process_open_fds");
    // stdio, the database, the API listener and the broker's listener.
    assert!(fds >= 5.0, "{fds}");
    assert!(value(&text, "process_max_fds") >= fds);
    assert!(value(&text, "process_cpu_seconds_total") >= 0.0);
    // Cross-check against the kernel's view of the child.
    let on_disk = std::fs::read_dir(format!("/proc/{}/fd", fleet.pid())).map(|d| d.count() as f64).unwrap_or(fds);
    assert!((fds - on_disk).abs() <= 8.0, "server says {fds} fds, /proc says {on_disk}");
}
