//! loss.svg as a viewer sees it: rendered by resvg to a picture of the
//! chart's size, with its title, axes, legend and series drawn.

#[path = "common/svg.rs"]
mod svg;

use mezod::run::plot::{loss_chart_svg, LossChart, AVERAGE, DEV, HEIGHT, TRAIN, WIDTH};
use svg::{differing, inked, pixels_of, render, render_with, texts};

/// A noisy falling loss over `steps` steps.
fn falling_loss(steps: u64) -> Vec<(u64, f64)> {
    (0..steps)
        .map(|s| {
            (
                s,
                2.0 - s as f64 / steps as f64 + 0.2 * ((s * 7919 % 13) as f64 / 13.0),
            )
        })
        .collect()
}

fn rgb(c: plotters::style::RGBColor) -> (u8, u8, u8) {
    (c.0, c.1, c.2)
}

#[test]
fn an_accuracy_chart_renders_with_title_axes_legend_and_a_right_axis() {
    let train = falling_loss(200);
    let dev = [(0, 0.5), (50, 0.62), (100, 0.7), (150, 0.74), (200, 0.78)];
    let svg = loss_chart_svg(&LossChart {
        title: "sst2-opt",
        train: &train,
        dev: &dev,
        dev_metric: "accuracy",
    })
    .unwrap();
    let texts = texts(&svg);
    for want in [
        "sst2-opt",
        "step",
        "loss",
        "dev accuracy (right axis)",
        "training loss (loss+)",
        "moving average (10 steps)",
    ] {
        assert!(
            texts.iter().any(|t| t == want),
            "no text {want:?} in {texts:?}"
        );
    }
    // Ticks: numbers along the step axis up to the last step, and along both value axes.
    for tick in ["0", "100", "200", "1.0"] {
        assert!(
            texts.iter().any(|t| t == tick),
            "no tick {tick:?} in {texts:?}"
        );
    }

    let r = render(&svg);
    assert_eq!((r.pixmap.width(), r.pixmap.height()), (WIDTH, HEIGHT));
    let all = (WIDTH * HEIGHT) as usize;
    let ink = inked(&r.pixmap);
    assert!(
        ink > all / 100 && ink < all / 2,
        "{ink} of {all} pixels inked"
    );
    for (what, colour) in [
        ("training loss", TRAIN),
        ("moving average", AVERAGE),
        ("dev accuracy", DEV),
    ] {
        let n = pixels_of(&r.pixmap, rgb(colour));
        assert!(n > 50, "{what}: {n} pixels of its colour");
    }
    if r.fonts {
        // The glyphs are drawn: without fonts the same picture lacks them.
        let bare = render_with(&svg, false);
        let glyphs = differing(&r.pixmap, &bare.pixmap);
        assert!(glyphs > 2000, "text changes only {glyphs} pixels");
    } else {
        eprintln!("no system fonts: the chart's text was checked in the SVG only");
    }
}

#[test]
fn a_dev_loss_shares_the_training_loss_axis() {
    let train = falling_loss(40);
    let dev = [(0, 2.1), (20, 1.8), (40, 1.5)];
    let svg = loss_chart_svg(&LossChart {
        title: "causal-lm",
        train: &train,
        dev: &dev,
        dev_metric: "loss",
    })
    .unwrap();
    let texts = texts(&svg);
    assert!(texts.iter().any(|t| t == "dev loss"), "{texts:?}");
    assert!(!svg.contains("right axis"));
    let r = render(&svg);
    assert_eq!((r.pixmap.width(), r.pixmap.height()), (WIDTH, HEIGHT));
    assert!(pixels_of(&r.pixmap, rgb(DEV)) > 50);
}

#[test]
fn a_run_without_steps_or_finite_losses_still_draws_a_chart() {
    let svg = loss_chart_svg(&LossChart {
        title: "empty",
        train: &[(0, f64::NAN), (1, f64::INFINITY)],
        dev: &[],
        dev_metric: "f1",
    })
    .unwrap();
    let r = render(&svg);
    assert_eq!((r.pixmap.width(), r.pixmap.height()), (WIDTH, HEIGHT));
    assert!(inked(&r.pixmap) > 0);
}
