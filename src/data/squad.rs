//! SQuAD's answer metrics, as its official evaluation script computes them:
//! answers are normalized (lower case, ASCII punctuation removed, the articles
//! a/an/the removed, whitespace collapsed), then compared exactly (EM) or as
//! bags of tokens (F1); against several gold answers the best one counts.

use std::collections::HashMap;

/// Lower case, no punctuation, no articles, single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn exact_match(prediction: &str, gold: &str) -> f64 {
    (normalize_answer(prediction) == normalize_answer(gold)) as u8 as f64
}

/// Token-level F1 of the normalized answers; when either is empty, 1 if both are.
pub fn f1(prediction: &str, gold: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(gold);
    let (p, g): (Vec<&str>, Vec<&str>) = (
        p.split_whitespace().collect(),
        g.split_whitespace().collect(),
    );
    if p.is_empty() || g.is_empty() {
        return (p == g) as u8 as f64;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &g {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in &p {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The best score of `prediction` against any of `golds`.
pub fn best_of(metric: fn(&str, &str) -> f64, prediction: &str, golds: &[String]) -> f64 {
    golds
        .iter()
        .map(|g| metric(prediction, g))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_follows_the_official_script() {
        assert_eq!(normalize_answer("The  Cat!"), "cat");
        assert_eq!(
            normalize_answer("an apple, a pear & the plum."),
            "apple pear plum"
        );
        assert_eq!(
            normalize_answer("Theatre"),
            "theatre",
            "only whole-word articles go"
        );
        assert_eq!(normalize_answer("U.S.A."), "usa");
        assert_eq!(normalize_answer("  \t"), "");
    }

    #[test]
    fn exact_match_and_f1_on_hand_checked_cases() {
        assert_eq!(exact_match("The Cat", "cat"), 1.0);
        assert_eq!(exact_match("cats", "cat"), 0.0);
        // pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8.
        assert!((f1("the cat sat", "a cat sat down") - 0.8).abs() < 1e-12);
        // Repeated tokens count once per occurrence: pred {to, to, be}, gold {to, be}:
        // common 2, P = 2/3, R = 1, F1 = 0.8.
        assert!((f1("to to be", "to be") - 0.8).abs() < 1e-12);
        assert_eq!(f1("Paris", "London"), 0.0);
        assert_eq!(f1("", "the"), 1.0, "both normalize to empty");
        assert_eq!(f1("", "Paris"), 0.0);
        let golds = vec!["Denver Broncos".to_string(), "Broncos".to_string()];
        assert_eq!(best_of(exact_match, "the broncos", &golds), 1.0);
        assert!((best_of(f1, "Denver", &golds) - 2.0 / 3.0).abs() < 1e-12);
    }
}
