//! Passkey retrieval: a 5-digit pass key hidden at a chosen depth in repeated filler
//! text, as in the classic long-context test (the instruction, filler, key sentence
//! and question are that test's, reproduced because they define it).
//!
//! Sample `i` puts the key at depth [`super::DEPTHS`]`[i % 11]`: after
//! `round(d * n)` of the `n` filler units. `meta`: `depth` (relative byte position of
//! the key sentence in the filler context), `depth_target`, `needle_positions` (byte
//! offset of the key sentence in `input`), `passkey`.

use rand::Rng;
use serde_json::{json, Map};

use super::ruler::NOISE;
use super::{Ctx, Error, DEPTHS};
use crate::sample::{Metric, Sample};

const MAX_NEW: usize = 16;
const INSTRUCTION: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.";
const QUESTION: &str = "What is the pass key?";
const PREFIX: &str = " The pass key is";

pub(crate) fn generate(ctx: &Ctx) -> Result<Sample, Error> {
    let budget = ctx.budget(MAX_NEW)?;
    let key: u32 = ctx.rng(0).gen_range(10000..=99999);
    let info = format!("The pass key is {key}. Remember it. {key} is the pass key.");
    let depth_target = DEPTHS[ctx.index % DEPTHS.len()];
    let fitted = ctx.fit(ctx.task, ctx.cfg.length, 1, 50_000_000, budget, |n| {
        let before = ((depth_target * n as f64).round() as usize).min(n);
        let filler = |k: usize| vec![NOISE; k].join(" ");
        let mut context = filler(before);
        if !context.is_empty() {
            context.push('\n');
        }
        let offset = context.len();
        context.push_str(&info);
        if n > before {
            context.push('\n');
            context.push_str(&filler(n - before));
        }
        let input = format!("{INSTRUCTION}\n{context}\n{QUESTION}");
        let tokens = ctx.count(&format!("{input}{PREFIX}"));
        Ok(((input, offset, context.len()), tokens))
    })?;
    let (input, offset, context_len) = fitted.out;
    let mut extra = Map::new();
    extra.insert("depth".into(), json!(offset as f64 / context_len as f64));
    extra.insert("depth_target".into(), json!(depth_target));
    extra.insert(
        "needle_positions".into(),
        json!([INSTRUCTION.len() + 1 + offset]),
    );
    extra.insert("passkey".into(), json!(key.to_string()));
    Ok(ctx.sample(
        input,
        PREFIX.to_string(),
        vec![key.to_string()],
        Metric::StringMatchAll,
        MAX_NEW,
        fitted.tokens,
        fitted.n,
        extra,
    ))
}
