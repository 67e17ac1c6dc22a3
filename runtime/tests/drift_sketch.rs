//! Device sketches and the monitor: merging (property tests), the wire
//! encoding and its size, concurrent updates, windows, shipping, the report
//! and gauge surfaces, and detection delay on a live monitor.

use std::path::PathBuf;
use std::sync::Arc;

use outpost_runtime::dataset::{read_csv, Dataset, LabelColumn, Labels};
use outpost_runtime::drift::{
    DeviceSketch, DriftMonitor, DriftReport, MonitorConfig, OutputValues, ReferenceOptions, ReferenceOutput,
    ReferenceSketch, SketchError, Thresholds, WindowLength,
};
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A small reference: 3 features (one with ties) and a 3-class output.
fn small_reference() -> ReferenceSketch {
    let rows: Vec<Vec<f32>> = (0..200).map(|i| vec![i as f32 * 0.5, ((i * 7) % 13) as f32, (i % 5) as f32 - 2.0]).collect();
    let labels = (0..200).map(|i| [0i64, 1, 5][i % 3]).collect();
    let outputs = [ReferenceOutput { name: "class".into(), values: OutputValues::Classes(labels) }];
    ReferenceSketch::from_samples(&["a", "b", "c"], &rows, &outputs, &ReferenceOptions { bins: 8 })
        .expect("reference builds")
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -10.0f32..120.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(1e30f32),
    ]
}

fn samples() -> impl Strategy<Value = Vec<(Vec<f32>, f32)>> {
    let label = prop_oneof![Just(0.0f32), Just(1.0), Just(5.0), Just(2.0), Just(0.5), Just(f32::NAN)];
    prop::collection::vec((prop::collection::vec(value(), 3), label), 0..60)
}

fn sketch_of(reference: &ReferenceSketch, samples: &[(Vec<f32>, f32)]) -> DeviceSketch {
    let mut s = DeviceSketch::empty(reference);
    for (f, o) in samples {
        s.push(reference, f, std::slice::from_ref(o)).expect("3 features, 1 output");
    }
    s
}

fn merged(a: &DeviceSketch, b: &DeviceSketch) -> DeviceSketch {
    let mut m = a.clone();
    m.merge(b).expect("same reference");
    m
}

/// Equal counts, min and max; sums equal up to f64 rounding.
fn assert_same(a: &DeviceSketch, b: &DeviceSketch) {
    assert_eq!(a.reference, b.reference);
    for (x, y) in a.columns().zip(b.columns()) {
        assert_eq!(x.counts, y.counts);
        assert_eq!(x.nan_count, y.nan_count);
        assert_eq!(x.moments.count, y.moments.count);
        assert_eq!(x.moments.min.to_bits(), y.moments.min.to_bits());
        assert_eq!(x.moments.max.to_bits(), y.moments.max.to_bits());
        for (p, q) in [(x.moments.sum, y.moments.sum), (x.moments.sum_sq, y.moments.sum_sq)] {
            assert!((p - q).abs() <= 1e-9 * (1.0 + p.abs().max(q.abs())), "{p} vs {q}");
        }
    }
}

proptest! {
    // No regression files written into the source tree; failures print
    // their minimal case.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative_and_associative(a in samples(), b in samples(), c in samples()) {
        let r = small_reference();
        let (sa, sb, sc) = (sketch_of(&r, &a), sketch_of(&r, &b), sketch_of(&r, &c));
        // Commutative exactly (f64 addition is commutative bit for bit).
        prop_assert_eq!(merged(&sa, &sb), merged(&sb, &sa));
        // Associative: exact counts, sums up to rounding.
        assert_same(&merged(&merged(&sa, &sb), &sc), &merged(&sa, &merged(&sb, &sc)));
        // Merging equals sketching the concatenation.
        let all: Vec<_> = a.iter().chain(&b).chain(&c).cloned().collect();
        assert_same(&merged(&merged(&sa, &sb), &sc), &sketch_of(&r, &all));
        // The empty sketch is the identity.
        prop_assert_eq!(merged(&sa, &DeviceSketch::empty(&r)), sa.clone());
    }

    /// The monitor's request path (flattened, padded, counted bins) agrees
    /// with `DeviceSketch::push` (the reference's own `Bins::bin`), on edges
    /// exactly, -0.0, ±inf and NaN, with few bins (counted) and many
    /// (binary search).
    #[test]
    fn monitor_counts_like_the_plain_sketch(
        bins in prop_oneof![Just(3usize), Just(8), Just(32), Just(100)],
        picks in prop::collection::vec((0usize..250, prop_oneof![Just(0.0f32), Just(0.25), Just(-0.0), Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)]), 1..80),
    ) {
        let rows: Vec<Vec<f32>> = (0..250).map(|i| vec![(i as f32 - 100.0) * 0.5, (i % 9) as f32]).collect();
        let r = Arc::new(ReferenceSketch::from_samples(&["a", "b"], &rows, &[], &ReferenceOptions { bins }).expect("builds"));
        let m = DriftMonitor::new(r.clone(), MonitorConfig::default()).expect("valid");
        let mut plain = DeviceSketch::empty(&r);
        for (i, extra) in &picks {
            // A reference value itself (often exactly an edge), plus a special value.
            let sample = [rows[*i][0], *extra];
            m.observe(&sample, &[]).expect("2 features");
            plain.push(&r, &sample, &[]).expect("2 features");
        }
        let got = m.snapshot_and_roll();
        for (a, b) in got.columns().zip(plain.columns()) {
            prop_assert_eq!(&a.counts, &b.counts);
            prop_assert_eq!(a.nan_count, b.nan_count);
            prop_assert_eq!(a.moments.count, b.moments.count);
        }
    }

    #[test]
    fn postcard_round_trip(a in samples()) {
        let r = small_reference();
        let s = sketch_of(&r, &a);
        prop_assert_eq!(DeviceSketch::from_postcard(&s.to_postcard()).expect("decodes"), s);
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = DeviceSketch::from_postcard(&bytes);
        let _ = postcard::from_bytes::<ReferenceSketch>(&bytes);
    }
}

#[test]
fn merging_different_references_is_refused() {
    let r = small_reference();
    let other = ReferenceSketch::from_samples(&["a"], &[vec![1.0], vec![2.0]], &[], &ReferenceOptions::default())
        .expect("builds");
    let mut a = DeviceSketch::empty(&r);
    assert!(matches!(a.merge(&DeviceSketch::empty(&other)), Err(SketchError::ReferenceMismatch { .. })));
    assert!(DriftReport::evaluate(&other, &a, &Thresholds::default()).is_err());
}

struct Bc {
    train: Dataset,
    reference: Arc<ReferenceSketch>,
}

fn bc() -> Bc {
    let train = read_csv(fixtures().join("data/bc_train.csv"), LabelColumn::Last).expect("bc_train.csv");
    let Some(Labels::Classes(labels)) = &train.labels else { panic!("integer labels") };
    let outputs = [ReferenceOutput { name: "label".into(), values: OutputValues::Classes(labels.clone()) }];
    let reference = ReferenceSketch::from_samples(&train.feature_names, &train.rows, &outputs, &ReferenceOptions::default())
        .expect("reference builds");
    Bc { train, reference: Arc::new(reference) }
}

#[test]
fn wire_sizes_of_30_features() {
    let bc = bc();
    let reference_bytes = postcard::to_allocvec(&*bc.reference).expect("encodes").len();
    let labels = bc.train.labels.as_ref().expect("labels").to_f32();
    let mut window = DeviceSketch::empty(&bc.reference);
    for k in 0..1000 {
        let i = (k * 7919) % bc.train.len();
        window.push(&bc.reference, &bc.train.rows[i], &labels[i..=i]).expect("31 columns");
    }
    let window_bytes = window.to_postcard().len();
    // A lifetime of 10 million requests: counts need 3–4 varint bytes.
    let mut lifetime = window.clone();
    for col in lifetime.columns_mut() {
        col.counts.iter_mut().for_each(|c| *c *= 10_000);
        col.moments.count *= 10_000;
    }
    let lifetime_bytes = lifetime.to_postcard().len();
    let empty_bytes = DeviceSketch::empty(&bc.reference).to_postcard().len();
    println!(
        "postcard bytes: reference {reference_bytes}, empty sketch {empty_bytes}, \
         1,000-sample window {window_bytes}, 10M-sample lifetime {lifetime_bytes}"
    );
    assert!(window_bytes <= 4096 && lifetime_bytes <= 6144 && reference_bytes <= 8192);
}

#[test]
fn concurrent_updates_lose_nothing_and_shipping_conserves_samples() {
    let bc = bc();
    let config = MonitorConfig { window: WindowLength::Samples(700), shards: 2, ..MonitorConfig::default() };
    let monitor = Arc::new(DriftMonitor::new(bc.reference.clone(), config).expect("valid config"));
    let rows = Arc::new(bc.train.rows.clone());
    let labels = Arc::new(bc.train.labels.as_ref().expect("labels").to_f32());
    let shipped = Arc::new(std::sync::Mutex::new(DeviceSketch::empty(&bc.reference)));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (m, rows, labels, shipped) = (monitor.clone(), rows.clone(), labels.clone(), shipped.clone());
            std::thread::spawn(move || {
                for k in 0..3000 {
                    let i = (t * 1000 + k * 13) % rows.len();
                    m.observe(&rows[i], &labels[i..=i]).expect("31 columns");
                    if t == 0 && k % 500 == 0 {
                        // The agent shipping while requests run.
                        let s = m.snapshot_and_roll();
                        shipped.lock().expect("not poisoned").merge(&s).expect("same reference");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker finished");
    }
    let last = monitor.snapshot_and_roll();
    let mut total = shipped.lock().expect("not poisoned").clone();
    total.merge(&last).expect("same reference");

    // The same 12,000 samples counted single-threaded.
    let mut expected = DeviceSketch::empty(&bc.reference);
    for t in 0..4 {
        for k in 0..3000 {
            let i = (t * 1000 + k * 13) % rows.len();
            expected.push(&bc.reference, &rows[i], &labels[i..=i]).expect("31 columns");
        }
    }
    assert_eq!(total.samples(), 12_000);
    let lifetime = monitor.lifetime();
    for ((a, b), c) in total.columns().zip(expected.columns()).zip(lifetime.columns()) {
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.counts, c.counts);
        assert_eq!(a.moments.count, b.moments.count);
    }
    let report = monitor.report();
    assert!(report.window.complete);
    // A window closes on the first request after it is full and takes
    // everything counted by then; with 4 threads in a tight loop on fewer
    // cores, preemption mid-close lets it grow past 700 (exact sizes are
    // checked single-threaded below).
    assert!(report.window.index.is_some_and(|i| i >= 2), "{:?}", report.window);
    assert!(report.window.samples >= 700, "{:?}", report.window);
    assert_eq!(report.window.lifetime_samples, Some(12_000));
    // A repetitive but in-distribution stream: nothing to flag.
    assert!(!report.drift, "flagged {:?}", report.flagged());
}

#[test]
fn sample_windows_close_at_their_length() {
    let bc = bc();
    let config = MonitorConfig { window: WindowLength::Samples(100), ..MonitorConfig::default() };
    let monitor = DriftMonitor::new(bc.reference.clone(), config).expect("valid config");
    let labels = bc.train.labels.as_ref().expect("labels").to_f32();
    for k in 0..1050 {
        let i = (k * 31) % bc.train.len();
        monitor.observe(&bc.train.rows[i], &labels[i..=i]).expect("31 columns");
        if k % 100 == 99 {
            let r = monitor.report();
            assert_eq!(r.window.index, Some(k as u64 / 100));
            assert_eq!(r.window.samples, 100);
            assert_eq!(r.window.open_window_samples, Some(0));
        }
    }
    let r = monitor.report();
    assert_eq!((r.window.open_window_samples, r.window.lifetime_samples), (Some(50), Some(1050)));
    // Every closed window fed Page–Hinkley.
    assert_eq!(r.features[0].sequential.as_ref().map(|s| s.windows), Some(10));
    let batch: Vec<f32> = bc.train.rows[..60].iter().flatten().copied().collect();
    monitor.observe_batch(&batch, &labels[..60]).expect("60 rows");
    assert_eq!(monitor.report().window.index, Some(10));
}

#[test]
fn report_json_has_the_documented_shape_and_gauges_cover_every_column() {
    let bc = bc();
    let monitor = DriftMonitor::new(bc.reference.clone(), MonitorConfig::default()).expect("valid config");
    // Before any sample: a partial, empty window and no verdicts.
    let empty = monitor.report();
    assert!(!empty.window.complete && !empty.drift && empty.window.samples == 0);
    let labels = bc.train.labels.as_ref().expect("labels").to_f32();
    for (i, row) in bc.train.rows.iter().enumerate().take(300) {
        monitor.observe(row, &labels[i..=i]).expect("31 columns");
    }
    let v = serde_json::to_value(monitor.report()).expect("serialises");
    assert_eq!(v["window"]["complete"], false);
    assert_eq!(v["window"]["samples"], 300);
    assert_eq!(v["window"]["length"]["samples"], 500);
    let features = v["features"].as_array().expect("features array");
    assert_eq!(features.len(), 30);
    assert_eq!(features[0]["name"], "mean radius");
    assert!(features[0]["drift"].is_boolean());
    assert!(features[0]["test"]["lower"].as_f64().is_some_and(|x| x <= features[0]["test"]["upper"].as_f64().unwrap_or(-1.0)));
    assert!(features[0]["psi"].is_number() && features[0]["js_distance"].is_number());
    assert_eq!(v["outputs"][0]["name"], "label");
    assert_eq!(v["outputs"][0]["test"]["statistic"], "tv");
    let text = serde_json::to_string(&v).expect("text");
    assert!(!text.contains("NaN") && !text.contains("inf"));

    let gauges = monitor.gauges();
    let flags = gauges.iter().filter(|g| g.name == "outpost_drift_column_flag").count();
    assert_eq!(flags, 31);
    assert!(gauges.iter().all(|g| g.value.is_finite()));
    assert!(gauges.iter().any(|g| g.name == "outpost_drift_score"));
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let bc = bc();
    let monitor = DriftMonitor::new(bc.reference.clone(), MonitorConfig::default()).expect("valid config");
    assert!(monitor.observe(&[1.0; 29], &[0.0]).is_err());
    assert!(monitor.observe(&[1.0; 30], &[]).is_err());
    assert!(monitor.observe_batch(&[1.0; 61], &[0.0, 1.0]).is_err());
    assert!(monitor.observe_batch(&[], &[]).is_ok());
    // Non-finite values are data, not errors: counted as NaN / out of range.
    monitor.observe(&[f32::NAN; 30], &[f32::INFINITY]).expect("counted");
    let r = monitor.current_report();
    assert_eq!(r.features[0].nan_count, 1);
    assert_eq!(r.outputs[0].out_of_range, 1);
    let bad = MonitorConfig { window: WindowLength::Samples(0), ..MonitorConfig::default() };
    assert!(DriftMonitor::new(bc.reference.clone(), bad).is_err());
    let bad = MonitorConfig { thresholds: Thresholds { alpha: f64::NAN, ..Thresholds::default() }, ..MonitorConfig::default() };
    assert!(DriftMonitor::new(bc.reference.clone(), bad).is_err());
}

#[test]
fn time_windows_close_on_their_deadline() {
    let bc = bc();
    let config = MonitorConfig { window: WindowLength::Seconds(1), ..MonitorConfig::default() };
    let monitor = DriftMonitor::new(bc.reference.clone(), config).expect("valid config");
    let labels = bc.train.labels.as_ref().expect("labels").to_f32();
    for (i, row) in bc.train.rows.iter().enumerate().take(100) {
        monitor.observe(row, &labels[i..=i]).expect("31 columns");
    }
    assert!(!monitor.report().window.complete);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    monitor.tick();
    let r = monitor.report();
    assert!(r.window.complete, "{:?}", r.window);
    assert_eq!(r.window.samples, 100);
}

/// Detection delay on a live monitor with the default 500-sample windows:
/// 2,000 in-distribution samples, then every sample with `mean radius`
/// shifted by +0.5 reference sd. The delay counts samples from the shift
/// until `report().drift`.
#[test]
fn live_monitor_flags_a_half_sd_shift_within_1000_samples() {
    let bc = bc();
    let labels = bc.train.labels.as_ref().expect("labels").to_f32();
    let sd = bc.reference.features[0].stats().expect("stats").std;
    let mut delays = Vec::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        // xorshift64*: deterministic, dependency-free row picks.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as usize) % n
    };
    for trial in 0..10 {
        let monitor = DriftMonitor::new(bc.reference.clone(), MonitorConfig::default()).expect("valid config");
        // Start the shift at varying offsets within a window.
        let onset = 2000 + trial * 37;
        let mut row = vec![0.0f32; 30];
        let mut delay = None;
        for k in 0..onset + 3000 {
            let i = next(bc.train.len());
            row.copy_from_slice(&bc.train.rows[i]);
            if k >= onset {
                row[0] = (f64::from(row[0]) + 0.5 * sd) as f32;
            }
            monitor.observe(&row, &labels[i..=i]).expect("31 columns");
            if k % 50 == 49 {
                let r = monitor.report();
                if k < onset {
                    assert!(!r.drift, "false alarm before the shift at sample {k}: {:?}", r.flagged());
                } else if r.drift {
                    assert_eq!(r.flagged(), vec!["mean radius"]);
                    delay = Some(k + 1 - onset);
                    break;
                }
            }
        }
        delays.push(delay.unwrap_or(usize::MAX));
    }
    delays.sort_unstable();
    println!("live monitor, windows of 500: 0.5 sd shift in mean radius flagged after {delays:?} samples");
    assert!(delays.iter().all(|d| *d <= 1000), "{delays:?}");
}
