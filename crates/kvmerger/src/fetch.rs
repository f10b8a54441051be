//! `kvmerger fetch`: download a model or data set, or list them.

use crate::shared::progress::Bar;
use anyhow::Result;
use kvmerger_assets::{self as assets, Progress};
use std::path::Path;

pub fn run(id: Option<&str>, list: bool, dir: &Path) -> Result<()> {
    if list {
        println!("{:<16} {:<6} {:<7} description", "id", "kind", "cached");
        for (a, cached) in assets::list(dir) {
            println!(
                "{:<16} {:<6} {:<7} {}",
                a.id,
                format!("{:?}", a.kind()).to_lowercase(),
                if cached { "yes" } else { "no" },
                a.description
            );
        }
        println!("\ncache: {}", dir.display());
        println!(
            "\nAny other GGUF file or Hugging Face directory loads with -m PATH when it is one of \
             these:\n  architectures: llama (Llama 2/3/3.1/3.2, Mistral, SmolLM2), qwen2, qwen3 \
             (dense), gemma3, phi3 (Phi-3/3.5/4)\n  RoPE scaling: none, linear, llama3, yarn, \
             longrope (dynamic and partial rotary embeddings are refused)\n  tokenizers: byte-level BPE (gpt2, llama3, qwen2, falcon, deepseek-llm, \
             deepseek-coder; other names get the GPT-2 pattern), SentencePiece (llama); not bert or gemma4"
        );
        return Ok(());
    }
    let id = id.unwrap_or(assets::DEFAULT_MODEL);
    let bar = Bar::new();
    let path = assets::fetch(id, dir, &bar);
    bar.finish();
    let path = path?;
    println!("{id}: {}", path.display());
    Ok(())
}
