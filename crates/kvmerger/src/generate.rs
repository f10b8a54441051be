//! `kvmerger generate`: text from a prompt, a document compressed before the prompt is
//! asked of it (`--context-file`), or a saved context (`--kv`).

use crate::cli::GenerateArgs;
use crate::shared::recipe::{build, mib};
use crate::shared::session::{
    compressed_sequence, decode_sequence, load_kvc, load_model, sampling,
};
use crate::shared::text::read_text;
use anyhow::{bail, Result};
use kvmerger_engine::chat::Message;
use kvmerger_engine::generate::{GenerateParams, Generation};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sequence::Sequence;
use std::io::Write;

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => read_text(f, "prompt file"),
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
    }
}

pub fn run(a: GenerateArgs, dir: &std::path::Path) -> Result<()> {
    let params = sampling(&a.sampling)?;
    let prompt = read_prompt(&a)?;
    if let Some(kv) = &a.kv {
        return generate_from_kv(&a, kv, &prompt, &params, dir);
    }
    let context = match &a.context_file {
        Some(f) => {
            let c = read_text(f, "context file")?;
            if c.trim().is_empty() {
                bail!("the context file {} is empty", f.display());
            }
            Some(c)
        }
        None => None,
    };
    let comp = build(&a.compress)?;
    let (lm, dtype) = load_model(&a.model, dir)?;
    // With a context file, the context is compressed before the prompt (the question)
    // is seen, and the prompt is appended uncompressed: a document read once can be
    // asked anything. Both go into the chat template's user turn.
    let split = match &context {
        Some(c) => lm.split_prompt(&format!("{}\n\n", c.trim_end()), &prompt, "", true)?,
        None => {
            // A chat prompt's own `<|im_end|>` stays text; a raw prompt is the
            // caller's to shape, control tokens included.
            let ids = if a.chat {
                lm.encode_conversation(&[Message::new("user", &prompt)], true, usize::MAX)?
            } else {
                lm.tokenizer.encode(&prompt, true)?
            };
            kvmerger_engine::prompt::SplitPrompt {
                context: ids,
                question: Vec::new(),
                prefix: 0,
            }
        }
    };
    if split.context.is_empty() {
        bail!("the prompt is empty");
    }
    let total = split.context.len() + split.question.len();
    if total >= lm.model.cfg.ctx_len {
        bail!(
            "the prompt of {total} tokens does not fit the model's context of {} tokens",
            lm.model.cfg.ctx_len
        );
    }
    let (mut seq, prefill) = compressed_sequence(&lm, &comp, dtype, &split.context, split.prefix)?;
    let kv_context = seq.cache.bytes();
    if !split.question.is_empty() {
        seq.append(&lm.model, &split.question)?;
    }
    let gen = decode_to_stdout(&lm, &mut seq, &params)?;
    let what = if context.is_some() {
        format!(
            "context {} tokens in {:.2}s ({:.1} tok/s, KV {:.1} MiB), question {} tokens",
            split.context.len(),
            prefill,
            split.context.len() as f64 / prefill,
            kv_context as f64 / (1 << 20) as f64,
            split.question.len()
        )
    } else {
        format!(
            "prompt {} tokens in {:.2}s ({:.1} tok/s)",
            split.context.len(),
            prefill,
            split.context.len() as f64 / prefill
        )
    };
    eprintln!(
        "[{}] {what}; generated {} tokens in {:.2}s ({:.1} tok/s), stop: {:?}; KV cache {:.1} MiB",
        lm.name,
        gen.tokens.len(),
        gen.decode_secs,
        gen.tokens.len() as f64 / gen.decode_secs.max(1e-9),
        gen.stop,
        seq.cache.bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// `generate --kv FILE`: the prompt asked of a saved compressed context.
fn generate_from_kv(
    a: &GenerateArgs,
    kv: &std::path::Path,
    prompt: &str,
    params: &GenerateParams,
    dir: &std::path::Path,
) -> Result<()> {
    if a.compress.method.is_some() || a.compress.compress_config.is_some() {
        bail!(
            "--kv: the compression recipe is the saved context's; drop --method/--compress-config"
        );
    }
    if prompt.trim().is_empty() {
        bail!("--kv needs a question: give --prompt TEXT or --prompt-file FILE");
    }
    let (lm, dtype) = load_model(&a.model, dir)?;
    let (mut seq, h) = load_kvc(kv, &lm, dtype)?;
    let t0 = std::time::Instant::now();
    let question = lm.question_ids(prompt, "")?;
    if seq.tokens().len() + question.len() >= lm.model.cfg.ctx_len {
        bail!(
            "the saved context of {} tokens and this question of {} do not fit the model's context of {}",
            seq.tokens().len(),
            question.len(),
            lm.model.cfg.ctx_len
        );
    }
    let loaded = t0.elapsed().as_secs_f64();
    seq.append(&lm.model, &question)?;
    let gen = decode_to_stdout(&lm, &mut seq, params)?;
    eprintln!(
        "[{}] context {} tokens from {} ({}, {:.1} MiB), question {} tokens; first token after {:.2}s; generated {} tokens in {:.2}s, stop: {:?}",
        lm.name,
        h.tokens,
        kv.display(),
        h.recipe,
        mib(h.kv_bytes),
        question.len(),
        loaded + gen.decode_secs / gen.tokens.len().max(1) as f64,
        gen.tokens.len(),
        gen.decode_secs,
        gen.stop
    );
    Ok(())
}

/// Decodes from `seq`, writing each piece to standard output as it comes, then a
/// newline.
fn decode_to_stdout(
    lm: &LoadedModel,
    seq: &mut Sequence,
    params: &GenerateParams,
) -> Result<Generation> {
    let mut out = std::io::stdout().lock();
    let gen = decode_sequence(lm, seq, params, &mut |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
        true
    })?;
    drop(out);
    println!();
    Ok(gen)
}
