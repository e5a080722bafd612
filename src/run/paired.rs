//! The base model against the fine-tuned one on the same test examples.
//!
//! Both models answer the same examples, so their accuracies are paired: what
//! varies from one draw of the test set to another is the difference, and its
//! uncertainty comes from the examples where the two disagree.  Two unpaired
//! intervals would be far wider than the paired one and say little about a gain
//! of a few points.  We give two views of the same pairs:
//!
//! - a 95 % percentile bootstrap interval of the accuracy difference, resampling
//!   examples (a fixed seed and 10,000 resamples, so the same vectors always give
//!   the same interval);
//! - McNemar's exact test: under "no difference" each discordant example (one
//!   model right, the other wrong) goes either way with probability ½, so the
//!   two-sided p-value is a binomial tail on the discordant counts.
//!
//! Only tasks scored by accuracy keep per-example correctness (see
//! [`crate::data::task::Evaluation::correct`]); other metrics get no comparison.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

/// Bootstrap resamples: the interval's ends move by well under a tenth of a point
/// between seeds at this count for a test split of a thousand examples.
pub const RESAMPLES: usize = 10_000;
/// Coverage of the bootstrap interval.
pub const CONFIDENCE: f64 = 0.95;
/// ChaCha20's stream is fixed for a seed (unlike `StdRng`'s across rand
/// releases), so a result.json can be recomputed exactly.
const SEED: u64 = 0x6d65_7a6f; // "mezo"

/// The paired comparison of two per-example correctness vectors (result.json's `test_paired`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// Examples compared.
    pub n: usize,
    /// Accuracy of the base model.
    pub base: f64,
    /// Accuracy of the fine-tuned model.
    pub tuned: f64,
    /// `tuned − base`.
    pub difference: f64,
    /// Lower end of the percentile bootstrap interval of the difference.
    pub ci_low: f64,
    /// Upper end of the percentile bootstrap interval of the difference.
    pub ci_high: f64,
    pub confidence: f64,
    pub resamples: usize,
    /// Examples only the base model got right.
    pub only_base: usize,
    /// Examples only the fine-tuned model got right.
    pub only_tuned: usize,
    /// McNemar's exact two-sided p-value.
    pub mcnemar_p: f64,
}

impl Paired {
    /// The comparison, or `None` when there is nothing to pair (no examples, or
    /// vectors of different lengths).
    pub fn compare(base: &[bool], tuned: &[bool]) -> Option<Paired> {
        let n = base.len();
        if n == 0 || tuned.len() != n {
            return None;
        }
        let count = |v: &[bool]| v.iter().filter(|&&c| c).count();
        // Per example: +1 only tuned right, −1 only base right, 0 agreement.
        let d: Vec<i32> = base
            .iter()
            .zip(tuned)
            .map(|(&b, &t)| t as i32 - b as i32)
            .collect();
        let only_tuned = d.iter().filter(|&&x| x > 0).count();
        let only_base = d.iter().filter(|&&x| x < 0).count();
        let (ci_low, ci_high) = bootstrap_interval(&d, RESAMPLES, CONFIDENCE, SEED);
        Some(Paired {
            n,
            base: count(base) as f64 / n as f64,
            tuned: count(tuned) as f64 / n as f64,
            difference: (only_tuned as f64 - only_base as f64) / n as f64,
            ci_low,
            ci_high,
            confidence: CONFIDENCE,
            resamples: RESAMPLES,
            only_base,
            only_tuned,
            mcnemar_p: mcnemar_exact(only_base, only_tuned),
        })
    }

    /// One line for a run's summary: `test accuracy 81.0% → 84.2% (+3.2 points,
    /// 95% CI +1.1 to +5.3, McNemar p = 0.003, n = 1066)`.
    pub fn summary(&self) -> String {
        let pts = |v: f64| format!("{:+.1}", 100.0 * v);
        format!(
            "test accuracy {:.1}% → {:.1}% ({} points, {:.0}% CI {} to {}, McNemar p = {}, n = {})",
            100.0 * self.base,
            100.0 * self.tuned,
            pts(self.difference),
            100.0 * self.confidence,
            pts(self.ci_low),
            pts(self.ci_high),
            format_p(self.mcnemar_p),
            self.n
        )
    }
}

/// Three decimals, or two significant digits below 0.001.
fn format_p(p: f64) -> String {
    if p >= 0.001 {
        format!("{p:.3}")
    } else {
        format!("{p:.1e}")
    }
}

/// Percentile bootstrap interval of the mean of `d`: `resamples` draws of
/// `d.len()` examples with replacement; the interval's ends are the
/// `(1 − confidence)/2` and `(1 + confidence)/2` quantiles (nearest rank) of the
/// resampled means.
fn bootstrap_interval(d: &[i32], resamples: usize, confidence: f64, seed: u64) -> (f64, f64) {
    let n = d.len();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let sum: i64 = (0..n).map(|_| d[rng.gen_range(0..n)] as i64).sum();
            sum as f64 / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((resamples - 1) as f64 * q).round() as usize];
    let tail = (1.0 - confidence) / 2.0;
    (at(tail), at(1.0 - tail))
}

/// McNemar's exact two-sided p-value for `b` and `c` discordant pairs:
/// `min(1, 2·P(X ≤ min(b, c)))` with `X ~ Binomial(b + c, ½)`.
///
/// The terms `C(m, k)/2^m` underflow f64 for m in the thousands (2^-1075), so
/// they are summed in log space: `ln C(m, k+1) = ln C(m, k) + ln((m − k)/(k + 1))`,
/// then a log-sum-exp around the largest term.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let m = b + c;
    if m == 0 {
        return 1.0;
    }
    let k_max = b.min(c);
    let mut log_terms = Vec::with_capacity(k_max + 1);
    let mut t = -(m as f64) * std::f64::consts::LN_2;
    for k in 0..=k_max {
        log_terms.push(t);
        t += ((m - k) as f64 / (k + 1) as f64).ln();
    }
    // Terms grow with k below m/2: the last is the largest.
    let top = log_terms[k_max];
    let tail = top + log_terms.iter().map(|&t| (t - top).exp()).sum::<f64>().ln();
    (2.0 * tail.exp()).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` examples: the first `both` right for both models, then `only_base`
    /// right only for the base, then `only_tuned` right only for the tuned one.
    fn pairs(n: usize, both: usize, only_base: usize, only_tuned: usize) -> (Vec<bool>, Vec<bool>) {
        let ends = (both, both + only_base, both + only_base + only_tuned);
        (0..n)
            .map(|i| (i < ends.1, i < ends.0 || (ends.1..ends.2).contains(&i)))
            .unzip()
    }

    /// Σ_{k ≤ min(b, c)} C(m, k) / 2^m by exact integers (m ≤ 120).
    fn exact_p(b: usize, c: usize) -> f64 {
        let m = (b + c) as u128;
        let (mut choose, mut sum) = (1u128, 0u128);
        for k in 0..=b.min(c) as u128 {
            sum += choose;
            choose = choose * (m - k) / (k + 1);
        }
        (2.0 * sum as f64 / 2f64.powi(m as i32)).min(1.0)
    }

    #[test]
    fn identical_answers_differ_by_nothing() {
        let (b, _) = pairs(500, 300, 100, 0);
        let p = Paired::compare(&b, &b).unwrap();
        assert_eq!((p.n, p.base, p.tuned), (500, 0.8, 0.8));
        assert_eq!((p.difference, p.ci_low, p.ci_high), (0.0, 0.0, 0.0));
        assert_eq!((p.only_base, p.only_tuned, p.mcnemar_p), (0, 0, 1.0));
    }

    #[test]
    fn gains_in_one_direction_exclude_zero() {
        let (b, t) = pairs(1000, 700, 0, 40);
        let p = Paired::compare(&b, &t).unwrap();
        assert_eq!((p.base, p.tuned), (0.7, 0.74));
        assert!((p.difference - 0.04).abs() < 1e-12);
        assert!(
            p.ci_low > 0.0 && p.ci_low < 0.04 && p.ci_high > 0.04,
            "{p:?}"
        );
        assert_eq!((p.only_base, p.only_tuned), (0, 40));
        // 2 / 2^40.
        assert!((p.mcnemar_p / (2.0 * 0.5f64.powi(40)) - 1.0).abs() < 1e-9);
        // And the mirror image.
        let q = Paired::compare(&t, &b).unwrap();
        assert!(q.ci_high < 0.0 && q.difference < 0.0);
        assert_eq!(q.mcnemar_p, p.mcnemar_p);
    }

    #[test]
    fn balanced_disagreement_covers_zero() {
        let (b, t) = pairs(1000, 600, 50, 50);
        let p = Paired::compare(&b, &t).unwrap();
        assert_eq!(p.difference, 0.0);
        assert!(p.ci_low < 0.0 && p.ci_high > 0.0, "{p:?}");
        assert_eq!(p.mcnemar_p, 1.0);
    }

    #[test]
    fn the_interval_has_the_width_the_normal_approximation_gives() {
        // Paired difference: var = ((b + c)/n − diff²)/n.
        let (b, t) = pairs(1000, 700, 40, 70);
        let p = Paired::compare(&b, &t).unwrap();
        let diff = 0.03;
        let se = ((110.0 / 1000.0 - diff * diff) / 1000.0f64).sqrt();
        for (got, want) in [(p.ci_low, diff - 1.96 * se), (p.ci_high, diff + 1.96 * se)] {
            assert!((got - want).abs() < 0.003, "{got} against {want} ({p:?})");
        }
        // Reproducible: the same vectors give the same interval.
        assert_eq!(Paired::compare(&b, &t).unwrap(), p);
    }

    #[test]
    fn mcnemar_matches_the_binomial_sum() {
        // scipy.stats.binomtest(3, 20).pvalue = 2·1351/2^20.
        assert!((mcnemar_exact(3, 17) - 2.0 * 1351.0 / 1048576.0).abs() < 1e-15);
        for (b, c) in [
            (0, 1),
            (1, 1),
            (2, 9),
            (9, 2),
            (30, 45),
            (50, 70),
            (60, 60),
            (0, 100),
        ] {
            let (got, want) = (mcnemar_exact(b, c), exact_p(b, c));
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1e-300),
                "{b},{c}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn mcnemar_holds_for_thousands_of_discordant_pairs() {
        // Past 1075 pairs every term underflows f64 on its own.
        assert_eq!(mcnemar_exact(1500, 1500), 1.0);
        // Computed with exact rationals: 2·Σ_{k≤b} C(b+c, k) / 2^(b+c) (Python's
        // `fractions` and `math.comb`).
        for (b, c, want) in [
            (900, 1100, 8.457089535503927e-06),
            (1000, 2000, 1.0090148627941341e-75),
        ] {
            let got = mcnemar_exact(b, c);
            assert!((got / want - 1.0).abs() < 1e-9, "{b},{c}: {got} vs {want}");
        }
    }

    #[test]
    fn nothing_to_pair_gives_none() {
        assert_eq!(Paired::compare(&[], &[]), None);
        assert_eq!(Paired::compare(&[true], &[true, false]), None);
    }

    #[test]
    fn the_summary_line_reads_in_points() {
        let p = Paired {
            n: 1066,
            base: 0.81,
            tuned: 0.842,
            difference: 0.032,
            ci_low: 0.011,
            ci_high: 0.053,
            confidence: 0.95,
            resamples: RESAMPLES,
            only_base: 20,
            only_tuned: 54,
            mcnemar_p: 0.0031,
        };
        assert_eq!(
            p.summary(),
            "test accuracy 81.0% → 84.2% (+3.2 points, 95% CI +1.1 to +5.3, McNemar p = 0.003, n = 1066)"
        );
        let p = Paired {
            mcnemar_p: 2.5e-9,
            ..p
        };
        assert!(
            p.summary().contains("McNemar p = 2.5e-9,"),
            "{}",
            p.summary()
        );
    }
}
