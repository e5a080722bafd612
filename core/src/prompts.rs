//! The built-in prompts a job names by `task.template` (the MeZO paper's
//! SST-2, RTE, BoolQ and COPA), in the one table both sides read: the engine
//! fills them (`src/data/task/from_spec.rs`), and a job check asks the data
//! for the fields they name (`job_check.rs`) before a worker starts.  Kept
//! here, without libtorch, so the two can never disagree on a field.

/// Where a masked LM's answer goes in a template.
pub const MASK: &str = "{mask}";

/// In a preset's templates, the job's `data.text_field`.
const TEXT_FIELD: &str = "text";

/// The classification preset a job without `task.template` gets.
pub const DEFAULT_CLASSIFICATION: &str = "sst2";

/// A built-in classification prompt: what a causal LM reads before the answer
/// word, what a masked LM reads with its mask where the word goes, and the
/// word of each usual label value.
#[derive(Debug)]
pub struct ClassificationPreset {
    pub name: &'static str,
    template: &'static str,
    mask_template: &'static str,
    label_words: &'static [(&'static str, &'static str)],
}

/// The classification presets (`{text}` is the job's `data.text_field`).
pub static CLASSIFICATION: [ClassificationPreset; 3] = [
    ClassificationPreset {
        name: "sst2",
        template: "{text} It was",
        // The MeZO paper's RoBERTa prompt for SST-2 (LM-BFF): "<S1> It was [MASK] ."
        mask_template: "{text} It was {mask}.",
        label_words: &[
            ("0", "terrible"),
            ("1", "great"),
            ("negative", "terrible"),
            ("positive", "great"),
        ],
    },
    ClassificationPreset {
        name: "rte",
        template: "{premise}\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\n",
        // The paper's RoBERTa prompt for RTE: "<S1> ? [MASK] , <S2>".
        mask_template: "{premise}? {mask}, {hypothesis}",
        label_words: &[
            ("0", "Yes"),
            ("1", "No"),
            ("entailment", "Yes"),
            ("not_entailment", "No"),
        ],
    },
    ClassificationPreset {
        name: "boolq",
        template: "{passage} {question}?",
        mask_template: "{passage} {question}? {mask}",
        label_words: &[
            ("1", "Yes"),
            ("0", "No"),
            ("true", "Yes"),
            ("false", "No"),
            ("True", "Yes"),
            ("False", "No"),
        ],
    },
];

impl ClassificationPreset {
    /// The preset called `name`; None for a prompt of the job's own.
    pub fn named(name: &str) -> Option<&'static ClassificationPreset> {
        CLASSIFICATION.iter().find(|p| p.name == name)
    }

    /// The causal LM's prompt, `{field}` placeholders to fill.
    pub fn template(&self, text_field: &str) -> String {
        with_text_field(self.template, text_field)
    }

    /// The masked LM's prompt, with [`MASK`] once.
    pub fn mask_template(&self, text_field: &str) -> String {
        with_text_field(self.mask_template, text_field)
    }

    /// Label value → answer word.
    pub fn label_words(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        self.label_words.iter().copied()
    }

    /// The fields of an example the prompts read.
    pub fn fields(&self, text_field: &str) -> Vec<String> {
        template_fields(self.template)
            .into_iter()
            .map(|f| {
                if f == TEXT_FIELD {
                    text_field.to_string()
                } else {
                    f
                }
            })
            .collect()
    }
}

fn with_text_field(template: &str, text_field: &str) -> String {
    template.replace(&format!("{{{TEXT_FIELD}}}"), &format!("{{{text_field}}}"))
}

/// COPA, the built-in multiple-choice prompt: the premise joined to each
/// choice with "because" (when the question is `cause`) or "so".  The engine
/// writes the join; this names the fields it reads.
#[derive(Debug)]
pub struct CopaPreset {
    pub name: &'static str,
    pub premise: &'static str,
    pub question: &'static str,
    /// The candidate answers' fields when the job names none.
    pub choices: [&'static str; 2],
}

pub const COPA: CopaPreset = CopaPreset {
    name: "copa",
    premise: "premise",
    question: "question",
    choices: ["choice1", "choice2"],
};

/// The `{field}` placeholders of a template, in order (not [`MASK`], which
/// is no field).
pub(crate) fn template_fields(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let placeholder = &rest[start..start + len + 1];
        if placeholder != MASK {
            out.push(placeholder[1..placeholder.len() - 1].to_string());
        }
        rest = &rest[start + len + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_name_the_fields_their_prompts_read() {
        let fields = |name| ClassificationPreset::named(name).unwrap().fields("review");
        assert_eq!(fields("sst2"), ["review"]);
        assert_eq!(fields("rte"), ["premise", "hypothesis"]);
        assert_eq!(fields("boolq"), ["passage", "question"]);
        assert!(ClassificationPreset::named(DEFAULT_CLASSIFICATION).is_some());
        assert!(ClassificationPreset::named("{text} is").is_none());
        for p in &CLASSIFICATION {
            assert_eq!(p.mask_template("t").matches(MASK).count(), 1, "{}", p.name);
            assert_eq!(
                template_fields(p.mask_template),
                template_fields(p.template)
            );
        }
        assert_eq!(
            ClassificationPreset::named("sst2")
                .unwrap()
                .template("review"),
            "{review} It was"
        );
    }
}
