//! Periodic snapshots of the trainable weights, so a resume replays only the
//! steps after the latest one.  Each snapshot carries the SHA-256 of its file
//! in a sidecar; a snapshot whose hash does not match is ignored, never loaded.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::model::export::write_safetensors;
use crate::model::ParamList;

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

fn snapshot_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.safetensors"))
}

/// Save the weights as they are after `step` steps; keep the newest `keep`.
pub fn save(dir: &Path, step: u64, params: &ParamList, keep: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = snapshot_path(dir, step);
    let tensors: Vec<(String, &Tensor)> =
        params.iter().map(|p| (p.name.clone(), &p.tensor)).collect();
    write_safetensors(&path, &tensors, &[("step", step.to_string())])?;
    mezod_core::crash::point("snapshot-before-hash");
    let hash = sha256_file(&path)?;
    let side = path.with_extension("sha256");
    mezod_core::durable::write(&side, &hash)?;
    for old in list(dir)?.into_iter().rev().skip(keep) {
        let _ = std::fs::remove_file(snapshot_path(dir, old));
        let _ = std::fs::remove_file(snapshot_path(dir, old).with_extension("sha256"));
    }
    Ok(())
}

/// Steps that have a snapshot file, ascending.
pub fn list(dir: &Path) -> Result<Vec<u64>> {
    let mut steps = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(steps);
    };
    for e in entries {
        let name = e?.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".safetensors"))
        {
            if let Ok(s) = step.parse() {
                steps.push(s);
            }
        }
    }
    steps.sort();
    Ok(steps)
}

/// Load the newest valid snapshot at or before `max_step` into `params`; its step.
pub fn restore_latest(dir: &Path, max_step: u64, params: &ParamList) -> Result<Option<u64>> {
    for step in list(dir)?.into_iter().rev().filter(|&s| s <= max_step) {
        let path = snapshot_path(dir, step);
        let expected = std::fs::read_to_string(path.with_extension("sha256")).unwrap_or_default();
        if sha256_file(&path)? != expected.trim() {
            tracing::warn!(
                "snapshot {} fails its hash check; ignoring it",
                path.display()
            );
            continue;
        }
        load_into(&path, params)?;
        return Ok(Some(step));
    }
    Ok(None)
}

fn load_into(path: &Path, params: &ParamList) -> Result<()> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let _guard = tch::no_grad_guard();
    for p in params.iter() {
        let view = st
            .tensor(&p.name)
            .with_context(|| format!("snapshot {} lacks {}", path.display(), p.name))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, p.tensor.kind())?;
        if t.size() != p.tensor.size() {
            bail!(
                "snapshot {} has {} with shape {:?}, expected {:?}",
                path.display(),
                p.name,
                t.size(),
                p.tensor.size()
            );
        }
        p.tensor.shallow_clone().copy_(&t);
    }
    Ok(())
}
