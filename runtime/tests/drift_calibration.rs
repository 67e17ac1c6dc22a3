//! Calibration of the drift verdicts on the breast-cancer data.
//!
//! The reference is the 426 training rows of `fixtures/data/bc_train.csv`:
//! 30 features plus the label as a class output (standing in for the
//! model's predicted class, which has the same role in the sketch).
//!
//! - **False alarms**: 1,000 windows per size (100 … 10,000 samples), each
//!   drawn with replacement from the reference rows themselves, so the null
//!   holds exactly. A window is a false alarm if any of the 31 columns is
//!   flagged. Also the 143 held-out rows as one window.
//! - **Power**: the same bootstrap with one feature shifted by +0.5 of its
//!   reference standard deviation, for each of the 30 features in turn.
//! - **Sequential**: Page–Hinkley over runs of windows: quiet on
//!   drift-free sequences (including windows from the held-out rows, whose
//!   small persistent offset from the reference is not a change), alarming
//!   on a sustained shift too small for single windows.
//!
//! Windows are built from row multiplicities (a bootstrap window is a
//! multinomial draw over the reference rows), adding each row's bin index
//! times its multiplicity; the sketch is the runtime's own `DeviceSketch`
//! and the verdict the runtime's own `DriftReport::evaluate`. This keeps
//! 25,000 windows of up to 10,000 samples fast in a debug build; that
//! counting into sketches is right is tested in `drift_sketch.rs`.

use std::path::PathBuf;

use outpost_runtime::dataset::{read_csv, Dataset, LabelColumn, Labels};
use outpost_runtime::drift::{
    DeviceSketch, DriftReport, OutputValues, PageHinkley, ReferenceOptions, ReferenceOutput, ReferenceSketch,
    SequentialConfig, Thresholds,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

struct Setup {
    train: Dataset,
    test: Dataset,
    reference: ReferenceSketch,
    /// Per column (30 features then the label), the training rows' values.
    values: Vec<Vec<f32>>,
}

fn labels_f32(d: &Dataset) -> Vec<f32> {
    d.labels.as_ref().expect("labelled CSV").to_f32()
}

fn setup() -> Setup {
    let train = read_csv(fixtures().join("data/bc_train.csv"), LabelColumn::Last).expect("bc_train.csv");
    let test = read_csv(fixtures().join("data/bc_test.csv"), LabelColumn::Last).expect("bc_test.csv");
    let Some(Labels::Classes(labels)) = &train.labels else { panic!("integer labels expected") };
    let outputs = [ReferenceOutput { name: "label".into(), values: OutputValues::Classes(labels.clone()) }];
    let reference = ReferenceSketch::from_samples(&train.feature_names, &train.rows, &outputs, &ReferenceOptions::default())
        .expect("reference builds");
    let mut values: Vec<Vec<f32>> = (0..train.n_features()).map(|j| train.column(j).expect("column")).collect();
    values.push(labels_f32(&train));
    Setup { train, test, reference, values }
}

/// Per column and row: the row's bin (`None` for NaN) and value, computed
/// once so that a window costs one add per column and distinct row.
struct Prepared {
    bins: Vec<Vec<Option<usize>>>,
    values: Vec<Vec<f32>>,
}

fn prepare(reference: &ReferenceSketch, values: &[Vec<f32>]) -> Prepared {
    let bins = reference
        .columns()
        .zip(values)
        .map(|(r, col)| col.iter().map(|x| (!x.is_nan()).then(|| r.bins().bin(*x))).collect())
        .collect();
    Prepared { bins, values: values.to_vec() }
}

/// A window from row multiplicities: row i counted `mult[i]` times.
fn window(reference: &ReferenceSketch, p: &Prepared, mult: &[u64]) -> DeviceSketch {
    let mut s = DeviceSketch::empty(reference);
    let refs: Vec<_> = reference.columns().collect();
    for (c, col) in s.columns_mut().enumerate() {
        let shift = refs[c].shift();
        for (i, &m) in mult.iter().enumerate() {
            if m == 0 {
                continue;
            }
            let Some(bin) = p.bins[c][i] else {
                col.nan_count += m;
                continue;
            };
            col.counts[bin] += m;
            let x = p.values[c][i];
            if x.is_finite() {
                let d = f64::from(x) - shift;
                col.moments.count += m;
                col.moments.sum += m as f64 * d;
                col.moments.sum_sq += m as f64 * d * d;
                col.moments.min = col.moments.min.min(x);
                col.moments.max = col.moments.max.max(x);
            }
        }
    }
    s
}

/// SplitMix64: a few instructions per draw even in a debug build (a
/// generic RNG crate is monomorphised here at opt-level 0 and dominated the
/// run time), and plenty uniform for resampling 426 rows.
struct SplitMix(u64);

impl SplitMix {
    fn seed_from_u64(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; bias < n / 2^64).
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((u128::from(z) * n as u128) >> 64) as usize
    }
}

fn bootstrap(rng: &mut SplitMix, rows: usize, n: usize, mult: &mut Vec<u64>) {
    mult.clear();
    mult.resize(rows, 0);
    for _ in 0..n {
        mult[rng.below(rows)] += 1;
    }
}

const SIZES: [usize; 7] = [100, 200, 500, 1000, 2000, 5000, 10_000];

#[test]
fn false_alarm_rate_is_at_most_one_percent() {
    let s = setup();
    let th = Thresholds::default();
    let seq = SequentialConfig::default();
    let mut rng = SplitMix::seed_from_u64(0);
    let rows = s.train.len();
    let mut mult = Vec::new();
    let prepared = prepare(&s.reference, &s.values);
    println!("false alarms over 1,000 bootstrap windows from the reference (any of 31 columns flagged):");
    for &n in &SIZES {
        let mut alarms = 0;
        let mut worst: f64 = 0.0;
        // The same windows, in sequence, through Page–Hinkley per column.
        let mut detectors = vec![PageHinkley::default(); s.values.len()];
        let mut ph_alarm_windows = 0;
        for _ in 0..1000 {
            bootstrap(&mut rng, rows, n, &mut mult);
            let w = window(&s.reference, &prepared, &mult);
            let r = DriftReport::evaluate(&s.reference, &w, &th).expect("compatible");
            alarms += usize::from(r.drift);
            worst = worst.max(r.score);
            let mut any = false;
            for (col, d) in r.columns().zip(detectors.iter_mut()) {
                if let Some(t) = &col.test {
                    d.update(t.lower, &seq);
                }
                any |= d.alarm(&seq);
            }
            ph_alarm_windows += usize::from(any);
        }
        let rate = alarms as f64 / 1000.0;
        println!(
            "  n = {n:>6}: {alarms:>2} / 1000 = {:.1}% (largest score {worst:.2}); Page–Hinkley: {ph_alarm_windows} windows in alarm",
            rate * 100.0
        );
        assert!(rate <= 0.01, "false-alarm rate {rate} at n = {n}");
        assert_eq!(ph_alarm_windows, 0, "Page–Hinkley alarmed on a drift-free sequence at n = {n}");
    }
}

#[test]
fn held_out_rows_are_not_flagged() {
    let s = setup();
    let mut sketch = DeviceSketch::empty(&s.reference);
    let labels = labels_f32(&s.test);
    for (row, label) in s.test.rows.iter().zip(&labels) {
        sketch.push(&s.reference, row, std::slice::from_ref(label)).expect("31 columns");
    }
    let r = DriftReport::evaluate(&s.reference, &sketch, &Thresholds::default()).expect("compatible");
    println!("held-out window: {} samples, score {:.2}, flagged {:?}", r.window.samples, r.score, r.flagged());
    assert_eq!(r.window.samples, 143);
    assert!(!r.drift, "held-out rows flagged: {:?}", r.flagged());
}

/// Smallest window size at which a +0.5 sd shift in one feature is flagged
/// in at least 95% of windows, for every feature.
#[test]
fn half_sd_shift_in_one_feature_is_flagged() {
    let s = setup();
    let th = Thresholds::default();
    let mut rng = SplitMix::seed_from_u64(1);
    let rows = s.train.len();
    let mut mult = Vec::new();
    let sizes = [100, 200, 300, 500, 1000];
    let trials = 200;
    let mut needed = Vec::new();
    for j in 0..s.train.n_features() {
        let sd = s.reference.features[j].stats().expect("stats").std;
        let mut values = s.values.clone();
        for x in &mut values[j] {
            *x = (f64::from(*x) + 0.5 * sd) as f32;
        }
        let values = prepare(&s.reference, &values);
        let mut first = None;
        let mut powers = Vec::new();
        for &n in &sizes {
            let mut hits = 0;
            for _ in 0..trials {
                bootstrap(&mut rng, rows, n, &mut mult);
                let w = window(&s.reference, &values, &mult);
                let r = DriftReport::evaluate(&s.reference, &w, &th).expect("compatible");
                hits += usize::from(r.features[j].drift);
            }
            let power = hits as f64 / trials as f64;
            powers.push(power);
            if power >= 0.95 {
                // Larger windows only do better; stop here to keep the
                // debug-build run short.
                first = Some(n);
                break;
            }
        }
        println!("  {:<24} power at {:?}: {powers:?}", s.train.feature_names[j], &sizes[..powers.len()]);
        needed.push((first, j));
    }
    let worst = needed.iter().map(|(n, _)| n.unwrap_or(usize::MAX)).max().unwrap_or(0);
    println!("a +0.5 sd shift in any one feature is flagged in >= 95% of windows of {worst} samples");
    assert!(worst <= 500, "some feature needs more than 500 samples: {needed:?}");
}

/// A sustained +0.25 sd shift: too small for most single windows of 200 to
/// prove, caught by Page–Hinkley within a few windows.
#[test]
fn page_hinkley_catches_a_sustained_small_shift() {
    let s = setup();
    let th = Thresholds::default();
    let seq = SequentialConfig::default();
    let mut rng = SplitMix::seed_from_u64(2);
    let rows = s.train.len();
    let mut mult = Vec::new();
    let n = 200;
    let j = 0; // mean radius
    let sd = s.reference.features[j].stats().expect("stats").std;
    let mut shifted = s.values.clone();
    for x in &mut shifted[j] {
        *x = (f64::from(*x) + 0.25 * sd) as f32;
    }
    let (null, shifted) = (prepare(&s.reference, &s.values), prepare(&s.reference, &shifted));
    let mut delays = Vec::new();
    let mut window_hits = 0;
    let mut shifted_windows = 0;
    for _trial in 0..50 {
        let mut det = PageHinkley::default();
        for _ in 0..30 {
            bootstrap(&mut rng, rows, n, &mut mult);
            let r = DriftReport::evaluate(&s.reference, &window(&s.reference, &null, &mult), &th).expect("ok");
            det.update(r.features[j].test.as_ref().expect("test").lower, &seq);
            assert!(!det.alarm(&seq), "alarm before the shift");
        }
        let mut delay = None;
        for k in 1..=40 {
            bootstrap(&mut rng, rows, n, &mut mult);
            let r = DriftReport::evaluate(&s.reference, &window(&s.reference, &shifted, &mult), &th).expect("ok");
            window_hits += usize::from(r.features[j].drift);
            shifted_windows += 1;
            det.update(r.features[j].test.as_ref().expect("test").lower, &seq);
            if det.alarm(&seq) {
                delay = Some(k);
                break;
            }
        }
        delays.push(delay.unwrap_or(usize::MAX));
    }
    delays.sort_unstable();
    let median = delays[delays.len() / 2];
    let worst = delays[delays.len() - 1];
    println!(
        "0.25 sd shift, windows of {n}: single-window verdict flagged {window_hits}/{shifted_windows}; \
         Page–Hinkley alarm after median {median}, worst {worst} windows"
    );
    assert!(worst <= 15, "Page–Hinkley too slow: {delays:?}");
}

/// Windows drawn from the held-out rows differ from the reference by the
/// same small amount every time (two finite samples of one population).
/// That persistent offset must not build into a Page–Hinkley alarm.
#[test]
fn page_hinkley_ignores_a_persistent_reference_offset() {
    let s = setup();
    let th = Thresholds::default();
    let seq = SequentialConfig::default();
    let mut rng = SplitMix::seed_from_u64(3);
    let mut values: Vec<Vec<f32>> = (0..s.test.n_features()).map(|j| s.test.column(j).expect("column")).collect();
    values.push(labels_f32(&s.test));
    let values = prepare(&s.reference, &values);
    let mut detectors = vec![PageHinkley::default(); values.values.len()];
    let mut mult = Vec::new();
    let mut flagged_windows = 0;
    for _ in 0..300 {
        bootstrap(&mut rng, s.test.len(), 500, &mut mult);
        let r = DriftReport::evaluate(&s.reference, &window(&s.reference, &values, &mult), &th).expect("ok");
        flagged_windows += usize::from(r.drift);
        for (col, d) in r.columns().zip(detectors.iter_mut()) {
            d.update(col.test.as_ref().expect("test").lower, &seq);
            assert!(!d.alarm(&seq), "{}: Page–Hinkley alarm on a constant offset", col.name);
        }
    }
    println!("held-out bootstrap, 300 windows of 500: {flagged_windows} windows flagged by the single-window test");
}
