//! Is a series (live descriptors, threads, a container's length, resident
//! bytes) growing steadily, or just noisy, warming up, or bounded?
//!
//! One snapshot never makes a leak. A [`Series`] keeps timestamped values;
//! [`analyze`] fits a least-squares slope and runs the Mann-Kendall trend
//! test (the share of later-minus-earlier pairs that went up, as a normal
//! score, ties corrected), and measures the growth of the last half on its
//! own. [`Rule::steady`] calls a series growing when the trend is
//! significant, the net growth is large enough to matter, and the growth
//! continues through the end of the window, so a cache filling to its
//! bound, a warm-up, or a queue that fills and drains is not a leak.

use std::collections::VecDeque;

/// Timestamped values, oldest first, at most `cap` of them.
#[derive(Clone, Debug)]
pub struct Series {
    points: VecDeque<(f64, f64)>,
    cap: usize,
}

impl Series {
    pub fn new(cap: usize) -> Series {
        Series {
            points: VecDeque::with_capacity(cap.min(256)),
            cap: cap.max(4),
        }
    }

    /// Adds a value observed at `t` seconds (monotonic).
    pub fn push(&mut self, t: f64, value: f64) {
        if self.points.len() == self.cap {
            self.points.pop_front();
        }
        self.points.push_back((t, value));
    }

    /// Points no older than `window` seconds before the newest one.
    pub fn window(&self, window: f64) -> Vec<(f64, f64)> {
        let Some(&(last, _)) = self.points.back() else {
            return Vec::new();
        };
        self.points
            .iter()
            .copied()
            .filter(|(t, _)| last - t <= window)
            .collect()
    }

    pub fn last(&self) -> Option<(f64, f64)> {
        self.points.back().copied()
    }

    pub fn first(&self) -> Option<(f64, f64)> {
        self.points.front().copied()
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Every point, oldest first.
    pub fn points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.points.iter().copied()
    }
}

/// What [`analyze`] found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    pub n: usize,
    /// Seconds from the first to the last point.
    pub span: f64,
    /// Least-squares slope, units per second.
    pub slope: f64,
    /// Mann-Kendall normal score (positive: increasing).
    pub z: f64,
    /// Last value minus first.
    pub net: f64,
    /// Last value minus the value at the middle of the window.
    pub late_net: f64,
    /// Least-squares slope of the last half.
    pub late_slope: f64,
    /// Share of consecutive steps that went up.
    pub rising_steps: f64,
}

/// Least-squares slope of `points` (0 for fewer than two distinct times).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mv = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, v) in points {
        num += (t - mt) * (v - mv);
        den += (t - mt) * (t - mt);
    }
    if den <= f64::EPSILON { 0.0 } else { num / den }
}

/// Mann-Kendall normal score of the values in time order, with the
/// variance corrected for ties (plateaus are common: a bounded cache).
pub fn mann_kendall(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 3 {
        return 0.0;
    }
    let mut s: i64 = 0;
    for i in 0..n {
        for j in i + 1..n {
            s += match values[j].partial_cmp(&values[i]) {
                Some(std::cmp::Ordering::Greater) => 1,
                Some(std::cmp::Ordering::Less) => -1,
                _ => 0,
            };
        }
    }
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mut ties = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && sorted[j] == sorted[i] {
            j += 1;
        }
        let t = (j - i) as f64;
        if t > 1.0 {
            ties += t * (t - 1.0) * (2.0 * t + 5.0);
        }
        i = j;
    }
    let nf = n as f64;
    let var = (nf * (nf - 1.0) * (2.0 * nf + 5.0) - ties) / 18.0;
    if var <= 0.0 {
        return 0.0;
    }
    let s = s as f64;
    if s > 0.0 {
        (s - 1.0) / var.sqrt()
    } else if s < 0.0 {
        (s + 1.0) / var.sqrt()
    } else {
        0.0
    }
}

/// Fits and tests `points` (time, value), oldest first; `None` for fewer
/// than three points.
pub fn analyze(points: &[(f64, f64)]) -> Option<Trend> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len();
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let (t0, v0) = points[0];
    let (t1, v1) = points[n - 1];
    let mid_t = t0 + (t1 - t0) / 2.0;
    let late: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0 >= mid_t).collect();
    let late_start = late.first().map(|p| p.1).unwrap_or(v1);
    let rising = points.windows(2).filter(|w| w[1].1 > w[0].1).count();
    Some(Trend {
        n,
        span: t1 - t0,
        slope: slope(points),
        z: mann_kendall(&values),
        net: v1 - v0,
        late_net: v1 - late_start,
        late_slope: slope(&late),
        rising_steps: rising as f64 / (n - 1) as f64,
    })
}

/// When a trend counts as steady growth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// Fewest points, and shortest span in seconds, to judge at all.
    pub min_points: usize,
    pub min_span: f64,
    /// Mann-Kendall score at least this (3.0 ≈ one-sided p of 0.0013).
    pub min_z: f64,
    /// Net growth over the window at least this (units of the series).
    pub min_net: f64,
    /// The last half must still grow at this share of the overall slope.
    pub min_late_share: f64,
}

impl Rule {
    /// Steady growth: significant, large enough, and still going on.
    pub fn steady(&self, t: &Trend) -> bool {
        t.n >= self.min_points
            && t.span >= self.min_span
            && t.z >= self.min_z
            && t.slope > 0.0
            && t.net >= self.min_net
            && t.late_net > 0.0
            && t.late_slope >= self.min_late_share * t.slope
    }
}

/// A confidence in `[0, 0.99]` from a Mann-Kendall score: the one-sided
/// probability that an increasing trend this strong is not chance, scaled
/// down for short series.
pub fn confidence(t: &Trend) -> f64 {
    let p_not_chance = normal_cdf(t.z);
    let length = (t.n as f64 / 12.0).min(1.0);
    (p_not_chance * (0.6 + 0.4 * length)).clamp(0.0, 0.99)
}

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 for erf).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-x * x).exp();
    0.5 * (1.0 + sign * y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(values: &[f64]) -> Vec<(f64, f64)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64 * 2.0, *v))
            .collect()
    }

    const RULE: Rule = Rule {
        min_points: 6,
        min_span: 10.0,
        min_z: 3.0,
        min_net: 20.0,
        min_late_share: 0.25,
    };

    #[test]
    fn slope_of_a_line() {
        let p: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&p) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&p[..1]), 0.0);
    }

    #[test]
    fn mann_kendall_signs_and_ties() {
        let up: Vec<f64> = (0..12).map(f64::from).collect();
        let down: Vec<f64> = (0..12).rev().map(f64::from).collect();
        assert!(mann_kendall(&up) > 4.0);
        assert!(mann_kendall(&down) < -4.0);
        assert_eq!(mann_kendall(&[5.0; 12]), 0.0);
        // Exactly n(n-1)/2 rising pairs for 12 points: z = (66-1)/sqrt(var).
        let var = 12.0 * 11.0 * 29.0 / 18.0;
        assert!((mann_kendall(&up) - 65.0 / f64::sqrt(var)).abs() < 1e-9);
    }

    #[test]
    fn steady_growth_with_noise_is_a_leak() {
        let v: Vec<f64> = (0..15)
            .map(|i| 100.0 + 40.0 * i as f64 + if i % 3 == 0 { 25.0 } else { -10.0 })
            .collect();
        let t = analyze(&pts(&v)).unwrap();
        assert!(RULE.steady(&t), "{t:?}");
        assert!(confidence(&t) > 0.9);
        assert!((t.slope - 20.0).abs() < 3.0, "{t:?}");
    }

    #[test]
    fn a_bounded_cache_filling_then_flat_is_not() {
        // Fills for the first third of the window, then stays at its bound.
        let v: Vec<f64> = (0..15).map(|i| (i as f64 * 300.0).min(1500.0)).collect();
        let t = analyze(&pts(&v)).unwrap();
        assert!(t.z > 3.0, "the whole window trends up: {t:?}");
        assert!(!RULE.steady(&t), "but it stopped growing: {t:?}");
    }

    #[test]
    fn churn_and_small_growth_are_not() {
        let churn: Vec<f64> = (0..15)
            .map(|i| 500.0 + if i % 2 == 0 { 80.0 } else { -80.0 })
            .collect();
        assert!(!RULE.steady(&analyze(&pts(&churn)).unwrap()));
        let tiny: Vec<f64> = (0..15).map(|i| 10.0 + i as f64).collect();
        assert!(!RULE.steady(&analyze(&pts(&tiny)).unwrap()), "net 14 < 20");
        let short: Vec<f64> = (0..4).map(|i| 100.0 * i as f64).collect();
        assert!(!RULE.steady(&analyze(&pts(&short)).unwrap()), "4 points");
    }

    #[test]
    fn series_keeps_a_bounded_window() {
        let mut s = Series::new(5);
        for i in 0..10 {
            s.push(i as f64, i as f64);
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s.first(), Some((5.0, 5.0)));
        assert_eq!(s.window(2.0).len(), 3);
    }

    #[test]
    fn normal_cdf_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-6);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-3);
        assert!((normal_cdf(-3.0) - 0.00135).abs() < 1e-4);
    }
}
