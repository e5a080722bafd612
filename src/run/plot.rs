//! The loss-curve picture (SVG).  A hand-written polyline: a plotting crate
//! would bring font and image stacks for one chart of two series.

use std::fmt::Write;

/// Training loss per step (light), its moving average (dark) and dev evaluations (dots).
pub fn loss_curve_svg(train: &[(u64, f64)], evals: &[(u64, f64)], eval_label: &str) -> String {
    let (w, h, m) = (720.0, 360.0, 48.0);
    let finite: Vec<(u64, f64)> = train.iter().copied().filter(|p| p.1.is_finite()).collect();
    let max_step = finite
        .iter()
        .chain(evals)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let values: Vec<f64> = finite.iter().map(|p| p.1).collect();
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if lo > hi {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let x = |s: f64| m + s / max_step * (w - 2.0 * m);
    let y = |v: f64| h - m - (v - lo) / (hi - lo) * (h - 2.0 * m);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        svg,
        r#"<line x1="{m}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{0}" stroke="black"/>"#,
        h - m,
        w - m
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#,
        w / 2.0,
        h - 12.0
    );
    let _ = write!(
        svg,
        r#"<text x="{m}" y="{}">{hi:.4}</text><text x="{m}" y="{}">{lo:.4}</text>"#,
        m - 6.0,
        h - m + 16.0
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
        w - m,
        h - m + 16.0,
        max_step as u64
    );
    let line = |pts: &[(u64, f64)]| {
        pts.iter()
            .map(|(s, v)| format!("{:.1},{:.1}", x(*s as f64), y(*v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = write!(
        svg,
        r##"<polyline fill="none" stroke="#9ecae1" points="{}"/>"##,
        line(&finite)
    );
    let window = (finite.len() / 20).max(1);
    let smooth: Vec<(u64, f64)> = finite
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let from = i.saturating_sub(window - 1);
            (
                p.0,
                values[from..=i].iter().sum::<f64>() / (i - from + 1) as f64,
            )
        })
        .collect();
    let _ = write!(
        svg,
        r##"<polyline fill="none" stroke="#08519c" stroke-width="2" points="{}"/>"##,
        line(&smooth)
    );
    for (s, v) in evals
        .iter()
        .filter(|p| p.1.is_finite() && p.1 >= lo && p.1 <= hi)
    {
        let _ = write!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#e6550d"/>"##,
            x(*s as f64),
            y(*v)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="20">training loss (loss+) and moving average; dots: dev {eval_label}</text></svg>"##,
        m
    );
    svg
}
