//! The device sketch: what a device saw, counted over the reference's bins.
//!
//! Every field merges by addition (or by min/max), so a sketch of a window,
//! of a device's lifetime, or of ten thousand devices is the same type, and
//! the fleet server can merge sketches in any order and grouping.

use serde::{Deserialize, Serialize};

use super::reference::{ColumnReference, ReferenceSketch};

/// Running moments of one column's finite values.
///
/// Sums are kept of `d = x − shift`, where `shift` is the reference mean of
/// the column (the same for every device on the same reference). Centring
/// keeps `sum_sq − sum²/n` from cancelling catastrophically when a feature's
/// mean is large compared with its spread, and it costs one subtraction.
///
/// Merging adds `count`, `sum`, `sum_sq` and takes min/max. Counts, min and
/// max merge exactly; the f64 sums are commutative exactly and associative
/// up to rounding (relative ~1e-15 per addition), which is all a mean and a
/// variance need. An empty column has `min = +inf`, `max = -inf` (the
/// identities of min and max); no field is ever NaN.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub min: f32,
    pub max: f32,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Default for Moments {
    fn default() -> Self {
        Moments { count: 0, min: f32::INFINITY, max: f32::NEG_INFINITY, sum: 0.0, sum_sq: 0.0 }
    }
}

impl Moments {
    /// Count one finite value. `inline(always)` and plain comparisons
    /// because devices are built at opt-level "z", where `f32::min` stays a
    /// libm call and small functions are not inlined (measured: 40% of the
    /// update). `x` is finite, so comparisons need no NaN handling.
    #[inline(always)]
    pub fn push(&mut self, x: f32, shift: f64) {
        let d = f64::from(x) - shift;
        self.count += 1;
        self.sum += d;
        self.sum_sq += d * d;
        if x < self.min {
            self.min = x;
        }
        if x > self.max {
            self.max = x;
        }
    }

    pub fn merge(&mut self, other: &Moments) {
        self.count += other.count;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Mean of the finite values, given the column's shift.
    pub fn mean(&self, shift: f64) -> Option<f64> {
        (self.count > 0).then(|| shift + self.sum / self.count as f64)
    }

    /// Sample variance (n − 1), clamped at 0 against rounding.
    pub fn variance(&self) -> Option<f64> {
        (self.count > 1).then(|| {
            let n = self.count as f64;
            ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0)
        })
    }
}

/// One column of a device sketch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColumnSketch {
    /// Count per bin, in the layout of the reference column's [`super::Bins`].
    pub counts: Vec<u64>,
    pub nan_count: u64,
    /// Moments of the finite values (±inf are in `counts` only).
    pub moments: Moments,
}

impl ColumnSketch {
    pub fn empty(reference: &ColumnReference) -> ColumnSketch {
        ColumnSketch { counts: vec![0; reference.bins().len()], nan_count: 0, moments: Moments::default() }
    }

    /// Count one value. `shift` is `reference.shift()`, passed in so the hot
    /// path does not re-derive it.
    #[inline]
    pub fn push(&mut self, reference: &ColumnReference, shift: f64, x: f32) {
        if x.is_nan() {
            self.nan_count += 1;
            return;
        }
        self.counts[reference.bins().bin(x)] += 1;
        if x.is_finite() {
            self.moments.push(x, shift);
        }
    }

    /// Samples in this column, NaN included.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.nan_count
    }

    /// Samples outside the reference range (under/overflow, unseen class).
    pub fn out_of_range(&self, reference: &ColumnReference) -> u64 {
        self.counts.iter().enumerate().filter(|(i, _)| reference.bins().is_out_of_range(*i)).map(|(_, c)| *c).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    fn merge(&mut self, other: &ColumnSketch) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.nan_count += other.nan_count;
        self.moments.merge(&other.moments);
    }

    fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.nan_count = 0;
        self.moments = Moments::default();
    }
}

/// Wall-clock span covered by a sketch, in Unix milliseconds. Merges as
/// (min start, max end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeSpan {
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
}

/// What a device saw over some interval, per feature and output, counted on
/// the bins of one [`ReferenceSketch`]. Postcard-encoded for the wire
/// (`devices/{id}/sketch`); 30 features with the default 32 bins take about
/// 2–3 KiB (bin counts are varints, so sparse windows are smaller).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceSketch {
    /// [`ReferenceSketch::fingerprint`] of the reference the bins belong to.
    pub reference: [u8; 8],
    pub features: Vec<ColumnSketch>,
    pub outputs: Vec<ColumnSketch>,
    /// `None` while nothing has been counted.
    pub span: Option<TimeSpan>,
}

impl DeviceSketch {
    /// An empty sketch over `reference`'s bins: the identity of [`merge`](Self::merge).
    pub fn empty(reference: &ReferenceSketch) -> DeviceSketch {
        DeviceSketch {
            reference: reference.fingerprint(),
            features: reference.features.iter().map(ColumnSketch::empty).collect(),
            outputs: reference.outputs.iter().map(ColumnSketch::empty).collect(),
            span: None,
        }
    }

    /// Samples counted: the largest column total (features and outputs are
    /// normally counted together, so they agree).
    pub fn samples(&self) -> u64 {
        self.columns().map(ColumnSketch::total).max().unwrap_or(0)
    }

    pub fn columns(&self) -> impl Iterator<Item = &ColumnSketch> {
        self.features.iter().chain(self.outputs.iter())
    }

    pub fn columns_mut(&mut self) -> impl Iterator<Item = &mut ColumnSketch> {
        self.features.iter_mut().chain(self.outputs.iter_mut())
    }

    /// Whether `other` counts on the same reference with the same layout.
    pub fn compatible(&self, other: &DeviceSketch) -> Result<(), SketchError> {
        if self.reference != other.reference {
            return Err(SketchError::ReferenceMismatch { left: self.reference, right: other.reference });
        }
        let shape = |s: &DeviceSketch| -> Vec<usize> { s.columns().map(|c| c.counts.len()).collect() };
        if self.features.len() != other.features.len()
            || self.outputs.len() != other.outputs.len()
            || shape(self) != shape(other)
        {
            return Err(SketchError::LayoutMismatch);
        }
        Ok(())
    }

    /// Whether this sketch fits `reference` (fingerprint and layout).
    pub fn check_against(&self, reference: &ReferenceSketch) -> Result<(), SketchError> {
        let fingerprint = reference.fingerprint();
        if self.reference != fingerprint {
            return Err(SketchError::ReferenceMismatch { left: self.reference, right: fingerprint });
        }
        let fits = |cols: &[ColumnSketch], refs: &[ColumnReference]| {
            cols.len() == refs.len() && cols.iter().zip(refs).all(|(c, r)| c.counts.len() == r.bins().len())
        };
        if !fits(&self.features, &reference.features) || !fits(&self.outputs, &reference.outputs) {
            return Err(SketchError::LayoutMismatch);
        }
        Ok(())
    }

    /// Add `other` into `self`. Associative and commutative (exactly for
    /// every count, min and max; up to f64 rounding for the moment sums).
    pub fn merge(&mut self, other: &DeviceSketch) -> Result<(), SketchError> {
        self.compatible(other)?;
        for (a, b) in self.columns_mut().zip(other.columns()) {
            a.merge(b);
        }
        self.span = match (self.span, other.span) {
            (None, s) | (s, None) => s,
            (Some(a), Some(b)) => Some(TimeSpan {
                start_unix_ms: a.start_unix_ms.min(b.start_unix_ms),
                end_unix_ms: a.end_unix_ms.max(b.end_unix_ms),
            }),
        };
        Ok(())
    }

    /// Merge many sketches (e.g. a fleet's), all over the same reference.
    pub fn merge_all<'a>(
        reference: &ReferenceSketch,
        sketches: impl IntoIterator<Item = &'a DeviceSketch>,
    ) -> Result<DeviceSketch, SketchError> {
        let mut total = DeviceSketch::empty(reference);
        for s in sketches {
            total.merge(s)?;
        }
        Ok(total)
    }

    /// Reset every count, keeping the layout.
    pub fn clear(&mut self) {
        self.columns_mut().for_each(ColumnSketch::clear);
        self.span = None;
    }

    pub fn to_postcard(&self) -> Vec<u8> {
        // Serialising plain integers, floats and Vecs into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn from_postcard(bytes: &[u8]) -> Result<DeviceSketch, SketchError> {
        postcard::from_bytes(bytes).map_err(|e| SketchError::Decode(e.to_string()))
    }

    /// Count one sample: `features` and `outputs` in reference order.
    /// Slow path for tools and tests; the monitor has its own hot path.
    pub fn push(&mut self, reference: &ReferenceSketch, features: &[f32], outputs: &[f32]) -> Result<(), SketchError> {
        if features.len() != reference.features.len() || outputs.len() != reference.outputs.len() {
            return Err(SketchError::SampleShape {
                features: features.len(),
                outputs: outputs.len(),
                expected_features: reference.features.len(),
                expected_outputs: reference.outputs.len(),
            });
        }
        for ((c, r), x) in self.features.iter_mut().zip(&reference.features).zip(features) {
            c.push(r, r.shift(), *x);
        }
        for ((c, r), x) in self.outputs.iter_mut().zip(&reference.outputs).zip(outputs) {
            c.push(r, r.shift(), *x);
        }
        Ok(())
    }
}

/// Why sketches could not be merged, decoded or fed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SketchError {
    #[error("sketches count against different references ({left:02x?} vs {right:02x?})")]
    ReferenceMismatch { left: [u8; 8], right: [u8; 8] },
    #[error("sketches have different column or bin layouts")]
    LayoutMismatch,
    #[error("sample has {features} features and {outputs} outputs, the reference has {expected_features} and {expected_outputs}")]
    SampleShape { features: usize, outputs: usize, expected_features: usize, expected_outputs: usize },
    #[error("batch of {len} feature values is not a multiple of {width} features")]
    BatchShape { len: usize, width: usize },
    #[error("malformed sketch: {0}")]
    Decode(String),
}
