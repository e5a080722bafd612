//! `loss.svg`: the chart of a run, drawn with plotters' SVG backend.
//!
//! One picture says whether a run learned: the job's name as title, the
//! training loss of every step (loss+, the loss MeZO measures first) with its
//! moving average, and the dev evaluations.  A dev loss shares the training
//! loss's axis (same units); any other dev metric (accuracy, F1) gets its own
//! axis on the right, since it neither shares units nor direction with a loss.
//!
//! The SVG backend writes `<text>` elements and leaves the glyphs to the
//! viewer, so the binary carries no font or image stack; plotters sizes the
//! text by an estimate, which is what the margins below allow for.

use anyhow::{anyhow, Result};
use plotters::coord::types::{RangedCoordf64, RangedCoordu64};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Width of the picture, pixels.
pub const WIDTH: u32 = 900;
/// Height of the picture, pixels.
pub const HEIGHT: u32 = 480;

/// Colours of the training loss, its moving average and the dev metric.
pub const TRAIN: RGBColor = RGBColor(0x9e, 0xca, 0xe1);
pub const AVERAGE: RGBColor = RGBColor(0x08, 0x51, 0x9c);
pub const DEV: RGBColor = RGBColor(0xe6, 0x55, 0x0d);

/// What the chart shows.
pub struct LossChart<'a> {
    /// The job's name (see [`super::job_name`]).
    pub title: &'a str,
    /// Training loss (loss+) per step.
    pub train: &'a [(u64, f64)],
    /// The dev metric at each evaluation.
    pub dev: &'a [(u64, f64)],
    /// The dev metric's name (`loss`, `accuracy`, `f1`).
    pub dev_metric: &'a str,
}

/// The moving average of `values` over a trailing window of `window` points
/// (fewer at the start): a noisy MeZO loss only shows its trend this way.
pub fn moving_average(values: &[(u64, f64)], window: usize) -> Vec<(u64, f64)> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, &(step, v))| {
            sum += v;
            if i >= window {
                sum -= values[i - window].1;
            }
            (step, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// The averaging window for `n` points: a twentieth of the run, at least one.
pub fn window_for(n: usize) -> usize {
    (n / 20).max(1)
}

/// A value range that holds every finite value of `values`, padded by 5 % so
/// no point sits on the frame (a constant series gets a unit-wide range).
fn value_range<'v>(values: impl Iterator<Item = &'v f64>) -> Option<(f64, f64)> {
    let (lo, hi) =
        values
            .filter(|v| v.is_finite())
            .fold(None, |r: Option<(f64, f64)>, &v| match r {
                None => Some((v, v)),
                Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
            })?;
    if hi - lo < 1e-12 {
        return Some((lo - 0.5, hi + 0.5));
    }
    let pad = 0.05 * (hi - lo);
    Some((lo - pad, hi + pad))
}

fn finite(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    points.iter().copied().filter(|p| p.1.is_finite()).collect()
}

/// The chart as SVG text, [`WIDTH`] × [`HEIGHT`].
pub fn loss_chart_svg(chart: &LossChart) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart).map_err(|e| anyhow!("drawing the loss chart: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("writing the loss chart: {e}"))?;
    }
    Ok(svg)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(root: &DrawingArea<SVGBackend, Shift>, c: &LossChart) -> DrawResult {
    root.fill(&WHITE)?;
    let train = finite(c.train);
    let dev = finite(c.dev);
    let dev_is_loss = c.dev_metric == "loss";
    let max_step = train
        .iter()
        .chain(&dev)
        .map(|p| p.0)
        .max()
        .unwrap_or(0)
        .max(1);
    let shared = train
        .iter()
        .chain(dev.iter().filter(|_| dev_is_loss))
        .map(|p| &p.1);
    let (lo, hi) = value_range(shared).unwrap_or((0.0, 1.0));
    let chart = ChartBuilder::on(root)
        .caption(c.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .right_y_label_area_size(if dev_is_loss { 0 } else { 70 })
        .build_cartesian_2d(0u64..max_step, lo..hi)?;
    let dev_label = format!("dev {}", c.dev_metric);
    let dot = |(s, v): (u64, f64)| Circle::new((s, v), 4, DEV.filled());
    let legend_dot = |(x, y): (i32, i32)| Circle::new((x + 10, y), 4, DEV.filled());
    if dev_is_loss {
        let mut chart = chart;
        draw_training(&mut chart, &train)?;
        chart.draw_series(LineSeries::new(dev.iter().copied(), DEV.stroke_width(1)))?;
        chart
            .draw_series(dev.iter().copied().map(dot))?
            .label(dev_label)
            .legend(legend_dot);
        return legend(&mut chart);
    }
    // The secondary axis takes the right label area before the primary
    // axes are drawn, or they would label it too.
    let (dlo, dhi) = metric_range(&dev);
    let mut dual = chart.set_secondary_coord(0u64..max_step, dlo..dhi);
    draw_training(&mut dual, &train)?;
    dual.configure_secondary_axes()
        .y_desc(format!("{dev_label} (right axis)"))
        .y_labels(8)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    dual.draw_secondary_series(LineSeries::new(dev.iter().copied(), DEV.stroke_width(1)))?;
    dual.draw_secondary_series(dev.iter().copied().map(dot))?
        .label(format!("{dev_label} (right axis)"))
        .legend(legend_dot);
    legend(&mut dual)
}

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordu64, RangedCoordf64>>;

/// The step and loss axes, the training loss and its moving average.
fn draw_training(chart: &mut Chart, train: &[(u64, f64)]) -> DrawResult {
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .x_labels(10)
        .y_labels(8)
        .light_line_style(WHITE.mix(0.0))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            train.iter().copied(),
            TRAIN.stroke_width(1),
        ))?
        .label("training loss (loss+)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN.stroke_width(2)));
    let window = window_for(train.len());
    chart
        .draw_series(LineSeries::new(
            moving_average(train, window),
            AVERAGE.stroke_width(2),
        ))?
        .label(format!("moving average ({window} steps)"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], AVERAGE.stroke_width(2)));
    Ok(())
}

/// A dev metric's axis: 0 to 1 for proportions (accuracy, F1), so the
/// picture does not magnify a change of one example; the values' own range
/// otherwise.
fn metric_range(dev: &[(u64, f64)]) -> (f64, f64) {
    if dev.iter().all(|p| (0.0..=1.0).contains(&p.1)) {
        (0.0, 1.0)
    } else {
        value_range(dev.iter().map(|p| &p.1)).unwrap_or((0.0, 1.0))
    }
}

fn legend<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
) -> DrawResult {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_moving_average_trails_over_its_window() {
        let pts: Vec<(u64, f64)> = [1.0, 3.0, 5.0, 7.0]
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u64, v))
            .collect();
        assert_eq!(
            moving_average(&pts, 2),
            vec![(0, 1.0), (1, 2.0), (2, 4.0), (3, 6.0)]
        );
        assert_eq!(moving_average(&pts, 1), pts);
        assert_eq!(window_for(10), 1);
        assert_eq!(window_for(400), 20);
    }

    #[test]
    fn ranges_hold_every_value_and_widen_a_constant() {
        assert_eq!(value_range([2.0, 2.0].iter()), Some((1.5, 2.5)));
        let (lo, hi) = value_range([1.0, f64::NAN, 3.0].iter()).unwrap();
        assert!(lo < 1.0 && hi > 3.0 && hi < 3.2);
        assert_eq!(value_range([f64::INFINITY].iter()), None);
        assert_eq!(metric_range(&[(0, 0.5), (10, 0.75)]), (0.0, 1.0));
        let (lo, hi) = metric_range(&[(0, 2.0), (10, 4.0)]);
        assert!(lo < 2.0 && hi > 4.0);
    }
}
