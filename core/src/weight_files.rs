//! Where a Hugging Face directory keeps its weights (one `model.safetensors`
//! or shards listed by `model.safetensors.index.json`) and the tensor shapes
//! their headers declare: all an estimate needs, without reading a weight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::SafeTensors;

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The safetensors files of the checkpoint in `dir`, in a stable order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if !index_path.is_file() {
        bail!(
            "no weights in {}: expected model.safetensors or model.safetensors.index.json \
             (PyTorch .bin checkpoints are not read; convert them to safetensors)",
            dir.display()
        );
    }
    let text = crate::safe_fs::read_user_text(&index_path, crate::safe_fs::MAX_JSON_BYTES)?;
    let idx: ShardIndex = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid shard index", index_path.display()))?;
    let mut names: Vec<String> = idx.weight_map.values().cloned().collect();
    names.sort();
    names.dedup();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// (name, shape) of every stored tensor, sorted by name, from the headers alone.
pub(crate) fn safetensors_shapes(dir: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut out = Vec::new();
    for path in safetensors_files(dir)? {
        let file = crate::safe_fs::open_user_file(&path)?;
        // SAFETY: read-only map of a file read once, here, for its header.
        let map =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&map)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        for (name, info) in meta.tensors() {
            out.push((name, info.shape.clone()));
        }
    }
    out.sort();
    Ok(out)
}
