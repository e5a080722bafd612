//! The command line end to end: `forward --json`, exported models loading in
//! transformers, classification and multiple-choice jobs, bad job files.

mod common;
#[path = "common/svg.rs"]
mod svg;
use common::*;

#[test]
fn forward_json_matches_transformers_logits_and_ids() {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen2").join("reference.json")).unwrap(),
    )
    .unwrap();
    let case = &r["cases"][1];
    let text = case["text"].as_str().unwrap();
    let out = check(
        mezod()
            .args(["forward", "--json", "--text", text, "--model"])
            .arg(fixture("qwen2"))
            .output()
            .unwrap(),
        "forward",
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["ids"], case["ids"][0]);
    assert!(got["loss"].as_f64().unwrap() > 0.0);
    let (want, have) = (
        case["logits"][0].as_array().unwrap(),
        got["logits"].as_array().unwrap(),
    );
    assert_eq!(want.len(), have.len());
    let mut worst = 0f64;
    for (w, h) in want.iter().zip(have) {
        for (a, b) in w.as_array().unwrap().iter().zip(h.as_array().unwrap()) {
            worst = worst.max((a.as_f64().unwrap() - b.as_f64().unwrap()).abs());
        }
    }
    assert!(worst <= 1e-4, "forward --json logits differ by {worst}");
    // --ids gives the same as the text's ids; the plain output names the loss.
    let ids: Vec<String> = case["ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = check(
        mezod()
            .args(["forward", "--ids", &ids.join(","), "--model"])
            .arg(fixture("qwen2"))
            .output()
            .unwrap(),
        "forward",
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("mean next-token cross-entropy"));
}

#[test]
fn exported_model_loads_in_transformers_with_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let job = causal_job(
        tmp.path(),
        "gpt2",
        "steps: 5, batch_size: 2, lr: 1.0e-2, seed: 2",
    );
    // No dev set: the export is the final weights, whatever a dev metric would say.
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("max_dev: 16", "max_dev: 0");
    std::fs::write(&job, text).unwrap();
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "run");
    let model = run.join("model");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(model.join(f).is_file(), "model/ lacks {f}");
    }
    let out = check(
        mezod()
            .args(["forward", "--json", "--ids", "5,17,42,99,7", "--model"])
            .arg(&model)
            .output()
            .unwrap(),
        "forward",
    );
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from safetensors import safe_open
d = sys.argv[1]
assert safe_open(d + "/model.safetensors", "pt").metadata()["format"] == "pt"
m = AutoModelForCausalLM.from_pretrained(d).eval()
with torch.no_grad():
    print(json.dumps(m(torch.tensor([[5, 17, 42, 99, 7]])).logits[0].tolist()))
"#;
    let out = check(
        python().arg("-c").arg(script).arg(&model).output().unwrap(),
        "transformers load",
    );
    let theirs: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    let mut worst = 0f64;
    for (row, t) in ours["logits"].as_array().unwrap().iter().zip(&theirs) {
        for (a, b) in row.as_array().unwrap().iter().zip(t) {
            worst = worst.max((a.as_f64().unwrap() - b).abs());
        }
    }
    assert!(worst <= 1e-4, "exported model: logits differ by {worst}");
    // And the export really is the fine-tuned model, not the base.
    assert_ne!(
        sha256(&model.join("model.safetensors")),
        sha256(&fixture("gpt2").join("model.safetensors"))
    );
}

#[test]
fn classification_job_reports_zero_shot_best_and_final_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let text = example_job_text("classification")
        .replace("steps: 300", "steps: 20")
        .replace("eval_every: 100", "eval_every: 10")
        .replace("split_seed: 1", "split_seed: 1, test_fraction: 0.2");
    let job_copy = tmp.path().join("classification.yaml");
    std::fs::write(&job_copy, text).unwrap();
    let out = run_to_end(&job_copy, &run, "classification run");
    let r: serde_json::Value = read_result(&run);
    assert_eq!(r["metric"], "accuracy");
    for k in [
        "zero_shot",
        "best",
        "final_metric",
        "test_metric",
        "zero_shot_test",
    ] {
        let v = r[k]
            .as_f64()
            .unwrap_or_else(|| panic!("result.json lacks {k}"));
        assert!((0.0..=1.0).contains(&v));
    }
    let evals: Vec<u64> = read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|l| l["kind"] == "eval")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 10, 20]);
    // The base model's test accuracy is measured once, before training, with
    // which of the 48 test examples (a fifth of 240) it got right.
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("zero_shot_test.json")).unwrap())
            .unwrap();
    assert_eq!(r["zero_shot_test"], base["metric"]);
    let right = base["correct"].as_array().unwrap();
    assert_eq!(right.len(), 48);
    let hits = right.iter().filter(|c| c.as_bool().unwrap()).count();
    assert_eq!(base["metric"].as_f64().unwrap(), hits as f64 / 48.0);
    // The paired comparison is of those two test evaluations, and the summary says it.
    let p = &r["test_paired"];
    let f = |k: &str| {
        p[k].as_f64()
            .unwrap_or_else(|| panic!("test_paired lacks {k}: {p}"))
    };
    assert_eq!(p["n"], 48);
    assert_eq!(p["base"], r["zero_shot_test"]);
    assert_eq!(p["tuned"], r["test_metric"]);
    let discordant = f("only_tuned") - f("only_base");
    assert!((f("difference") - discordant / 48.0).abs() < 1e-12, "{p}");
    assert!(
        (f("difference") - (f("tuned") - f("base"))).abs() < 1e-12,
        "{p}"
    );
    assert!(
        f("ci_low") <= f("difference") && f("difference") <= f("ci_high"),
        "{p}"
    );
    assert!((0.0..=1.0).contains(&f("mcnemar_p")), "{p}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("test accuracy ")
            && stdout.contains("95% CI")
            && stdout.contains("n = 48)"),
        "{stdout}"
    );
    // The admission estimate covers the measured peak without doubling it: the
    // activations are sized at OPT's 64 positions, not the 512 tokens asked for.
    let estimate = check(
        mezod()
            .arg("estimate")
            .arg(&job_copy)
            .arg("--json")
            .output()
            .unwrap(),
        "estimate",
    );
    let estimate = serde_json::from_slice::<serde_json::Value>(&estimate.stdout).unwrap()["total"]
        .as_f64()
        .unwrap();
    let peak = r["peak_memory_bytes"].as_f64().unwrap();
    assert!(
        estimate >= 0.95 * peak && estimate <= 1.25 * peak,
        "estimate {:.0} MiB against a peak of {:.0} MiB",
        estimate / 1048576.0,
        peak / 1048576.0
    );
    // The chart renders: named by the job file, with the dev accuracy on its own axis.
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    let texts = svg::texts(&svg);
    for text in [
        "classification",
        "dev accuracy (right axis)",
        "training loss (loss+)",
    ] {
        assert!(
            texts.iter().any(|t| t == text),
            "loss.svg lacks {text:?}: {texts:?}"
        );
    }
    let picture = svg::render(&svg);
    let size = (picture.pixmap.width(), picture.pixmap.height());
    assert_eq!(size, (mezod::run::plot::WIDTH, mezod::run::plot::HEIGHT));
    assert!(svg::inked(&picture.pixmap) > (size.0 * size.1 / 100) as usize);
}

#[test]
fn copa_multiple_choice_runs_and_scores_candidates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("copa.jsonl");
    let rows = [
        r#"{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.", "choice2": "He got a hole in his sock.", "question": "cause", "label": 0}"#,
        r#"{"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.", "choice2": "The liquid in the bottle poured out.", "question": "effect", "label": 1}"#,
        r#"{"premise": "The film was dull.", "choice1": "I fell asleep.", "choice2": "I cheered loudly.", "question": "effect", "label": 0}"#,
        r#"{"premise": "The cast was great.", "choice1": "The actors were skilled.", "choice2": "The seats were red.", "question": "cause", "label": 0}"#,
    ];
    std::fs::write(&data, rows.join("\n")).unwrap();
    let job = tmp.path().join("copa.yaml");
    std::fs::write(
        &job,
        format!(
            "model: {{path: {}}}\ntask: {{kind: multiple_choice, template: copa}}\n\
             data: {{train: {}, dev: {}}}\nmezo: {{steps: 4, batch_size: 2, lr: 1.0e-3, seed: 1}}\n",
            fixture("llama3").display(), data.display(), data.display()
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    run_to_end(&job, &run, "copa run");
    let steps: Vec<f64> = read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|l| l["kind"] == "step")
        .map(|l| l["loss_plus"].as_f64().unwrap())
        .collect();
    assert_eq!(steps.len(), 4);
    // Cross-entropy over two candidates: positive, and near ln 2 for an untrained model.
    assert!(steps.iter().all(|&l| l > 0.0 && l < 5.0), "{steps:?}");
}

#[test]
fn bad_job_files_fail_with_plain_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("model: {path: m}\ntask: {kind: causal_lm}\ndata: {train: t.jsonl}\nmezo: {steps: 1, lr: 1, lerning_rate: 2}\n", "unknown field `lerning_rate`"),
        ("model: {path: m}\ntask: {kind: causal_lm}\ndata: {train: t.jsonl}\nmezo: {steps: 1, lr: 1}\n", "does not exist"),
        ("model: [\n", "line"),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let job = tmp.path().join(format!("bad{i}.yaml"));
        std::fs::write(&job, text).unwrap();
        let out = mezod()
            .arg("run")
            .arg(&job)
            .arg("--out")
            .arg(tmp.path().join(format!("run{i}")))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains(expect),
            "case {i}: expected {expect:?} in {stderr}"
        );
    }
}

/// Run a GPU bench script in its CPU dry run; returns its stdout.
fn gpu_script_dry_run(script: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let py = std::env::var("MEZOD_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv/bin/python"));
    let out = std::process::Command::new(root().join(script))
        .env("MEZOD_GPU_DRY", "1")
        .env("MEZOD", env!("CARGO_BIN_EXE_mezod"))
        .env("PYTHON", py)
        .env("OUT", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `bench/gpu.sh` is meant for a lent GPU machine; its dry run goes through
/// the same steps on the CPU (benchmarks of random-weight models, the table,
/// a killed-and-resumed 20-step job, the learning row on a tiny model), so the
/// script is known to work before it meets a GPU.
#[test]
fn the_gpu_script_runs_end_to_end_in_its_cpu_dry_run() {
    let stdout = gpu_script_dry_run("bench/gpu.sh");
    assert!(stdout.contains("| tiny-llama f32 | 4 × 32 |"), "{stdout}");
    assert!(stdout.contains("| tiny-opt bf16 | 4 × 32 |"), "{stdout}");
    check_learning_row(&stdout);
    let last = stdout.lines().last().unwrap_or("");
    assert!(
        last.starts_with("resume: killed after") && last.contains("weights identical"),
        "{stdout}"
    );
}

/// The learning row of `bench/gpu.sh`'s dry run: three learning rates of 20
/// steps each on the tiny OPT fixture, the one best on dev reported with the
/// base and tuned model's dev and test accuracy, the paired interval and
/// McNemar's p, as a table (one row per rate) and one `learning: key=value …` line.
fn check_learning_row(stdout: &str) {
    let rates = ["3.0e-2", "1.0e-2", "3.0e-3"];
    assert!(
        stdout.contains("| lr | dev: base → best (at step) |"),
        "{stdout}"
    );
    // Each rate's best dev accuracy, from its table row.
    let best_dev = |lr: &str| -> f64 {
        let row = stdout
            .lines()
            .find(|l| {
                l.starts_with(&format!("| {lr} |"))
                    || l.starts_with(&format!("| **{lr}**, chosen |"))
            })
            .unwrap_or_else(|| panic!("no row for {lr} in {stdout}"));
        let dev = row.split(" | ").nth(1).unwrap_or_default();
        let best = dev.split(" → ").nth(1).and_then(|b| b.split(' ').next());
        best.and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no best dev in {row:?}"))
    };
    assert_eq!(stdout.matches(", chosen |").count(), 1, "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("learning: lr="))
        .unwrap_or_else(|| panic!("no learning row in {stdout}"));
    let fields: std::collections::HashMap<&str, &str> = line["learning: ".len()..]
        .split(' ')
        .map(|kv| {
            kv.split_once('=')
                .unwrap_or_else(|| panic!("{kv:?} in {line}"))
        })
        .collect();
    let num = |k: &str| -> f64 {
        fields
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in {line}"))
            .parse()
            .unwrap_or_else(|e| panic!("{k} in {line}: {e}"))
    };
    let lr = fields["lr"];
    assert!(rates.contains(&lr), "{line}");
    assert!(
        stdout.contains(&format!("| **{lr}**, chosen |")),
        "{stdout}"
    );
    // Chosen on dev: no rate did better there.
    for other in rates {
        assert!(
            best_dev(other) <= best_dev(lr),
            "{other} beat {lr} on dev: {stdout}"
        );
    }
    assert!(
        (100.0 * num("dev_best") - best_dev(lr)).abs() < 0.06,
        "{stdout}"
    );
    assert_eq!(num("steps"), 20.0, "{line}");
    assert_eq!(num("batch"), 16.0, "{line}");
    assert_eq!(fields["model"], "opt", "{line}");
    // The test split: a tenth of examples/data/reviews.jsonl's 240 rows.
    assert_eq!(num("n"), 24.0, "{line}");
    for k in [
        "dev_base",
        "dev_best",
        "test_base",
        "test_tuned",
        "mcnemar_p",
    ] {
        assert!((0.0..=1.0).contains(&num(k)), "{k} in {line}");
    }
    // Best on dev counts the base model's evaluation (step 0); dev every 2 steps.
    assert!(num("dev_best") >= num("dev_base"), "{line}");
    let best_step = num("best_step");
    assert!(
        (0.0..=20.0).contains(&best_step) && best_step % 2.0 == 0.0,
        "{line}"
    );
    let diff = num("difference");
    assert!(
        (diff - (num("test_tuned") - num("test_base"))).abs() < 1e-3,
        "{line}"
    );
    assert!(
        -1.0 <= num("ci_low")
            && num("ci_low") <= diff
            && diff <= num("ci_high")
            && num("ci_high") <= 1.0,
        "{line}"
    );
}

/// `bench/gpu_daemon.sh` likewise: two jobs through a daemon, a stop and
/// restart in the middle of one, and its weights against a solo run.
#[test]
fn the_gpu_daemon_script_runs_end_to_end_in_its_cpu_dry_run() {
    let stdout = gpu_script_dry_run("bench/gpu_daemon.sh");
    assert!(
        stdout.contains("| OPT-1.3B bf16 (stopped, resumed) | done | 2 |"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or("");
    assert!(last.contains("weights identical"), "{stdout}");
}

/// `mezod bench --job` times a job's own loss; `--scoring per-candidate`
/// forces one sequence per candidate, and both ways give the same loss.
#[test]
fn bench_of_a_job_scores_candidates_either_way_to_the_same_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job.yaml");
    // " t" and " g" are one token each in the GPT-2 fixture's vocabulary.
    std::fs::write(
        &job,
        format!(
            "model: {{path: {}}}\ntask: {{kind: classification, template: sst2, \
             label_words: {{\"0\": t, \"1\": g}}}}\ndata: {{train: {}}}\nmezo: {{steps: 1, lr: 1.0e-3}}\n",
            fixture("gpt2").display(),
            root().join("examples/data/reviews.jsonl").display()
        ),
    )
    .unwrap();
    let bench = |scoring: &str| -> serde_json::Value {
        let out = check(
            mezod()
                .args([
                    "bench",
                    "--mode",
                    "forward",
                    "--batch",
                    "6",
                    "--iters",
                    "1",
                    "--scoring",
                    scoring,
                    "--job",
                ])
                .arg(&job)
                .output()
                .unwrap(),
            "bench --job",
        );
        serde_json::from_str(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap()
    };
    let (each, shared) = (bench("per-candidate"), bench("shared"));
    assert_eq!(each["scoring"], "per-candidate");
    assert_eq!(shared["scoring"], "shared");
    let (a, b) = (
        each["last_loss"].as_f64().unwrap(),
        shared["last_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
}

/// `mezod bench` takes an estimator's own settings (`--sparsity`, `--rank`)
/// under a job file's rules, uses them (the estimate grows with LOZO's rank)
/// and reports them.
#[test]
fn bench_takes_sparsity_and_rank_under_a_jobs_rules() {
    let bench = |args: &[&str]| {
        mezod()
            .args(["bench", "--mode", "replay", "--iters", "1", "--model"])
            .arg(fixture("llama"))
            .args(args)
            .output()
            .unwrap()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let out = check(bench(args), "bench");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str(text.trim().lines().last().unwrap()).unwrap()
    };
    let rank3 = json(&["--estimator", "lozo", "--rank", "3"]);
    let rank1 = json(&["--estimator", "lozo"]);
    assert_eq!(
        (rank3["rank"].as_u64(), rank1["rank"].as_u64()),
        (Some(3), Some(1))
    );
    assert!(
        rank3["estimate_bytes"].as_u64() > rank1["estimate_bytes"].as_u64(),
        "rank 3's factors: {rank3} against {rank1}"
    );
    let sparse = json(&["--estimator", "sparse", "--sparsity", "0.5"]);
    assert_eq!(sparse["sparsity"].as_f64(), Some(0.5));
    assert!(json(&[])["rank"].is_null());
    for (args, says) in [
        (&["--rank", "2"][..], "settings of mezo.estimator: lozo"),
        (
            &["--estimator", "sparse", "--sparsity", "1.5"],
            "must be in [0, 1)",
        ),
        (&["--estimator", "lozo", "--rank", "65"], "between 1 and 64"),
        (&["--estimator", "fzoo", "--directions", "1"], "at least 2"),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Every file an example in `--help` names exists: a user who copies
/// `mezod submit examples/….yaml` from the help gets a job, not an error.
#[test]
fn every_file_the_help_names_exists() {
    let help = |args: &[&str]| {
        let out = check(mezod().args(args).output().unwrap(), "mezod --help");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    assert!(commands.len() > 10, "{top}");
    let mut named = 0;
    for command in &commands {
        let text = help(&[command.as_str(), "--help"]);
        for word in text.split(|c: char| c.is_whitespace() || c == '`') {
            if let Some(i) = word.find("examples/") {
                let path = word[i..].trim_end_matches([',', '.', ')', ':', ';']);
                named += 1;
                assert!(
                    root().join(path).exists(),
                    "`mezod {command} --help` names {path}, which does not exist"
                );
            }
        }
    }
    assert!(named >= 3, "the help names no example files at all");
}
