//! Subcommand wiring: load, prefill, decode, report.

use crate::cli::{ChatArgs, Cli, Command, GenerateArgs, ModelArgs, SamplingArgs};
use crate::fetch::Bar;
use anyhow::{bail, Context, Result};
use kvmerger_assets::{self as assets, ModelSource, Progress};
use kvmerger_compression::KvDtype;
use kvmerger_engine::chat::Message;
use kvmerger_engine::compress::Compressor;
use kvmerger_engine::generate::{GenerateParams, Generation};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sampling::SamplingParams;
use kvmerger_engine::sequence::Sequence;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

pub fn dispatch(cli: Cli) -> Result<()> {
    if let Command::Serve(a) = cli.command {
        // The server runs its engine on a thread pool of its own.
        let dir = assets::data_dir(cli.data_dir.as_deref());
        return crate::serve::run(a, &dir, cli.threads);
    }
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        pool = pool.num_threads(n);
    }
    // The whole command runs on a pool thread: handing work to the pool from outside
    // costs microseconds per matrix product, from inside a fraction of one.
    let pool = pool.build().context("starting the thread pool")?;
    pool.install(|| dispatch_in_pool(cli))
}

fn dispatch_in_pool(cli: Cli) -> Result<()> {
    let dir = assets::data_dir(cli.data_dir.as_deref());
    match cli.command {
        Command::Fetch(a) => crate::fetch::run(a.id.as_deref(), a.list, &dir),
        Command::Generate(a) => generate(a, &dir),
        Command::Chat(a) => chat(a, &dir),
        Command::Bench(a) => crate::bench::run(a, &dir),
        Command::Demo(a) => crate::demo::run(a, &dir),
        Command::Eval(a) => crate::eval::run(a, &dir),
        Command::Analyze(a) => crate::analyze::run(a, &dir),
        Command::TrainScorer(a) => crate::train::run(a, &dir),
        Command::Compress(a) => crate::context::compress(a, &dir),
        Command::Inspect(a) => crate::context::inspect(a, &dir),
        Command::Methods => {
            crate::compress::print_methods();
            Ok(())
        }
        Command::Serve(_) => unreachable!("dispatched before the pool"),
    }
}

/// Resolve, fetching on first use, and load a model with a spinner.
pub fn load_model(m: &ModelArgs, dir: &std::path::Path) -> Result<(LoadedModel, KvDtype)> {
    let dtype: KvDtype = m.kv_dtype.parse().map_err(anyhow::Error::msg)?;
    let precision: kvmerger_engine::exact::Precision = m
        .precision_or(crate::cli::DEFAULT_PRECISION)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let bar = Bar::new();
    let src = assets::resolve_model(&m.model, dir, &bar);
    let path: PathBuf = match src {
        Ok(ModelSource::Gguf(p)) | Ok(ModelSource::HfDir(p)) => p,
        Err(e) => {
            bar.finish();
            return Err(e.into());
        }
    };
    bar.stage(&format!("loading {}", path.display()));
    let loaded = LoadedModel::open(&path);
    bar.finish();
    let mut loaded = loaded.with_context(|| format!("loading model {}", path.display()))?;
    loaded.model.precision = precision;
    // A scorer the user trained for this model replaces the one shipped.
    let trained = crate::train::scorer_path(dir, &loaded.fingerprint);
    if trained.is_file() {
        loaded.attach_scorer(&trained)?;
    }
    Ok((loaded, dtype))
}

pub fn sampling(s: &SamplingArgs) -> Result<GenerateParams> {
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repetition_penalty: s.repeat_penalty,
        repeat_last_n: 64,
        seed: s.seed,
    };
    sampling.validate()?;
    if s.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    Ok(GenerateParams {
        max_tokens: s.max_tokens,
        sampling,
        stop: s.stop.iter().map(|x| unescape(x)).collect::<Result<_>>()?,
        ignore_eos: s.ignore_eos,
    })
}

/// A stop string as the shell passes it with its escapes understood, so that
/// `--stop "\n\n"` stops at a blank line: `\n`, `\t`, `\r`, `\\`, `\"`, `\0`.
pub fn unescape(s: &str) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some(other) => bail!(
                "--stop {s:?}: unknown escape \\{other} (known: \\n \\t \\r \\0 \\\\ \\\" \\')"
            ),
            None => bail!("--stop {s:?} ends with a lone backslash (write \\\\ for one)"),
        }
    }
    if out.is_empty() {
        bail!("--stop must not be empty");
    }
    Ok(out)
}

/// The most bytes a text input (prompt, document, config, schedule) may have.
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// A UTF-8 text file's contents (`-`: standard input), or a clear error: only a
/// regular file is opened (a FIFO or device would block or never end), and at most
/// [`MAX_TEXT_BYTES`] are read.
pub fn read_text(f: &std::path::Path, what: &str) -> Result<String> {
    use std::io::Read;
    let limit = MAX_TEXT_BYTES;
    let mut bytes = Vec::new();
    if f.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {what} from standard input"))?;
    } else {
        bytes = kvmerger_compression::files::read_bounded(f, limit)
            .map_err(|e| anyhow::anyhow!("{what} {e}"))?;
    }
    if bytes.len() as u64 > limit {
        bail!(
            "{what} {} is longer than the {} MiB a text input may have",
            f.display(),
            limit >> 20
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what} {} is not valid UTF-8 (invalid byte at offset {})",
            f.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => read_text(f, "prompt file"),
        (None, None) => bail!("give a prompt with --prompt TEXT or --prompt-file FILE"),
    }
}

fn generate(a: GenerateArgs, dir: &std::path::Path) -> Result<()> {
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
    let comp = crate::compress::build(&a.compress)?;
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
    let mut out = std::io::stdout().lock();
    let gen = decode_sequence(&lm, &mut seq, &params, &mut |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
        true
    })?;
    drop(out);
    println!();
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
    let (mut seq, h) = crate::context::load(kv, &lm, dtype)?;
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
    let mut out = std::io::stdout().lock();
    let gen = decode_sequence(&lm, &mut seq, params, &mut |s| {
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
        true
    })?;
    drop(out);
    println!();
    eprintln!(
        "[{}] context {} tokens from {} ({}, {:.1} MiB), question {} tokens; first token after {:.2}s; generated {} tokens in {:.2}s, stop: {:?}",
        lm.name,
        h.tokens,
        kv.display(),
        h.recipe,
        crate::compress::mib(h.kv_bytes),
        question.len(),
        loaded + gen.decode_secs / gen.tokens.len().max(1) as f64,
        gen.tokens.len(),
        gen.decode_secs,
        gen.stop
    );
    Ok(())
}

/// Prefill `ids` and compress them with `comp` (the sequence runs whatever pass the
/// method needs), reporting what compression did. The first `protect` tokens are the
/// chat template's opening. Returns the sequence and the prefill time.
pub fn compressed_sequence(
    lm: &LoadedModel,
    comp: &Arc<Compressor>,
    dtype: KvDtype,
    ids: &[u32],
    protect: usize,
) -> Result<(Sequence, f64)> {
    let mut seq = Sequence::new(&lm.model, dtype, comp.clone());
    seq.protect(protect);
    let done = seq.feed_context(lm, ids)?;
    let r = &done.compress;
    if r.pass_secs > 0.0 {
        eprintln!(
            "[{}] reconstruction pass: {:.2}s ({:.2}x the prefill)",
            r.method,
            r.pass_secs,
            r.pass_secs / done.prefill_s.max(1e-9)
        );
    }
    if !r.method.is_empty() {
        crate::compress::report(r, done.prefill_s);
    }
    if seq.prefill_passes() > 0 {
        eprintln!(
            "[{}] compressed during prefill: {} passes, peak KV cache {:.2} MiB",
            r.method,
            seq.prefill_passes(),
            crate::compress::mib(seq.peak_kv_bytes())
        );
    }
    Ok((seq, done.prefill_s))
}

/// Decode from `seq`'s last logits, re-compressing past the budget when its recipe
/// has a margin.
pub fn decode_sequence(
    lm: &LoadedModel,
    seq: &mut Sequence,
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let gen = seq.generate(&lm.model, &lm.tokenizer, params, on_text)?;
    if seq.decode_passes() > 0 {
        eprintln!(
            "[{}] re-compressed {} times while decoding",
            seq.compressor().name(),
            seq.decode_passes()
        );
    }
    Ok(gen)
}

fn chat(a: ChatArgs, dir: &std::path::Path) -> Result<()> {
    let params = sampling(&a.sampling)?;
    if a.kv.is_some() && (a.compress.method.is_some() || a.compress.compress_config.is_some()) {
        bail!(
            "--kv: the compression recipe is the saved context's; drop --method/--compress-config"
        );
    }
    let comp = crate::compress::build(&a.compress)?;
    let (lm, dtype) = load_model(&a.model, dir)?;
    // A saved context to chat about: every conversation starts from a copy of it.
    let base = match &a.kv {
        Some(p) => Some(crate::context::load(p, &lm, dtype)?.0),
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
