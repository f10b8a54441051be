//! `kvmerger chat`: a conversation in the terminal, about a saved context with `--kv`.

use crate::cli::ChatArgs;
use crate::shared::recipe::build;
use crate::shared::session::{
    compressed_sequence, decode_sequence, load_kvc, load_model, sampling,
};
use anyhow::{bail, Context, Result};
use kvmerger_engine::chat::Message;
use kvmerger_engine::sequence::Sequence;
use std::io::{BufRead, Write};

pub fn run(a: ChatArgs, dir: &std::path::Path) -> Result<()> {
    let params = sampling(&a.sampling)?;
    if a.kv.is_some() && (a.compress.method.is_some() || a.compress.compress_config.is_some()) {
        bail!(
            "--kv: the compression recipe is the saved context's; drop --method/--compress-config"
        );
    }
    let comp = build(&a.compress)?;
    let (lm, dtype) = load_model(&a.model, dir)?;
    // A saved context to chat about: every conversation starts from a copy of it.
    let base = match &a.kv {
        Some(p) => Some(load_kvc(p, &lm, dtype)?.0),
        None => None,
    };
    let system: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let mut messages = system.clone();
    // The conversation so far: compressed by the recipe on the first turn (or taken
    // from the saved context), then each turn's new tokens appended (as the server's
    // context reuse does).
    let mut conversation: Option<Sequence> = None;
    eprintln!(
        "chatting with {}{} (/reset starts over, /exit or Ctrl-D quits)",
        lm.name,
        a.kv.as_ref()
            .map(|p| format!(" about {}", p.display()))
            .unwrap_or_default()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = system.clone();
                conversation = None;
                eprintln!("(new conversation)");
                continue;
            }
            _ => {}
        }
        let mut seq = match (&base, conversation.take()) {
            // About a saved context: the first question, then the next turns, appended.
            (Some(base), None) => {
                let mut seq = base.clone();
                seq.append(&lm.model, &lm.question_ids(&line, "")?)?;
                seq
            }
            (Some(_), Some(mut seq)) => {
                seq.append(&lm.model, &lm.next_turn_ids(&line)?)?;
                seq
            }
            (None, previous) => {
                messages.push(Message::new("user", &line));
                let ids = lm.encode_conversation(&messages, true, usize::MAX)?;
                // Reuse the conversation's cache up to where the new rendering departs
                // from it (never inside its compressed part); otherwise prefill and
                // compress again.
                let reused = previous.and_then(|mut seq| {
                    let n = seq.reusable_prefix(&ids);
                    (n > 0 && seq.truncate(n).is_ok()).then_some(seq)
                });
                match reused {
                    Some(mut seq) => {
                        let done = seq.tokens().len();
                        seq.append(&lm.model, &ids[done..])?;
                        seq
                    }
                    None => compressed_sequence(&lm, &comp, dtype, &ids, 0)?.0,
                }
            }
        };
        let mut out = std::io::stdout().lock();
        let mut print = |s: &str| {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
            true
        };
        let gen = decode_sequence(&lm, &mut seq, &params, &mut print)?;
        drop(out);
        println!();
        conversation = Some(seq);
        if base.is_none() {
            messages.push(Message::new("assistant", gen.text.trim()));
        }
    }
    Ok(())
}
