//! `bench/convergence.py --tiny` end to end: it runs each estimator on the tiny
//! classification fixture, then writes its section into a results file (keeping
//! the other sections), the raw curves with forward passes as their x values,
//! and a picture. The committed bench/results.md is never touched.

mod common;

use common::*;

/// Estimators the test runs, with their forward passes per step under the
/// script's default settings.
const ESTIMATORS: &[(&str, u64)] = &[("mezo", 2), ("fzoo", 9), ("sparse", 2), ("lozo", 2)];
/// The `--tiny` preset of the script: budget and spacing in forward passes, seeds.
const BUDGET: u64 = 120;
const EVAL_EVERY: u64 = 40;
const SEEDS: &[u64] = &[0, 1];

/// The steps at which a run of `fp` forward passes per step is evaluated.
fn eval_steps(fp: u64) -> Vec<u64> {
    let steps = (BUDGET / fp).max(1);
    let every = (EVAL_EVERY / fp).max(1);
    let mut at: Vec<u64> = (0..steps).step_by(every as usize).collect();
    at.push(steps);
    at
}

#[test]
fn tiny_convergence_benchmark_writes_its_section_curves_and_picture() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results.md");
    std::fs::write(
        &results,
        "# Benchmark results\n\n## Another benchmark\n\nkept as it was\n",
    )
    .unwrap();
    let picture = tmp.path().join("c.svg");
    let names: Vec<&str> = ESTIMATORS.iter().map(|(e, _)| *e).collect();
    let out = check(
        python()
            .current_dir(root())
            .arg("bench/convergence.py")
            .args(["--tiny", "--estimators", &names.join(",")])
            .arg("--out")
            .arg(tmp.path())
            .arg("--results")
            .arg(&results)
            .arg("--picture")
            .arg(&picture)
            .env("MEZOD", env!("CARGO_BIN_EXE_mezod"))
            .env("MEZOD_LOG", "warn")
            .output()
            .unwrap(),
        "bench/convergence.py --tiny",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);

    let md = std::fs::read_to_string(&results).unwrap();
    assert!(
        md.contains("## Another benchmark\n\nkept as it was"),
        "{md}"
    );
    let section = &md[md.find("## Convergence").expect("a Convergence section")..];
    for (name, fp) in ESTIMATORS {
        // One row in the convergence table and one in the cost table.
        let rows = section
            .lines()
            .filter(|l| l.starts_with(&format!("| {name} |")))
            .collect::<Vec<_>>();
        assert_eq!(rows.len(), 2, "{section}");
        assert!(
            rows[0].contains(&format!("| {fp} | {} |", BUDGET / fp)),
            "{}",
            rows[0]
        );
    }
    assert!(stdout.contains("## Convergence"), "{stdout}");

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("convergence.json")).unwrap(),
    )
    .unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), ESTIMATORS.len() * SEEDS.len());
    for (name, fp) in ESTIMATORS {
        for seed in SEEDS {
            let run = runs
                .iter()
                .find(|r| r["estimator"] == *name && r["seed"] == *seed)
                .unwrap_or_else(|| panic!("no run of {name} seed {seed}"));
            assert_eq!(run["forward_passes_per_step"], *fp);
            let curve = run["curve"].as_array().unwrap();
            let steps: Vec<u64> = curve.iter().map(|p| p["step"].as_u64().unwrap()).collect();
            assert_eq!(steps, eval_steps(*fp), "{name} seed {seed}");
            for p in curve {
                assert_eq!(
                    p["forward_passes"].as_u64(),
                    Some(p["step"].as_u64().unwrap() * fp)
                );
                let v = p["value"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&v), "{v}");
            }
            assert_eq!(run["result"]["steps"], BUDGET / fp);
        }
    }

    let svg = std::fs::read_to_string(&picture).unwrap();
    assert!(
        svg.contains("<svg") && svg.len() > 5_000,
        "{} bytes",
        svg.len()
    );
    for (name, _) in ESTIMATORS {
        // matplotlib writes legend text as glyph paths, naming the text in a comment.
        assert!(svg.contains(name), "{name} not in the picture's legend");
    }
}
