//! The reference sketch: what the training data looked like, per column, in
//! a form the device can compare against in constant memory.
//!
//! A continuous column gets equal-mass bins whose edges are order statistics
//! of the reference values; a classifier output gets one bin per class seen
//! in the reference. The reference keeps the *integer counts* per bin and
//! derives probabilities as `count / n`, so two parties that build a sketch
//! from the same data get bit-identical sketches, and equality never depends
//! on floating-point rounding.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most bins a quantile column may have. More bins tighten the KS interval
/// (its width is at most about two bin masses) but make PSI noisier on small
/// windows and the sketch larger; 1,024 is far past any useful setting.
pub const MAX_BINS: usize = 1024;

/// Most classes a class column may have (a bigger label set is not a
/// classifier output Outpost can sketch in a few KiB).
pub const MAX_CLASSES: usize = 1024;

/// Default number of equal-mass bins per continuous column.
///
/// 32 bins keep the KS interval about 0.06 wide, so the verdict (which uses
/// the interval's lower end) loses little power, while a reference of a few
/// hundred rows still puts a dozen samples in each bin.
pub const DEFAULT_BINS: usize = 32;

/// Options for building a reference sketch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceOptions {
    /// Equal-mass bins per continuous column (1..=[`MAX_BINS`]). Ties in the
    /// data can merge bins, so a column may end up with fewer.
    pub bins: usize,
}

impl Default for ReferenceOptions {
    fn default() -> Self {
        ReferenceOptions { bins: DEFAULT_BINS }
    }
}

/// How a column's values are binned.
///
/// The bins of a column are laid out in one fixed order that every count
/// vector (reference and device) follows:
///
/// - `Quantile { edges }` with `edges = [e0, e1, …, ek]` (strictly increasing,
///   no NaN): bin 0 is the underflow `x < e0`; bin `i` (1 ≤ i ≤ k) is
///   `e(i-1) ≤ x < e(i)`; bin `k+1` is the overflow `x ≥ ek`. `e0` is the
///   smallest finite reference value and `ek` the next f32 above the largest,
///   so the reference itself never lands in under- or overflow; anything that
///   does on the device is out of the range the model was trained on.
///   In code: `bin(x) = edges.partition_point(|e| *e <= x)`, which is numpy's
///   `searchsorted(edges, x, side="right")`.
/// - `Classes { labels }` (strictly increasing): bin `i` is class
///   `labels[i]`, and the last bin is "other": a label the reference never
///   produced.
///
/// NaN is never in a bin; every column counts it separately.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Bins {
    Quantile { edges: Vec<f32> },
    Classes { labels: Vec<i64> },
}

impl Bins {
    /// Number of bins, under/overflow or "other" included (NaN excluded).
    pub fn len(&self) -> usize {
        match self {
            Bins::Quantile { edges } => edges.len() + 1,
            Bins::Classes { labels } => labels.len() + 1,
        }
    }

    /// Never true for a validated sketch; here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bin of a non-NaN value. Callers count NaN separately.
    #[inline]
    pub fn bin(&self, x: f32) -> usize {
        match self {
            Bins::Quantile { edges } => upper_bound(edges, x),
            Bins::Classes { labels } => class_bin(labels, x),
        }
    }

    /// Whether the bin at `index` is outside what the reference produced
    /// (under/overflow, or an unseen class).
    pub fn is_out_of_range(&self, index: usize) -> bool {
        match self {
            Bins::Quantile { edges } => index == 0 || index == edges.len(),
            Bins::Classes { labels } => index == labels.len(),
        }
    }

    pub fn kind(&self) -> ColumnKind {
        match self {
            Bins::Quantile { .. } => ColumnKind::Quantile,
            Bins::Classes { .. } => ColumnKind::Classes,
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            Bins::Quantile { edges } => {
                if edges.len() < 2 || edges.len() > MAX_BINS + 1 {
                    return Err(format!("{} bin edges, need 2..={}", edges.len(), MAX_BINS + 1));
                }
                if edges.iter().any(|e| e.is_nan()) {
                    return Err("a bin edge is NaN".into());
                }
                if edges.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("bin edges are not strictly increasing".into());
                }
            }
            Bins::Classes { labels } => {
                if labels.is_empty() || labels.len() > MAX_CLASSES {
                    return Err(format!("{} classes, need 1..={}", labels.len(), MAX_CLASSES));
                }
                if labels.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("class labels are not strictly increasing".into());
                }
            }
        }
        Ok(())
    }
}

/// Up to this many edges [`upper_bound`] counts rather than searches.
pub(crate) const COUNTED_EDGES: usize = 64;

/// Number of `edges` that are `<= x` (numpy's `searchsorted(…, "right")`),
/// for sorted `edges` and non-NaN `x`.
///
/// Up to 64 edges (the default 32 bins have 33) this *counts* the edges
/// `<= x` instead of binary-searching: independent comparisons with no
/// branch to mispredict and no dependent loads. A binary search is 6
/// dependent steps, and LLVM turns its select into a jump inside loops,
/// which costs ~2–3 mispredictions per random value (about 4× slower per
/// 31-column request). Beyond 64 edges the binary search wins. The
/// monitor's request path uses a two-level variant of the count (see
/// `monitor::count_blocked`); this one serves tools, tests and the plain
/// [`crate::drift::DeviceSketch::push`].
#[inline]
pub(crate) fn upper_bound(edges: &[f32], x: f32) -> usize {
    if edges.len() <= COUNTED_EDGES {
        edges.iter().map(|e| u32::from(*e <= x)).sum::<u32>() as usize
    } else {
        edges.partition_point(|e| *e <= x)
    }
}

#[inline]
pub(crate) fn class_bin(labels: &[i64], x: f32) -> usize {
    // Only an integral value can be a class; anything else is "other".
    // The range check keeps the `as` cast exact.
    if x.fract() == 0.0 && x.abs() < 9.0e18 {
        if let Ok(i) = labels.binary_search(&(x as i64)) {
            return i;
        }
    }
    labels.len()
}

/// Whether a column is continuous (quantile bins) or a set of classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnKind {
    Quantile,
    Classes,
}

/// Summary statistics of a continuous reference column over its finite
/// values (±inf and NaN are counted in the bins and `nan_count` only).
///
/// Never NaN: a quantile column needs at least one finite value, and a
/// single value has `std` 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceStats {
    pub finite_count: u64,
    pub min: f32,
    pub max: f32,
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator), 0 for one value.
    pub std: f64,
}

/// The reference of one input feature or model output.
///
/// Fields are private so that every instance, including one decoded from a
/// bundle, satisfies the invariants (deserialisation validates):
/// bins well formed, `counts.len() == bins.len()`, at least one sample, and
/// no NaN anywhere — so the derived `PartialEq` is an honest equality.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ColumnReferenceRepr")]
pub struct ColumnReference {
    name: String,
    bins: Bins,
    counts: Vec<u64>,
    nan_count: u64,
    stats: Option<ReferenceStats>,
}

/// The wire shape of [`ColumnReference`], validated on the way in.
/// Field order must match `ColumnReference` (postcard is positional).
#[derive(Deserialize)]
struct ColumnReferenceRepr {
    name: String,
    bins: Bins,
    counts: Vec<u64>,
    nan_count: u64,
    stats: Option<ReferenceStats>,
}

impl TryFrom<ColumnReferenceRepr> for ColumnReference {
    type Error = String;

    fn try_from(r: ColumnReferenceRepr) -> Result<Self, String> {
        let c = ColumnReference {
            name: r.name,
            bins: r.bins,
            counts: r.counts,
            nan_count: r.nan_count,
            stats: r.stats,
        };
        c.validate().map_err(|e| format!("column {:?}: {e}", c.name))?;
        Ok(c)
    }
}

impl ColumnReference {
    /// A continuous column from its reference values, with equal-mass bins.
    ///
    /// Edges: sort the finite values `v[0..m]`; cut points are
    /// `v[floor(i·m/bins)]` for `i = 1..bins`; the edges are `v[0]`, then each
    /// cut point greater than the previous edge (ties merge bins), then the
    /// next f32 above `v[m-1]`. `scripts/drift_reference.py` implements the
    /// same rule, so both sides agree bin for bin.
    pub fn quantile(name: &str, values: &[f32], bins: usize) -> Result<ColumnReference, ReferenceError> {
        if bins == 0 || bins > MAX_BINS {
            return Err(ReferenceError::BinCount { bins });
        }
        let mut finite: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if finite.is_empty() {
            return Err(ReferenceError::NoFiniteValues { column: name.to_string() });
        }
        finite.sort_by(f32::total_cmp);
        let m = finite.len();
        let mut edges = Vec::with_capacity(bins + 1);
        edges.push(finite[0]);
        for i in 1..bins {
            // i·m ≤ MAX_BINS · len fits easily in usize on 64-bit; on 32-bit
            // the u64 keeps it exact too.
            let idx = ((i as u64 * m as u64) / bins as u64) as usize;
            let cut = finite[idx];
            if edges.last().is_some_and(|last| cut > *last) {
                edges.push(cut);
            }
        }
        edges.push(next_up(finite[m - 1]));
        Self::with_bins(name, Bins::Quantile { edges }, values)
    }

    /// A class column (classifier output) from its reference labels.
    pub fn classes(name: &str, labels: &[i64]) -> Result<ColumnReference, ReferenceError> {
        if labels.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let mut distinct = labels.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() > MAX_CLASSES {
            return Err(ReferenceError::TooManyClasses { column: name.to_string(), classes: distinct.len() });
        }
        let bins = Bins::Classes { labels: distinct };
        let mut counts = vec![0u64; bins.len()];
        if let Bins::Classes { labels: l } = &bins {
            for x in labels {
                // Every label is present by construction; the fallback is
                // unreachable but cheaper to keep than to prove.
                let i = l.binary_search(x).unwrap_or(l.len());
                counts[i] += 1;
            }
        }
        Ok(ColumnReference { name: name.to_string(), bins, counts, nan_count: 0, stats: None })
    }

    /// A column with given bins, counting `values` into them. This is how
    /// tests and tools rebuild a reference on bins computed elsewhere.
    pub fn with_bins(name: &str, bins: Bins, values: &[f32]) -> Result<ColumnReference, ReferenceError> {
        bins.validate().map_err(|reason| ReferenceError::InvalidBins { column: name.to_string(), reason })?;
        if values.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let mut counts = vec![0u64; bins.len()];
        let mut nan_count = 0u64;
        for &x in values {
            if x.is_nan() {
                nan_count += 1;
            } else {
                counts[bins.bin(x)] += 1;
            }
        }
        let stats = match bins {
            Bins::Quantile { .. } => finite_stats(values),
            Bins::Classes { .. } => None,
        };
        Ok(ColumnReference { name: name.to_string(), bins, counts, nan_count, stats })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    pub fn kind(&self) -> ColumnKind {
        self.bins.kind()
    }

    /// Reference count per bin, in the layout of [`Bins`].
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    pub fn nan_count(&self) -> u64 {
        self.nan_count
    }

    /// Reference samples in this column, NaN included.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.nan_count
    }

    /// Reference probability of each bin, then of NaN as the last entry:
    /// `count / total`.
    pub fn probabilities(&self) -> Vec<f64> {
        let n = self.total() as f64;
        self.counts.iter().chain(std::iter::once(&self.nan_count)).map(|c| *c as f64 / n).collect()
    }

    /// Summary statistics (continuous columns only).
    pub fn stats(&self) -> Option<&ReferenceStats> {
        self.stats.as_ref()
    }

    /// The value device sketches centre their sums on (see
    /// [`crate::drift::Moments`]): the reference mean, or 0.
    pub fn shift(&self) -> f64 {
        self.stats.map(|s| s.mean).unwrap_or(0.0)
    }

    fn validate(&self) -> Result<(), String> {
        self.bins.validate()?;
        if self.counts.len() != self.bins.len() {
            return Err(format!("{} counts for {} bins", self.counts.len(), self.bins.len()));
        }
        if self.total() == 0 {
            return Err("no reference samples".into());
        }
        match (&self.bins, &self.stats) {
            (Bins::Quantile { .. }, Some(s)) => {
                let finite = [s.mean, s.std].iter().all(|v| v.is_finite()) && s.min.is_finite() && s.max.is_finite();
                if !finite || s.std < 0.0 || s.finite_count == 0 || s.min > s.max {
                    return Err("reference statistics are not finite or inconsistent".into());
                }
            }
            (Bins::Quantile { .. }, None) => return Err("quantile column without statistics".into()),
            (Bins::Classes { .. }, Some(_)) => return Err("class column with statistics".into()),
            (Bins::Classes { .. }, None) => {}
        }
        Ok(())
    }
}

/// Two-pass mean and standard deviation in f64 over the finite values.
fn finite_stats(values: &[f32]) -> Option<ReferenceStats> {
    let finite = || values.iter().copied().filter(|x| x.is_finite());
    let n = finite().count();
    if n == 0 {
        return None;
    }
    let mean = finite().map(f64::from).sum::<f64>() / n as f64;
    let ss: f64 = finite().map(|x| (f64::from(x) - mean).powi(2)).sum();
    let std = if n > 1 { (ss / (n - 1) as f64).sqrt() } else { 0.0 };
    let min = finite().fold(f32::INFINITY, f32::min);
    let max = finite().fold(f32::NEG_INFINITY, f32::max);
    Some(ReferenceStats { finite_count: n as u64, min, max, mean, std })
}

/// The smallest f32 greater than `x` (for finite `x`; `f32::next_up` is
/// newer than the workspace's minimum Rust).
pub(crate) fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let bits = x.to_bits();
    if x > 0.0 {
        f32::from_bits(bits + 1)
    } else {
        f32::from_bits(bits - 1)
    }
}

/// Reference values of one model output, as [`ReferenceSketch::from_samples`]
/// takes them.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputValues {
    /// A classifier's predicted labels: one bin per class.
    Classes(Vec<i64>),
    /// A regressor's values (or a score): equal-mass bins like a feature.
    Values(Vec<f32>),
}

/// One model output's name and reference values.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceOutput {
    pub name: String,
    pub values: OutputValues,
}

/// The reference a model version is monitored against: one
/// [`ColumnReference`] per input feature, then per model output.
///
/// Built once at bundle time from the reference (training) data and carried
/// in the signed manifest. Postcard-encoded it is a few KiB for 30 features.
///
/// Equality is exact and safe to rely on: no field can hold NaN (see
/// [`ColumnReference`]), bin probabilities are stored as integer counts, and
/// the same data always yields the same bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceSketch {
    pub features: Vec<ColumnReference>,
    pub outputs: Vec<ColumnReference>,
}

impl ReferenceSketch {
    /// Build the reference from training rows (one `Vec<f32>` per sample,
    /// one value per feature, in `feature_names` order) and, optionally, the
    /// model's outputs on those rows.
    ///
    /// ```
    /// use outpost_runtime::drift::{ReferenceSketch, ReferenceOptions, ReferenceOutput, OutputValues};
    /// let rows = vec![vec![1.0, 10.0], vec![2.0, 20.0], vec![3.0, 30.0]];
    /// let outputs = [ReferenceOutput { name: "label".into(), values: OutputValues::Classes(vec![0, 1, 1]) }];
    /// let sketch = ReferenceSketch::from_samples(&["a", "b"], &rows, &outputs, &ReferenceOptions::default()).unwrap();
    /// assert_eq!(sketch.features.len(), 2);
    /// ```
    pub fn from_samples<S: AsRef<str>>(
        feature_names: &[S],
        rows: &[Vec<f32>],
        outputs: &[ReferenceOutput],
        options: &ReferenceOptions,
    ) -> Result<ReferenceSketch, ReferenceError> {
        if rows.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if feature_names.is_empty() {
            return Err(ReferenceError::NoFeatures);
        }
        for (i, row) in rows.iter().enumerate() {
            if row.len() != feature_names.len() {
                return Err(ReferenceError::RowLength { row: i, expected: feature_names.len(), found: row.len() });
            }
        }
        let mut column = Vec::with_capacity(rows.len());
        let mut features = Vec::with_capacity(feature_names.len());
        for (j, name) in feature_names.iter().enumerate() {
            column.clear();
            column.extend(rows.iter().map(|r| r[j]));
            features.push(ColumnReference::quantile(name.as_ref(), &column, options.bins)?);
        }
        let mut outs = Vec::with_capacity(outputs.len());
        for o in outputs {
            let len = match &o.values {
                OutputValues::Classes(v) => v.len(),
                OutputValues::Values(v) => v.len(),
            };
            if len != rows.len() {
                return Err(ReferenceError::OutputLength { output: o.name.clone(), expected: rows.len(), found: len });
            }
            outs.push(match &o.values {
                OutputValues::Classes(v) => ColumnReference::classes(&o.name, v)?,
                OutputValues::Values(v) => ColumnReference::quantile(&o.name, v, options.bins)?,
            });
        }
        Ok(ReferenceSketch { features, outputs: outs })
    }

    /// All columns, features first then outputs — the order device sketches
    /// and reports use.
    pub fn columns(&self) -> impl Iterator<Item = &ColumnReference> {
        self.features.iter().chain(self.outputs.iter())
    }

    /// First 8 bytes of the SHA-256 of the postcard encoding. Device sketches
    /// carry it so that only sketches counted against the same reference are
    /// merged or compared.
    pub fn fingerprint(&self) -> [u8; 8] {
        // Encoding a Vec-backed value to a Vec cannot fail; an empty digest
        // input would still give a stable (if useless) fingerprint.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest[..8]);
        out
    }
}

/// Why a reference sketch could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("no reference samples")]
    Empty,
    #[error("no feature names")]
    NoFeatures,
    #[error("reference row {row} has {found} values, expected {expected} (one per feature name)")]
    RowLength { row: usize, expected: usize, found: usize },
    #[error("output {output:?} has {found} values, expected {expected} (one per reference row)")]
    OutputLength { output: String, expected: usize, found: usize },
    #[error("{bins} bins requested, need 1..={max}", max = MAX_BINS)]
    BinCount { bins: usize },
    #[error("column {column:?} has no finite reference value to place bins on")]
    NoFiniteValues { column: String },
    #[error("column {column:?} has {classes} classes, at most {max} are supported", max = MAX_CLASSES)]
    TooManyClasses { column: String, classes: usize },
    #[error("column {column:?}: invalid bins: {reason}")]
    InvalidBins { column: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_mass_edges_and_layout() {
        let values: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let c = ColumnReference::quantile("x", &values, 4).unwrap();
        assert_eq!(c.bins(), &Bins::Quantile { edges: vec![0.0, 25.0, 50.0, 75.0, next_up(99.0)] });
        assert_eq!(c.counts(), &[0, 25, 25, 25, 25, 0]);
        assert_eq!(c.bins().bin(-1.0), 0);
        assert_eq!(c.bins().bin(99.0), 4);
        assert_eq!(c.bins().bin(99.5), 5);
        assert_eq!(c.bins().bin(f32::INFINITY), 5);
        assert_eq!(c.bins().bin(f32::NEG_INFINITY), 0);
    }

    #[test]
    fn upper_bound_matches_partition_point() {
        for len in 1..40 {
            let edges: Vec<f32> = (0..len).map(|i| i as f32 * 2.0).collect();
            for k in -3..(2 * len + 3) {
                let x = k as f32;
                assert_eq!(upper_bound(&edges, x), edges.partition_point(|e| *e <= x), "len {len} x {x}");
            }
        }
        assert_eq!(upper_bound(&[], 1.0), 0);
    }

    #[test]
    fn ties_merge_bins_and_constant_columns_work() {
        let c = ColumnReference::quantile("x", &[1.0; 10], 8).unwrap();
        assert_eq!(c.bins(), &Bins::Quantile { edges: vec![1.0, next_up(1.0)] });
        assert_eq!(c.counts(), &[0, 10, 0]);
        assert_eq!(c.stats().map(|s| s.std), Some(0.0));
    }

    #[test]
    fn nan_is_counted_not_binned() {
        let c = ColumnReference::quantile("x", &[1.0, f32::NAN, 2.0], 2).unwrap();
        assert_eq!(c.nan_count(), 1);
        assert_eq!(c.total(), 3);
        assert!(matches!(
            ColumnReference::quantile("x", &[f32::NAN], 2),
            Err(ReferenceError::NoFiniteValues { .. })
        ));
    }

    #[test]
    fn classes_and_other() {
        let c = ColumnReference::classes("y", &[1, 0, 1, 1]).unwrap();
        assert_eq!(c.counts(), &[1, 3, 0]);
        assert_eq!(c.bins().bin(1.0), 1);
        assert_eq!(c.bins().bin(7.0), 2);
        assert_eq!(c.bins().bin(0.5), 2);
    }

    #[test]
    fn postcard_round_trip_validates() {
        let rows: Vec<Vec<f32>> = (0..50).map(|i| vec![i as f32, (i % 7) as f32]).collect();
        let s = ReferenceSketch::from_samples(&["a", "b"], &rows, &[], &ReferenceOptions::default()).unwrap();
        let bytes = postcard::to_allocvec(&s).unwrap();
        let back: ReferenceSketch = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.fingerprint(), s.fingerprint());

        // Break an invariant on the wire: edges out of order.
        let mut bad = s.clone();
        bad.features[0].bins = Bins::Quantile { edges: vec![2.0, 1.0] };
        bad.features[0].counts = vec![0; 3];
        let bytes = postcard::to_allocvec(&bad).unwrap();
        assert!(postcard::from_bytes::<ReferenceSketch>(&bytes).is_err());
    }
}
