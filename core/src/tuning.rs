//! Which weights a job tunes (full, LoRA, prefix) and PEFT's naming rules for
//! LoRA targets: the job-file vocabulary the control plane (estimates) and the
//! engine (adapters, in the engine's `model::adapters`) share.

/// Which weights a job tunes.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Tuning {
    /// Every weight of the model (the MeZO paper's "full").
    #[default]
    Full,
    Lora(LoraConfig),
    Prefix(PrefixConfig),
}

impl Tuning {
    /// The name used in job files, `.mezo` files and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Tuning::Full => "full",
            Tuning::Lora(_) => "lora",
            Tuning::Prefix(_) => "prefix",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    /// Module-name suffixes, matched as PEFT's `target_modules` list is: a
    /// linear layer is a target when its name is the target or ends with
    /// `.{target}`.  Empty: the model type's default (see [`default_lora_targets`]).
    pub targets: Vec<String>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixConfig {
    pub tokens: i64,
    pub seed: u64,
}

/// PEFT's default LoRA targets per model type: the query and value projections
/// (GPT-2 fuses q, k and v into one `c_attn` layer, which is then the target).
pub fn default_lora_targets(model_type: &str) -> Vec<String> {
    let names: &[&str] = match model_type {
        "gpt2" => &["c_attn"],
        "bert" | "roberta" => &["query", "value"],
        _ => &["q_proj", "v_proj"],
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// True when the module `name` is one of `targets` (PEFT's suffix rule).
pub fn is_target(name: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| name == t || name.ends_with(&format!(".{t}")))
}
