//! Writing weights: safetensors files that transformers reads (`format: pt`)
//! and whole HF model directories.  Files are written beside their final
//! name, fsynced, then renamed: a crash never leaves a half-written file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::{Dtype as StDtype, View};
use tch::{Device, Kind, Tensor};

use super::adapters::Tuning;
use super::LanguageModel;

/// A libtorch tensor seen through safetensors' `View`; bytes are copied to
/// the CPU one tensor at a time, only while that tensor is written.
struct TensorView<'a> {
    tensor: &'a Tensor,
    shape: Vec<usize>,
    dtype: StDtype,
}

impl<'a> TensorView<'a> {
    fn new(tensor: &'a Tensor) -> Result<Self> {
        let dtype = match tensor.kind() {
            Kind::Float => StDtype::F32,
            Kind::BFloat16 => StDtype::BF16,
            Kind::Half => StDtype::F16,
            Kind::Double => StDtype::F64,
            k => bail!("cannot store a {k:?} tensor"),
        };
        Ok(Self {
            tensor,
            shape: tensor.size().iter().map(|&d| d as usize).collect(),
            dtype,
        })
    }
}

impl View for TensorView<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let t = self.tensor.to_device(Device::Cpu).contiguous();
        let mut buf = vec![0u8; self.data_len()];
        t.copy_data_u8(&mut buf, t.numel());
        Cow::Owned(buf)
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Write named tensors to `path` atomically, with `format: pt` and `extra` metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, &Tensor)],
    extra: &[(&str, String)],
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), TensorView::new(t)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    meta.insert("format".into(), "pt".into());
    mezod_core::durable::write_with(path, |tmp| {
        Ok(safetensors::serialize_to_file(views, Some(meta), tmp)?)
    })
}

/// Save `model` as a Hugging Face directory: weights, config and tokenizer files.
pub fn export_hf(model: &LanguageModel, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let weights = model.export_weights();
    let tensors: Vec<(String, &Tensor)> = weights.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&out.join("model.safetensors"), &tensors, &[])?;
    if let Tuning::Prefix(_) = &model.tuning {
        // Not an HF weight: the trained prefixes travel beside the base model.
        let tensors: Vec<(String, &Tensor)> = model
            .params
            .iter()
            .map(|p| (p.name.clone(), &p.tensor))
            .collect();
        write_safetensors(&out.join("prefix.safetensors"), &tensors, &[])?;
    }
    let mut config: serde_json::Value = serde_json::from_str(&model.config_text)?;
    let dtype = match model.dtype {
        super::Dtype::F32 => "float32",
        super::Dtype::Bf16 => "bfloat16",
        super::Dtype::F16 => "float16",
    };
    config["torch_dtype"] = dtype.into();
    config["dtype"] = dtype.into();
    mezod_core::durable::write(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    if super::gguf::is_gguf(&model.dir) {
        // No tokenizer files to copy: write the one built from the metadata.
        model.tokenizer.save(&out.join("tokenizer.json"))?;
        let token = |key: &str| {
            config[key]
                .as_u64()
                .map(|id| model.tokenizer.decode_token(id as i64))
        };
        let tok_config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "pad_token": token("pad_token_id"),
        });
        mezod_core::durable::write(
            &out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tok_config)?,
        )?;
        return Ok(());
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let src = model.dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// Save a LoRA- or prefix-tuned model's trained tensors as a PEFT adapter
/// directory (`adapter_config.json` + `adapter_model.safetensors`) that
/// `PeftModel.from_pretrained(base, dir)` loads onto the base model.
pub fn export_peft_adapter(model: &LanguageModel, out: &Path) -> Result<()> {
    let masked = model.is_masked_lm();
    let task_type = if masked {
        serde_json::Value::Null
    } else {
        "CAUSAL_LM".into()
    };
    // Where the base came from, as PEFT records it (the folder, GGUF file or
    // random-weight config's folder the run loaded).
    let base = model.dir.display().to_string();
    let (tensors, config) = match &model.tuning {
        Tuning::Lora(cfg) => {
            let tensors: Vec<(String, Tensor)> = model
                .lora_sites
                .iter()
                .flat_map(|s| {
                    let name = |part: &str| format!("base_model.model.{}.{part}.weight", s.module);
                    [
                        (name("lora_A"), s.lora.a.shallow_clone()),
                        (name("lora_B"), s.lora.b.shallow_clone()),
                    ]
                })
                .collect();
            let config = serde_json::json!({
                "peft_type": "LORA",
                "task_type": task_type,
                "r": cfg.r,
                "lora_alpha": cfg.alpha,
                "target_modules": cfg.targets,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": model.lora_sites.iter().any(|s| s.transposed),
                "init_lora_weights": true,
                "inference_mode": true,
                "modules_to_save": null,
                "base_model_name_or_path": base,
            });
            (tensors, config)
        }
        Tuning::Prefix(cfg) if !masked => {
            // PEFT's layout: `prompt_embeddings [n, layers · 2 · kv_heads · head_dim]`,
            // per token the layers' keys then values, each `[kv_heads, head_dim]` flattened.
            let per_token: Vec<Tensor> = model
                .params
                .iter()
                .map(|p| {
                    let (heads, n, d) = p.tensor.size3().expect("prefixes are [heads, n, d]");
                    p.tensor.permute([1, 0, 2]).reshape([n, heads * d])
                })
                .collect();
            let (heads, _, d) = model.params.0[0].tensor.size3()?;
            let embeddings = Tensor::cat(&per_token, 1);
            let config = serde_json::json!({
                "peft_type": "PREFIX_TUNING",
                "task_type": task_type,
                "num_virtual_tokens": cfg.tokens,
                "token_dim": heads * d,
                "num_attention_heads": heads,
                "num_layers": model.params.len() / 2,
                "num_transformer_submodules": 1,
                "encoder_hidden_size": heads * d,
                "prefix_projection": false,
                "inference_mode": true,
                "base_model_name_or_path": base,
            });
            (vec![("prompt_embeddings".to_string(), embeddings)], config)
        }
        Tuning::Prefix(_) => bail!("PEFT has no prefix adapter for masked LMs"),
        Tuning::Full => bail!("a fully tuned model has no adapter: its model/ is the fine-tune"),
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&out.join("adapter_model.safetensors"), &refs, &[])?;
    mezod_core::durable::write(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}
