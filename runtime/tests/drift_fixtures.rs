//! Drift statistics against exact values computed by scipy.
//!
//! `fixtures/drift/cases.json` is written by `scripts/drift_reference.py`
//! from the breast-cancer split in `fixtures/data/` plus synthetic shifts
//! (ties, NaN, out-of-range values, tiny samples, a constant reference).
//! For every case this test rebuilds the reference with the runtime's own
//! binning rule and checks:
//!
//! - the bin edges and both count vectors equal the script's exactly
//!   (the script implements the same rule independently);
//! - PSI and Jensen–Shannon distance on those bins equal scipy's to 1e-9;
//! - the exact two-sample KS D from `scipy.stats.ks_2samp` on the raw values
//!   lies inside the interval the runtime derives from the bins alone;
//! - for class columns, the (exact) total variation distance.

use std::path::PathBuf;

use outpost_runtime::dataset::{read_csv, LabelColumn};
use outpost_runtime::drift::{
    Bins, ColumnReference, DeviceSketch, DriftReport, ReferenceSketch, TestStatistic, Thresholds,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    bins: Option<usize>,
    edges: Option<Vec<f32>>,
    labels: Option<Vec<i64>>,
    reference_counts: Vec<u64>,
    sample_counts: Vec<u64>,
    psi: f64,
    js_distance: f64,
    ks_d: Option<f64>,
    tv: Option<f64>,
    reference: Option<Vec<Option<f32>>>,
    reference_bc_train_column: Option<usize>,
    sample: Option<Vec<Option<f32>>>,
    reference_labels: Option<Vec<i64>>,
    sample_labels: Option<Vec<i64>>,
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn values(v: &[Option<f32>]) -> Vec<f32> {
    v.iter().map(|x| x.unwrap_or(f32::NAN)).collect()
}

/// Report on a one-column reference, every sample size judged.
fn report_one(reference: ColumnReference, sample: &[f32]) -> DriftReport {
    let is_class = matches!(reference.bins(), Bins::Classes { .. });
    let (features, outputs) = if is_class { (vec![], vec![reference]) } else { (vec![reference], vec![]) };
    let sketch_ref = ReferenceSketch { features, outputs };
    let mut sketch = DeviceSketch::empty(&sketch_ref);
    for x in sample {
        let (f, o) = if is_class { (&[][..], std::slice::from_ref(x)) } else { (std::slice::from_ref(x), &[][..]) };
        sketch.push(&sketch_ref, f, o).expect("one value per column");
    }
    let thresholds = Thresholds { min_samples: 1, ..Thresholds::default() };
    DriftReport::evaluate(&sketch_ref, &sketch, &thresholds).expect("sketch built on this reference")
}

#[test]
fn statistics_match_scipy_on_every_case() {
    let text = std::fs::read_to_string(fixtures().join("drift/cases.json"))
        .expect("fixtures/drift/cases.json (run scripts/drift_reference.py)");
    let fixture: Fixture = serde_json::from_str(&text).expect("valid fixture JSON");
    let train = read_csv(fixtures().join("data/bc_train.csv"), LabelColumn::Last).expect("bc_train.csv");
    assert!(fixture.cases.len() >= 90, "{} cases", fixture.cases.len());

    let mut widest = 0.0f64;
    let mut worst_psi = 0.0f64;
    for case in &fixture.cases {
        let name = &case.name;
        let (reference, sample): (ColumnReference, Vec<f32>) = match case.kind.as_str() {
            "quantile" => {
                let ref_values = match (&case.reference, case.reference_bc_train_column) {
                    (Some(v), _) => values(v),
                    (None, Some(j)) => train.column(j).expect("column in range"),
                    _ => panic!("{name}: no reference"),
                };
                let bins = case.bins.expect("bins");
                let col = ColumnReference::quantile(name, &ref_values, bins).expect("reference builds");
                let Bins::Quantile { edges } = col.bins() else { panic!("{name}: not quantile") };
                assert_eq!(Some(edges), case.edges.as_ref(), "{name}: edges differ from the script's");
                (col, values(case.sample.as_ref().expect("sample")))
            }
            "classes" => {
                let col = ColumnReference::classes(name, case.reference_labels.as_ref().expect("labels"))
                    .expect("reference builds");
                let Bins::Classes { labels } = col.bins() else { panic!("{name}: not classes") };
                assert_eq!(Some(labels), case.labels.as_ref());
                let s = case.sample_labels.as_ref().expect("sample labels").iter().map(|x| *x as f32).collect();
                (col, s)
            }
            other => panic!("{name}: unknown kind {other}"),
        };
        let mut ref_counts = reference.counts().to_vec();
        ref_counts.push(reference.nan_count());
        assert_eq!(ref_counts, case.reference_counts, "{name}: reference counts");

        let report = report_one(reference, &sample);
        let col = report.columns().next().expect("one column");
        let psi = col.psi.expect("psi");
        let js = col.js_distance.expect("js");
        assert!((psi - case.psi).abs() <= 1e-9, "{name}: psi {psi} vs scipy {}", case.psi);
        assert!((js - case.js_distance).abs() <= 1e-9, "{name}: js {js} vs scipy {}", case.js_distance);
        assert!((0.0..=1.0).contains(&js));
        worst_psi = worst_psi.max((psi - case.psi).abs());
        let test = col.test.as_ref().expect("test at min_samples 1");
        assert_eq!(col.samples, case.sample_counts.iter().sum::<u64>(), "{name}: sample count");
        match test.statistic {
            TestStatistic::Ks => {
                let d = case.ks_d.expect("ks_d");
                // 1e-12: scipy's D is a difference of float64 fractions.
                assert!(
                    test.lower <= d + 1e-12 && d <= test.upper + 1e-12,
                    "{name}: exact D {d} outside [{}, {}]",
                    test.lower,
                    test.upper
                );
                widest = widest.max(test.upper - test.lower);
            }
            TestStatistic::Tv => {
                let tv = case.tv.expect("tv");
                assert!((test.lower - tv).abs() < 1e-12 && test.lower == test.upper, "{name}: tv");
            }
        }
    }
    println!("{} cases; largest |psi - scipy| {worst_psi:.2e}; widest KS interval {widest:.3}", fixture.cases.len());
}

#[test]
fn sample_counts_match_the_script() {
    // The same cases through the plain sketch API, comparing raw counts.
    let text = std::fs::read_to_string(fixtures().join("drift/cases.json")).expect("fixture");
    let fixture: Fixture = serde_json::from_str(&text).expect("valid fixture JSON");
    for case in fixture.cases.iter().filter(|c| c.kind == "quantile") {
        let edges = case.edges.clone().expect("edges");
        let sample = values(case.sample.as_ref().expect("sample"));
        let col = ColumnReference::with_bins(&case.name, Bins::Quantile { edges }, &sample).expect("bins valid");
        let mut counts = col.counts().to_vec();
        counts.push(col.nan_count());
        assert_eq!(counts, case.sample_counts, "{}", case.name);
    }
}
