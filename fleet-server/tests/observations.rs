//! Observations on their own: recording and merging windows (version
//! separation, the memory bound), drift turns, and canary analysis on
//! synthetic telemetry.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use outpost_fleet::observations::{DriftAlert, Observations, MAX_WINDOWS};
use outpost_runtime::drift::{DeviceSketch, OutputValues, ReferenceOptions, ReferenceOutput, ReferenceSketch};
use outpost_runtime::protocol::{DriftSummary, LatencySketch, ModelRef, SketchMessage, Status, Telemetry, SKETCH_FORMAT, TELEMETRY_FORMAT};

/// Counts live heap bytes, to measure what observations hold.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}
#[global_allocator]
static A: Counting = Counting;
/// The memory test measures process-wide allocations: run it alone.
static SERIAL: Mutex<()> = Mutex::new(());

const HOUR: u64 = 3_600_000;
const T0: u64 = 1_800_000_000_000;

fn telemetry(version: &str, start: u64, end: u64, requests: u64, bad: u64, drift: Option<bool>) -> Telemetry {
    Telemetry {
        format: TELEMETRY_FORMAT,
        model: Some(ModelRef { name: "bc".into(), version: version.into() }),
        status: Status::Serving,
        committed: true,
        window_start_unix_ms: start,
        window_end_unix_ms: end,
        requests,
        input_errors: bad / 2,
        failures: bad - bad / 2,
        rows: requests,
        error_rate: 0.0,
        latency_p50_ms: Some(1.0),
        latency_p99_ms: Some(2.0),
        drift: drift.map(|d| DriftSummary {
            drift: d,
            score: if d { 1.7 } else { 0.3 },
            flagged: if d { vec!["mean radius".into()] } else { vec![] },
            samples: 500,
        }),
        memory_rss_bytes: None,
        dropped_while_offline: 0,
        uptime_secs: 1,
    }
}

/// A small reference: two features, one class output.
fn reference() -> ReferenceSketch {
    let rows: Vec<Vec<f32>> = (0..400).map(|i| vec![i as f32, (i % 37) as f32]).collect();
    let labels: Vec<i64> = (0..400).map(|i| (i % 2) as i64).collect();
    ReferenceSketch::from_samples(
        &["a", "b"],
        &rows,
        &[ReferenceOutput { name: "label".into(), values: OutputValues::Classes(labels) }],
        &ReferenceOptions::default(),
    )
    .expect("reference")
}

fn sketch(r: &ReferenceSketch, version: &str, start: u64, end: u64, latency_bucket: usize, n: u64, class_one_share: f64) -> SketchMessage {
    let mut d = DeviceSketch::empty(r);
    for i in 0..n {
        let label = if (i as f64) < class_one_share * n as f64 { 1.0 } else { 0.0 };
        d.push(r, &[(i % 400) as f32, (i % 37) as f32], &[label]).expect("push");
    }
    let mut buckets = vec![0; latency_bucket + 1];
    buckets[latency_bucket] = n;
    SketchMessage {
        format: SKETCH_FORMAT,
        model: ModelRef { name: "bc".into(), version: version.into() },
        window_start_unix_ms: start,
        window_end_unix_ms: end,
        drift: Some(d),
        latency: LatencySketch { buckets_log2_us: buckets },
    }
}

#[test]
fn windows_sum_per_version_and_never_mix() {
    let obs = Observations::new();
    obs.record_telemetry_at("d1", &telemetry("1.0.0", T0, T0 + 10_000, 100, 2, None), T0 + 10_000);
    obs.record_telemetry_at("d1", &telemetry("1.0.0", T0 + 10_000, T0 + 20_000, 100, 4, None), T0 + 20_000);
    // The device switches: the next window names 2.0.0.
    obs.record_telemetry_at("d1", &telemetry("2.0.0", T0 + 20_000, T0 + 30_000, 50, 10, None), T0 + 30_000);

    let w1 = obs.device_window("d1", "bc", "1.0.0", 0).expect("1.0.0");
    assert_eq!((w1.requests, w1.input_errors + w1.failures, w1.windows), (200, 6, 2));
    let w2 = obs.device_window("d1", "bc", "2.0.0", 0).expect("2.0.0");
    assert_eq!((w2.requests, w2.input_errors + w2.failures, w2.windows), (50, 10, 1));
    assert!((w2.error_rate() - 10.0 / 60.0).abs() < 1e-12);
    // `since` keeps windows that end at or after it.
    let w = obs.device_window("d1", "bc", "1.0.0", T0 + 20_000).expect("last window");
    assert_eq!((w.requests, w.windows), (100, 1));
    assert!(obs.device_window("d1", "bc", "1.0.0", T0 + 20_001).is_none());
    assert!(obs.device_window("d2", "bc", "1.0.0", 0).is_none());
    assert!(obs.device_window("d1", "other", "1.0.0", 0).is_none());
    // p99: telemetry's until a sketch arrives, then the merged sketch's.
    assert_eq!(w2.p99_ms(), Some(2.0));
    let r = reference();
    obs.record_sketch_at("d1", &sketch(&r, "2.0.0", T0 + 20_000, T0 + 30_000, 12, 50, 0.5), T0 + 30_000);
    let w2 = obs.device_window("d1", "bc", "2.0.0", 0).expect("2.0.0");
    assert_eq!(w2.p99_ms(), Some(8.192), "bucket 12's upper edge");
    assert_eq!(w2.windows, 1, "the sketch joined its telemetry window");
    assert_eq!(obs.window_spans("d1", "bc", "2.0.0"), vec![(T0 + 20_000, T0 + 30_000)]);
}

#[test]
fn rings_are_bounded_and_forget_old_windows() {
    let obs = Observations::new();
    for i in 0..200u64 {
        let (s, e) = (T0 + i * 10_000, T0 + (i + 1) * 10_000);
        obs.record_telemetry_at("d", &telemetry("1.0.0", s, e, 10, 0, None), e);
    }
    let spans = obs.window_spans("d", "bc", "1.0.0");
    assert!(spans.len() <= MAX_WINDOWS, "{} windows kept", spans.len());
    // Nothing was lost by merging: the sum covers all 200 windows (< 1 h).
    let w = obs.device_window("d", "bc", "1.0.0", 0).expect("window");
    assert_eq!((w.requests, w.windows), (2000, 200));
    // The newest window is still exact.
    assert_eq!(spans.last(), Some(&(T0 + 199 * 10_000, T0 + 200 * 10_000)));
    // Spans stay ordered and disjoint.
    assert!(spans.windows(2).all(|p| p[0].1 <= p[1].0), "{spans:?}");
    // An hour later, everything before is gone.
    let late = T0 + 200 * 10_000 + HOUR + 1;
    obs.record_telemetry_at("d", &telemetry("1.0.0", late - 10_000, late, 1, 0, None), late);
    let w = obs.device_window("d", "bc", "1.0.0", 0).expect("window");
    assert_eq!((w.requests, w.windows), (1, 1));
    // Versions per device are bounded too.
    for v in 0..10 {
        obs.record_telemetry_at("d", &telemetry(&format!("9.{v}.0"), late, late + 1, 1, 0, None), late + 1 + v);
    }
    assert!(obs.device_window("d", "bc", "9.9.0", 0).is_some());
    assert!(obs.device_window("d", "bc", "1.0.0", 0).is_none(), "the oldest version was evicted");
}

#[test]
fn drift_alerts_fire_once_per_turn() {
    let obs = Observations::new();
    let seen: Arc<Mutex<Vec<DriftAlert>>> = Arc::default();
    let sink = seen.clone();
    obs.set_alert_sink(Box::new(move |a| sink.lock().unwrap().push(a.clone())));
    let verdicts = [Some(false), Some(true), Some(true), Some(true), Some(false), Some(true), None, Some(true)];
    for (i, v) in verdicts.iter().enumerate() {
        let t = T0 + i as u64 * 10_000;
        obs.record_telemetry_at("d", &telemetry("1.0.0", t, t + 10_000, 10, 0, *v), t + 10_000);
    }
    let alerts = seen.lock().unwrap();
    assert_eq!(alerts.len(), 3, "false→true three times: {alerts:?}");
    assert_eq!(alerts[0].kind, "drift");
    assert_eq!(alerts[0].flagged, vec!["mean radius".to_string()]);
    assert_eq!((alerts[0].model.as_str(), alerts[0].version.as_str()), ("bc", "1.0.0"));
    assert_eq!(obs.drifting_devices(None), vec!["d".to_string()]);
    assert_eq!(obs.drifting_devices(Some(("bc", "2.0.0"))), Vec::<String>::new());
    let d = obs.device_drift("d").expect("verdict");
    assert_eq!((d.drift, d.flagged.len()), (Some(true), 1));
}

fn fleet_of(obs: &Observations, prefix: &str, version: &str, devices: usize, requests: u64, bad: u64) -> Vec<String> {
    (0..devices)
        .map(|i| {
            let id = format!("{prefix}{i}");
            obs.record_telemetry_at(&id, &telemetry(version, T0, T0 + 60_000, requests, bad, None), T0 + 60_000);
            id
        })
        .collect()
}

#[test]
fn canary_identical_fleets_are_not_worse() {
    let obs = Observations::new();
    let c = fleet_of(&obs, "c", "2.0.0", 10, 1_000, 20);
    let b = fleet_of(&obs, "b", "1.0.0", 90, 1_000, 20);
    let r = obs.compare("bc", &c, "2.0.0", &b, "1.0.0", T0);
    assert!(!r.worse, "{r:?}");
    let e = r.metrics.iter().find(|m| m.name == "error_rate").expect("error rate");
    let rate = 20.0 / 1020.0; // client errors count: 20 of 1,020 answered
    assert!((e.canary - rate).abs() < 1e-12 && (e.baseline - rate).abs() < 1e-12, "{e:?}");
    assert!(e.ci_low < 0.0 && e.ci_high > 0.0, "{e:?}");
}

#[test]
fn canary_doubled_error_rate_at_large_n_is_worse() {
    let obs = Observations::new();
    let c = fleet_of(&obs, "c", "2.0.0", 10, 1_000, 100); // ~9.1%
    let b = fleet_of(&obs, "b", "1.0.0", 90, 1_000, 50); // ~4.8%
    let r = obs.compare("bc", &c, "2.0.0", &b, "1.0.0", T0);
    assert!(r.worse, "{r:?}");
    let e = r.metrics.iter().find(|m| m.name == "error_rate").expect("error rate");
    assert!(e.significantly_worse && e.ci_low > 0.0 && e.difference > 0.04, "{e:?}");
}

#[test]
fn canary_small_n_is_not_significant() {
    let obs = Observations::new();
    // 10% vs 5%: doubled, over 20 and 40 requests.
    let c = fleet_of(&obs, "c", "2.0.0", 1, 18, 2);
    let b = fleet_of(&obs, "b", "1.0.0", 2, 19, 1);
    let r = obs.compare("bc", &c, "2.0.0", &b, "1.0.0", T0);
    assert!(!r.worse, "{r:?}");
    let e = r.metrics.iter().find(|m| m.name == "error_rate").expect("error rate");
    assert!(e.canary >= 2.0 * e.baseline - 1e-9 && e.ci_low < 0.0, "doubled, yet unproven: {e:?}");
}

#[test]
fn canary_windows_before_since_do_not_count() {
    let obs = Observations::new();
    // The canary failed badly before the stage started, fine since.
    obs.record_telemetry_at("c", &telemetry("2.0.0", T0, T0 + 10_000, 1_000, 900, None), T0 + 10_000);
    obs.record_telemetry_at("c", &telemetry("2.0.0", T0 + 10_000, T0 + 20_000, 10_000, 0, None), T0 + 20_000);
    let b = fleet_of(&obs, "b", "1.0.0", 5, 2_000, 0);
    let r = obs.compare("bc", &["c".to_string()], "2.0.0", &b, "1.0.0", T0 + 15_000);
    assert!(!r.worse, "{r:?}");
}

#[test]
fn canary_latency_and_predictions_from_sketches() {
    let r = reference();
    let obs = Observations::new();
    let mut c = Vec::new();
    let mut b = Vec::new();
    for i in 0..20 {
        let id = format!("b{i}");
        obs.record_telemetry_at(&id, &telemetry("1.0.0", T0, T0 + 60_000, 500, 0, None), T0 + 60_000);
        obs.record_sketch_at(&id, &sketch(&r, "1.0.0", T0, T0 + 60_000, 10, 500, 0.5), T0 + 60_000);
        b.push(id);
    }
    // Same reference (fingerprint): same bins. Canaries answer 4× slower
    // and predict class 1 for 80% instead of 50%.
    for i in 0..5 {
        let id = format!("c{i}");
        obs.record_telemetry_at(&id, &telemetry("2.0.0", T0, T0 + 60_000, 500, 0, None), T0 + 60_000);
        obs.record_sketch_at(&id, &sketch(&r, "2.0.0", T0, T0 + 60_000, 12, 500, 0.8), T0 + 60_000);
        c.push(id);
    }
    let report = obs.compare("bc", &c, "2.0.0", &b, "1.0.0", T0);
    let by = |n: &str| report.metrics.iter().find(|m| m.name.starts_with(n)).unwrap_or_else(|| panic!("{n} in {report:?}"));
    assert!(by("latency_p99_ms").significantly_worse, "{report:?}");
    assert!(by("latency_p50_ms").significantly_worse);
    let p = by("predictions:");
    assert!(p.significantly_worse && (p.difference - 0.3).abs() < 0.01, "{p:?}");
    assert!(!by("error_rate").significantly_worse);
    assert!(report.worse);
    // The same fleets compared with themselves: nothing.
    let same = obs.compare("bc", &b[..10], "1.0.0", &b[10..], "1.0.0", T0);
    assert!(!same.worse, "{same:?}");
}

/// 10,000 devices, each with a full ring of windows (telemetry, latency
/// and a classifier's output sketch) and the fleet-wide merges: the bytes
/// held must stay well under the fleet server's 300 MiB budget.
#[test]
fn memory_is_bounded() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let r = reference();
    // Prepared before measuring: one sketch message reused.
    let msg = sketch(&r, "1.0.0", 0, 0, 10, 200, 0.5);
    let before = LIVE.load(Ordering::Relaxed);
    let obs = Observations::new();
    let devices = 10_000;
    for w in 0..(MAX_WINDOWS as u64 + 4) {
        let (s, e) = (T0 + w * 10_000, T0 + (w + 1) * 10_000);
        let mut m = msg.clone();
        m.window_start_unix_ms = s;
        m.window_end_unix_ms = e;
        for d in 0..devices {
            let id = format!("device-{d:05}");
            obs.record_telemetry_at(&id, &telemetry("1.0.0", s, e, 200, 1, Some(false)), e);
            obs.record_sketch_at(&id, &m, e);
        }
    }
    let held = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    println!("entry sizes: telemetry {} B, sketch message {} B", std::mem::size_of::<Telemetry>(), std::mem::size_of::<SketchMessage>());
    let (n, windows) = obs.sizes();
    assert_eq!(n, devices);
    assert_eq!(windows, devices * MAX_WINDOWS);
    let per_device = held / devices;
    println!("observations: {devices} devices × {MAX_WINDOWS} windows hold {:.1} MiB ({per_device} B per device)", held as f64 / (1 << 20) as f64);
    assert!(held < 150 << 20, "{held} bytes held");
}

#[test]
fn sketches_must_fit_the_published_reference() {
    let published = Arc::new(reference());
    let obs = Observations::new();
    let source = published.clone();
    obs.set_reference_source(Box::new(move |m, v| (m == "bc" && v == "1.0.0").then(|| source.clone())));
    // Another reference (other data): same column count, other fingerprint.
    let rows: Vec<Vec<f32>> = (0..300).map(|i| vec![(i * 3) as f32, i as f32]).collect();
    let other = ReferenceSketch::from_samples(
        &["a", "b"],
        &rows,
        &[ReferenceOutput { name: "label".into(), values: OutputValues::Classes((0..300).map(|i| (i % 3) as i64).collect()) }],
        &ReferenceOptions::default(),
    )
    .expect("reference");
    obs.record_sketch_at("d1", &sketch(&published, "1.0.0", T0, T0 + 1, 10, 100, 0.5), T0 + 1);
    obs.record_sketch_at("d2", &sketch(&other, "1.0.0", T0, T0 + 1, 10, 100, 0.5), T0 + 1);
    obs.record_sketch_at("d3", &sketch(&published, "7.0.0", T0, T0 + 1, 10, 100, 0.5), T0 + 1);
    assert_eq!(obs.fingerprints("bc", "1.0.0"), vec![published.fingerprint()]);
    assert!(obs.fingerprints("bc", "7.0.0").is_empty(), "unpublished versions are not merged");
    let merged = obs.merged_sketch_at("bc", "1.0.0", published.fingerprint(), outpost_fleet::observations::Scope::Recent, T0 + 1).expect("merged");
    assert_eq!((merged.devices, merged.sketch.samples()), (vec!["d1".to_string()], 100));
    // Their latency still counts for the devices' windows.
    assert!(obs.device_window("d2", "bc", "1.0.0", 0).expect("window").p99_ms().is_some());
}
