//! The device's `/metrics` as Prometheus reads it: every family typed right
//! (what only grows is a counter named `…_total`), `outpost_build_info` naming
//! the program, and the standard process metrics of this very process —
//! scraped from a running server and checked by `promtool check metrics`.

mod server_support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use outpost_runtime::drift::DriftMonitor;
use outpost_runtime::server::{BuildInfo, ModelSlot, Server};
use serde_json::json;
use server_support::*;

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

/// `# TYPE` of every family in a text exposition, by family name.
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

/// The sample lines of `name` (exactly that name, any labels).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .collect()
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

/// The shape rules Prometheus relies on, for every family: counters end in
/// `_total`, nothing else does, and each family is declared once.
fn assert_well_typed(text: &str) {
    let all = types(text);
    for (name, kind) in &all {
        assert_eq!(kind == "counter", name.ends_with("_total"), "{name} is a {kind}:\n{text}");
        assert_eq!(all.iter().filter(|(n, _)| n == name).count(), 1, "{name} declared twice");
    }
}

/// A server whose model has a drift monitor, with `n` predictions counted
/// and one drift window closed.
fn drift_server(n: usize) -> (outpost_runtime::server::RunningServer, Arc<DriftMonitor>) {
    let (server, monitor) = start_with_drift();
    let (rows, _) = bc_test_rows();
    let mut c = Client::connect(server.local_addr());
    for row in rows.iter().cycle().take(n) {
        assert_eq!(c.post_json("/predict", &features_body(row)).status, 200);
    }
    monitor.close_window_now();
    (server, monitor)
}

#[test]
fn drift_counts_are_counters_and_the_exposition_passes_promtool() {
    let (server, _monitor) = drift_server(7);
    let mut c = Client::connect(server.local_addr());
    let r = c.get("/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();

    let (ok, said) = promtool_check(&text);
    assert!(ok && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
    assert_well_typed(&text);

    for family in ["outpost_drift_windows_closed_total", "outpost_drift_lifetime_samples_total"] {
        assert_eq!(type_of(&text, family).as_deref(), Some("counter"), "{family}:\n{text}");
    }
    assert_eq!(metric(&text, "outpost_drift_windows_closed_total", &[]), 1.0, "{text}");
    assert_eq!(metric(&text, "outpost_drift_lifetime_samples_total", &[]), 7.0, "{text}");
    // The old gauge names are gone, not kept beside the counters.
    assert!(samples(&text, "outpost_drift_windows_closed").is_empty(), "{text}");
    assert!(samples(&text, "outpost_drift_lifetime_samples").is_empty(), "{text}");
    // What goes up and down stays a gauge.
    for family in ["outpost_drift_detected", "outpost_drift_score", "outpost_drift_window_samples", "outpost_drift_column_flag"] {
        assert_eq!(type_of(&text, family).as_deref(), Some("gauge"), "{family}");
    }
    assert_eq!(type_of(&text, "outpost_model_swaps_total").as_deref(), Some("counter"));
    assert_eq!(type_of(&text, "outpost_http_requests_total").as_deref(), Some("counter"));

    // OpenMetrics names the family without `_total` and the sample with it.
    c.send("GET", "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")], b"");
    let om = c.read().text();
    assert!(om.contains("# TYPE outpost_drift_windows_closed counter\n"), "{om}");
    assert!(om.contains("\noutpost_drift_windows_closed_total 1\n"), "{om}");
    assert!(om.contains("# TYPE outpost_drift_lifetime_samples counter\n"), "{om}");
    assert!(om.contains("# TYPE process_cpu_seconds counter\n"), "{om}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
}

#[test]
fn build_info_and_process_metrics_describe_this_process() {
    let server = start_with("bc_mlp.onnx");
    let text = get(server.local_addr(), "/metrics").text();
    let (ok, said) = promtool_check(&text);
    assert!(ok && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
    assert_well_typed(&text);

    let info = samples(&text, "outpost_build_info");
    assert_eq!(info.len(), 1, "{text}");
    let line = info[0];
    assert!(line.ends_with(" 1"), "{line}");
    assert!(line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))), "{line}");
    assert!(line.contains("component=\"runtime\""), "{line}");
    assert!(line.contains(&format!("target=\"{}-{}", std::env::consts::ARCH, std::env::consts::OS)), "{line}");
    assert_eq!(type_of(&text, "outpost_build_info").as_deref(), Some("gauge"));

    // The server runs in this test's process: its numbers are ours.
    assert_eq!(type_of(&text, "process_cpu_seconds_total").as_deref(), Some("counter"));
    for g in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert_eq!(type_of(&text, g).as_deref(), Some("gauge"), "{g}:\n{text}");
        assert_eq!(samples(&text, g).len(), 1, "{g}");
    }
    let rss = metric(&text, "process_resident_memory_bytes", &[]);
    assert!(rss > 1e6, "a process with a loaded model holds more than 1 MB: {rss}");
    assert!(metric(&text, "process_virtual_memory_bytes", &[]) >= rss);
    let fds = metric(&text, "process_open_fds", &[]);
    // stdin, stdout, stderr and the listening socket at least.
    assert!(fds >= 4.0, "{fds}");
    assert!(metric(&text, "process_max_fds", &[]) >= fds);
    let start = metric(&text, "process_start_time_seconds", &[]);
    assert!(start <= now() + 2.0 && start > now() - 3600.0, "started at {start}, now {}", now());
    // The counter moves with CPU burnt, the start time does not. (Not
    // asserted on the first scrape alone: loading a small model can take
    // less than one clock tick, 10 ms, and read as 0.)
    let cpu = metric(&text, "process_cpu_seconds_total", &[]);
    assert!(cpu >= 0.0, "{cpu}");
    burn_cpu(std::time::Duration::from_millis(120));
    let again = get(server.local_addr(), "/metrics").text();
    let later = metric(&again, "process_cpu_seconds_total", &[]);
    assert!(later > cpu && later > 0.0, "{cpu} then {later}:\n{again}");
    assert_eq!(metric(&again, "process_start_time_seconds", &[]), start);
}

/// Keeps this thread busy for `how_long`.
fn burn_cpu(how_long: std::time::Duration) {
    let spin = std::time::Instant::now();
    let mut x = 0u64;
    while spin.elapsed() < how_long {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

#[test]
fn an_embedding_program_names_itself_once() {
    let slot = Arc::new(ModelSlot::with(deployed("bc_mlp.onnx")));
    let server = Server::start_as(BuildInfo::new("agent", "9.8.7"), config(), slot, Vec::new()).expect("starts");
    let text = get(server.local_addr(), "/metrics").text();
    let info = samples(&text, "outpost_build_info");
    assert_eq!(info.len(), 1, "one build_info, the caller's:\n{text}");
    assert!(info[0].contains("component=\"agent\"") && info[0].contains("version=\"9.8.7\""), "{}", info[0]);
    let (ok, said) = promtool_check(&text);
    assert!(ok && said.trim().is_empty(), "promtool: {said}");
    // And the JSON answers are untouched by all this.
    assert_eq!(post_json(server.local_addr(), "/predict", &json!({"features": bc_test_rows().0[0]})).status, 200);
}
