//! Page–Hinkley change detection over successive windows.
//!
//! Fed one value per closed window — the lower end of the column's test
//! statistic (KS or TV) — it keeps
//!
//! ```text
//! x̄_t = mean(x_1..x_t)
//! m_t = Σ_{i≤t} (x_i − x̄_i − δ)
//! PH_t = m_t − min_{s≤t} m_s           alarm when PH_t > λ
//! ```
//!
//! It detects a *rise* of the statistic above its own history, not its
//! level. That matters: every window is compared with the same finite
//! reference sample, so a column whose reference happens to sit a little
//! off the population shows a persistent small distance in every window.
//! A CUSUM against a fixed null level would accumulate that bias and
//! eventually alarm for sure; Page–Hinkley sees a constant level and stays
//! quiet. A single odd window adds at most `x − x̄ − δ` (≲ 0.3 even for a
//! wild one) and is forgiven as later windows come back down, while a
//! sustained rise of Δ per window reaches λ after about `λ / (Δ − δ)`
//! windows.

use serde::{Deserialize, Serialize};

/// Page–Hinkley parameters, in units of the test statistic (a distance in
/// [0, 1]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequentialConfig {
    /// Tolerated rise per window (δ). Window-to-window noise of the KS lower
    /// end is about `0.3/√n_eff`, i.e. ≤ 0.03 for windows of ≥ 100 samples;
    /// δ = 0.02 makes the null drift of `m_t` clearly negative.
    pub delta: f64,
    /// Alarm level (λ). With δ = 0.02 and noise ≤ 0.03 the chance that a
    /// drift-free column ever climbs 0.3 is of order e^(−2δλ/σ²) ≈ e^(−13)
    /// per excursion; a sustained rise of 0.08 (a 0.25 sd mean shift) alarms
    /// after about 5 windows.
    pub lambda: f64,
}

impl Default for SequentialConfig {
    fn default() -> Self {
        SequentialConfig { delta: 0.02, lambda: 0.3 }
    }
}

/// The detector of one column.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PageHinkley {
    windows: u64,
    mean: f64,
    cumulative: f64,
    minimum: f64,
}

impl PageHinkley {
    pub fn update(&mut self, x: f64, config: &SequentialConfig) {
        self.windows += 1;
        self.mean += (x - self.mean) / self.windows as f64;
        self.cumulative += x - self.mean - config.delta;
        self.minimum = self.minimum.min(self.cumulative);
    }

    pub fn statistic(&self) -> f64 {
        self.cumulative - self.minimum
    }

    pub fn alarm(&self, config: &SequentialConfig) -> bool {
        self.statistic() > config.lambda
    }

    pub fn windows(&self) -> u64 {
        self.windows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_level_never_alarms_and_a_spike_is_forgiven() {
        let c = SequentialConfig::default();
        let mut ph = PageHinkley::default();
        for i in 0..1000 {
            // A persistent bias of 0.08 plus one wild window.
            ph.update(if i == 500 { 0.3 } else { 0.08 }, &c);
            assert!(!ph.alarm(&c), "window {i}");
        }
    }

    #[test]
    fn sustained_rise_alarms() {
        let c = SequentialConfig::default();
        let mut ph = PageHinkley::default();
        for _ in 0..50 {
            ph.update(0.05, &c);
        }
        let mut windows = 0;
        while !ph.alarm(&c) {
            ph.update(0.13, &c);
            windows += 1;
            assert!(windows < 20);
        }
        assert!(windows <= 6, "{windows}");
    }
}
