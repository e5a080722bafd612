//! What a user gets back is what they trained: the final weights by default,
//! `export: best` on request, plain words whenever the weights handed back
//! are still the base model's, and baselines-only jobs that claim no model.

mod common;
use common::*;
use std::path::Path;

/// `mezod run` from the repository root, as the README types it.
fn run_from_root(job: &str, out: &Path) -> std::process::Output {
    mezod()
        .current_dir(root())
        .args(["run", job, "--out"])
        .arg(out)
        .output()
        .unwrap()
}

/// The tensors of a safetensors file named like `pattern`, each as its raw bytes.
fn tensors_named(file: &Path, pattern: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.contains(pattern))
        .map(|(_, t)| {
            let at = t["data_offsets"].as_array().unwrap();
            let (a, b) = (at[0].as_u64().unwrap(), at[1].as_u64().unwrap());
            data[a as usize..b as usize].to_vec()
        })
        .collect()
}

fn summary(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_lora_example_hands_back_its_trained_adapters_and_says_which_step() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("lora");
    let out = check(
        run_from_root("examples/lora.yaml", &run),
        "the lora example",
    );
    let r = read_result(&run);
    let steps = r["steps"].as_u64().unwrap();
    assert_eq!(steps, 200, "{r:#}");
    assert_eq!(r["exported"]["step"], steps, "{r:#}");
    assert_eq!(r["exported"]["export"], "final", "{r:#}");
    assert_eq!(r["exported"]["untrained"], false, "{r:#}");
    let said = summary(&out);
    assert!(
        said.contains(&format!(
            "fine-tuned model: {} (the final weights (step {steps}",
            run.join("model").display()
        )),
        "{said}"
    );
    // The adapters are trained: no lora_B is all zero (they start at zero).
    let b = tensors_named(&run.join("adapter/adapter_model.safetensors"), "lora_B");
    assert!(!b.is_empty());
    for t in &b {
        assert!(t.iter().any(|&x| x != 0), "a lora_B stayed zero");
    }
    // `mezod export` takes the same steps by default.
    let tune = export_tune_file(&run, &tmp.path().join("lora.mezo"));
    assert_eq!(tune["steps"].as_array().unwrap().len() as u64, steps);
}

#[test]
fn export_best_on_a_run_that_changed_nothing_says_the_weights_are_the_base_models() {
    let tmp = tempfile::tempdir().unwrap();
    // lr 0: every dev evaluation ties, the later step wins the tie, and the
    // adapters are still the ones the run started from.
    let text = example_job_text("lora")
        .replace("steps: 200", "steps: 20")
        .replace("lr: 1.0e-4", "lr: 0")
        .replace("eval_every: 100", "eval_every: 10")
        + "export: best\n";
    let job = tmp.path().join("still.yaml");
    std::fs::write(&job, text).unwrap();
    let run = tmp.path().join("still");
    let out = run_to_end(&job, &run, "an lr 0 run");
    let r = read_result(&run);
    assert_eq!(r["exported"]["export"], "best", "{r:#}");
    assert_eq!(
        r["exported"]["step"], 20,
        "ties go to the later step: {r:#}"
    );
    assert_eq!(r["exported"]["untrained"], true, "{r:#}");
    let said = summary(&out);
    assert!(
        said.contains(&format!("model: {} holds", run.join("model").display()))
            && said.contains("every lora_B is still zero")
            && !said.contains("fine-tuned model"),
        "{said}"
    );
}

#[test]
fn a_baselines_only_job_needs_no_mezo_section_and_claims_no_model() {
    let tmp = tempfile::tempdir().unwrap();
    let text = example_job_text("classification");
    let (head, _) = text
        .split_once("\nmezo:")
        .expect("the example has a mezo section");
    let baselines = format!("{head}\nmode: [zero_shot, icl]\nicl: {{k: 2}}\n");
    let job = tmp.path().join("baselines.yaml");
    std::fs::write(&job, &baselines).unwrap();
    let run = tmp.path().join("baselines");
    let out = run_to_end(&job, &run, "a baselines-only job");
    let said = summary(&out);
    assert!(
        said.contains("icl with 2 demonstrations")
            && said.contains("nothing was fine-tuned, so no model was exported")
            && !said.contains("fine-tuned model"),
        "{said}"
    );
    assert!(!run.join("model").exists() && !run.join("loss.svg").exists());
    let r = read_result(&run);
    assert!(r.get("exported").is_none(), "{r:#}");
    assert!(r["baselines"]["icl"]["dev"].is_number(), "{r:#}");
    // Run again: the result stands, nothing is redone.
    let again = run_to_end(&job, &run, "the same job again");
    assert_eq!(summary(&again), said);
    assert_eq!(read_result(&run), r);

    // Fine-tuning (the default mode) without a mezo section: told what to add.
    let job = tmp.path().join("no-mezo.yaml");
    std::fs::write(&job, head).unwrap();
    let out = mezod_run(&job, &tmp.path().join("no-mezo"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no `mezo:` section")
            && err.contains("the default mode is [zero_shot, mezo]")
            && err.contains("mode: [zero_shot, icl]"),
        "{err}"
    );
}
