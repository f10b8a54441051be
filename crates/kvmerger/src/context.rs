//! Compressed contexts in files: `kvmerger compress` (read a document once, compress it,
//! save it) and `kvmerger inspect`.

use crate::cli::{CompressCmdArgs, InspectArgs};
use crate::shared::recipe::{build, mib};
use crate::shared::session::{compressed_sequence, load_model, MAX_KVC_BYTES};
use crate::shared::text::read_text;
use anyhow::{bail, Context, Result};
use kvmerger_engine::kvc;
use std::path::Path;

pub fn compress(a: CompressCmdArgs, dir: &Path) -> Result<()> {
    let doc = read_text(&a.context_file, "context file")?;
    if doc.trim().is_empty() {
        bail!("the context file {} is empty", a.context_file.display());
    }
    let comp = build(&a.compress)?;
    let (lm, dtype) = load_model(&a.model, dir)?;
    let split = lm.split_prompt(&format!("{}\n\n", doc.trim_end()), "", "", true)?;
    // Room for a question and an answer after the context.
    if split.context.len() + 64 > lm.model.cfg.ctx_len {
        bail!(
            "the document of {} tokens leaves no room for a question in the model's context of {} tokens",
            split.context.len(),
            lm.model.cfg.ctx_len
        );
    }
    let (seq, prefill) = compressed_sequence(&lm, &comp, dtype, &split.context, split.prefix)?;
    let source = a.context_file.display().to_string();
    let bytes = kvc::encode(
        &seq,
        &lm,
        "agnostic",
        serde_json::json!({"source": source, "prefill_s": prefill}),
    );
    kvmerger_engine::write_atomic(&a.output, &bytes)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "[{}] {} tokens, KV {:.2} MiB of {:.2} MiB uncompressed; wrote {} ({:.2} MiB)",
        lm.name,
        split.context.len(),
        mib(seq.kv_bytes()),
        mib(split.context.len() * seq.cache.token_bytes()),
        a.output.display(),
        mib(bytes.len())
    );
    Ok(())
}

pub fn inspect(a: InspectArgs, dir: &Path) -> Result<()> {
    let bytes = kvc::read_file(&a.file, MAX_KVC_BYTES)?;
    let (h, _) =
        kvc::read_header(&bytes).with_context(|| format!("reading {}", a.file.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&h.json)?);
    } else {
        let share = |x: usize, of: usize| 100.0 * x as f64 / of.max(1) as f64;
        println!(
            "{}: compressed context, format version {}",
            a.file.display(),
            h.version
        );
        println!("  model      {} (fingerprint {})", h.model, h.fingerprint);
        println!("  recipe     {} ({} protocol)", h.recipe, h.protocol);
        println!(
            "  tokens     {} (compressed up to {}; the first {} are the chat template's opening)",
            h.tokens, h.compressed_end, h.protect
        );
        println!(
            "  cache      {} layers x {} KV heads x {}, {:?}: {} slots, {:.2} MiB ({:.1}% of {:.2} MiB uncompressed)",
            h.n_layers,
            h.n_kv_heads,
            h.head_dim,
            h.dtype,
            h.slots,
            mib(h.kv_bytes),
            share(h.kv_bytes, h.kv_bytes_full),
            mib(h.kv_bytes_full)
        );
        println!(
            "  file       {:.2} MiB ({:.2}% over the cache), checksum ok",
            mib(bytes.len()),
            share(bytes.len().saturating_sub(h.kv_bytes), h.kv_bytes)
        );
        if !h.targets.is_empty() {
            let t: Vec<String> = h.targets.iter().map(|x| x.to_string()).collect();
            println!("  targets    slots per head by layer: {}", t.join(" "));
        }
        if h.extra != serde_json::Value::Null {
            println!("  extra      {}", h.extra);
        }
    }
    if let Some(m) = &a.model {
        let args = crate::cli::ModelArgs {
            model: m.clone(),
            kv_dtype: "f16".into(),
            precision: None,
        };
        let (lm, _) = load_model(&args, dir)?;
        let (seq, _) = kvc::decode(&bytes, &lm)
            .with_context(|| format!("checking {} against {}", a.file.display(), lm.name))?;
        println!(
            "  loads into {}: {} tokens, {:.2} MiB of KV cache",
            lm.name,
            seq.tokens().len(),
            mib(seq.kv_bytes())
        );
    }
    Ok(())
}
