//! The query-agnostic lifecycle on real models: prompts cut at the question, a
//! sequence fed a context and then a question, statistics that describe what was fed,
//! and KVzip's reconstruction pass.

mod common;

use common::model_path;
use kvmerger_compression::{Budget, KvDtype, Options, Schedule, StatsNeeds};
use kvmerger_engine::cache::{KvCache, PrefillStats};
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::model::Logits;
use kvmerger_engine::sequence::Sequence;
use std::sync::Arc;

const CONTEXT: &str = "Alice keeps bees behind the old mill. Every morning she counts the hives, \
writes the number in a green notebook, and walks to the river to watch the herons. \
One day the notebook went missing, and the whole village helped her look for it.\n";
const QUESTION: &str = "Where did Alice write the number of hives?";

fn open(id: &str) -> LoadedModel {
    LoadedModel::open(&model_path(id)).unwrap()
}

/// KVzip's statistic by hand: `input` fed to `cache` with the peak attention each slot
/// receives (`needs.reconstruction`).
fn peak_stats(lm: &LoadedModel, input: &[u32], cache: &mut KvCache) -> PrefillStats {
    let mut st = PrefillStats::default();
    lm.model
        .forward_peak(
            input,
            cache,
            StatsNeeds {
                reconstruction: true,
                ..Default::default()
            },
            Some(&mut st),
            Logits::Last,
        )
        .unwrap();
    st
}

#[test]
fn a_split_prompt_is_the_whole_prompt_cut_after_the_context() {
    for id in ["qwen2.5-0.5b", "smollm2-135m"] {
        let lm = open(id);
        let s = lm
            .split_prompt(CONTEXT, QUESTION, " Answer:", true)
            .unwrap();
        let whole = lm
            .template
            .render(
                &[kvmerger_engine::chat::Message::user(format!(
                    "{CONTEXT}{QUESTION}"
                ))],
                true,
            )
            .unwrap();
        let text = lm.tokenizer.decode(&s.joined());
        assert_eq!(text, format!("{whole} Answer:"), "{id}");
        // The context ends with the user's context, the question starts with the question.
        assert!(
            lm.tokenizer.decode(&s.context).ends_with("look for it.\n"),
            "{id}"
        );
        assert!(
            lm.tokenizer
                .decode(&s.question)
                .starts_with("Where did Alice"),
            "{id}"
        );
        // The template's opening is the prefix, and it is not part of the context text.
        let opening = lm.tokenizer.decode(&s.context[..s.prefix]);
        assert!(!opening.contains("Alice"), "{id}: {opening:?}");
        assert!(opening.contains("user"), "{id}: {opening:?}");
        // Without a template, the context is the text itself.
        let raw = lm.split_prompt(CONTEXT, QUESTION, "", false).unwrap();
        assert_eq!(
            lm.tokenizer.decode(&raw.joined()).trim_start(),
            format!("{CONTEXT}{QUESTION}")
        );
    }
}

#[test]
fn feeding_a_context_then_a_question_equals_feeding_them_at_once() {
    let lm = open("smollm2-135m");
    let s = lm.split_prompt(CONTEXT, QUESTION, "", true).unwrap();
    // A prefill shared by H2O, SnapKV with a window of 8 and TOVA collects what each
    // of them needs.
    let needs = StatsNeeds {
        accumulated: true,
        window: Some(8),
        last: true,
        ..Default::default()
    };
    let comps = [at_half("h2o"), snapkv_window(8), at_half("tova")];
    let mut seq = Sequence::shared(&lm.model, KvDtype::F32, comps.iter().map(|c| c.as_ref()));
    seq.feed(&lm.model, &s.context).unwrap();
    seq.feed(&lm.model, &s.question).unwrap();
    let mut cache: KvCache = lm.model.new_cache(KvDtype::F32);
    let mut stats = Default::default();
    let logits = lm
        .model
        .forward(
            &s.joined(),
            &mut cache,
            needs,
            Some(&mut stats),
            Logits::Last,
        )
        .unwrap();
    for (a, b) in seq.logits().iter().zip(&logits) {
        assert!((a - b).abs() < 1e-3);
    }
    // The window is the last 8 queries' rows, whichever call fed them (the question
    // is longer than 8 tokens here, so all come from it).
    let n = cache.n_seen;
    for layer in [0, 7, 29] {
        let a = seq.stats.window(layer, 1, 8, n).unwrap();
        let b = stats.window(layer, 1, 8, n).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4);
        }
        // Eight rows of softmax over three query heads: the total is 8 * 3.
        assert!((a.iter().sum::<f32>() - 24.0).abs() < 1e-2);
    }
    // A window of 4 is the sum of the newest 4 rows only.
    let w4: f32 = seq.stats.window(5, 0, 4, n).unwrap().iter().sum();
    assert!((w4 - 12.0).abs() < 1e-2);
}

#[test]
fn the_reconstruction_pass_scores_every_context_slot_and_leaves_the_cache_as_it_was() {
    let lm = open("smollm2-135m");
    let s = lm.split_prompt(CONTEXT, QUESTION, "", true).unwrap();
    let mut comp = Arc::try_unwrap(at_half("kvzip")).unwrap();
    comp.recompress_margin = None;
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, Arc::new(comp));
    seq.protect(s.prefix);
    seq.feed(&lm.model, &s.context).unwrap();
    let before = seq.cache.clone();
    let prompts = lm.repeat_prompts().unwrap();
    let secs = seq.score(&lm).unwrap();
    assert!(secs > 0.0);
    assert!(seq.has_reconstruction());
    // The pass's tokens are gone: every store holds exactly what it held.
    assert_eq!(seq.cache.n_seen, before.n_seen);
    for (a, b) in seq
        .cache
        .layers
        .iter()
        .flatten()
        .zip(before.layers.iter().flatten())
    {
        assert_eq!(a.to_data(), b.to_data());
    }
    let n = s.context.len();
    for layer in &seq.stats.heads {
        for h in layer {
            let r = h.reconstruction.as_ref().unwrap();
            assert_eq!(r.len(), n);
            assert!(
                r[..s.prefix].iter().all(|x| x.is_infinite()),
                "the template's opening is kept"
            );
            assert!(r[s.prefix..]
                .iter()
                .all(|x| x.is_finite() && (0.0..=1.0).contains(x)));
        }
    }
    // A direct computation: the first pass by hand, on a cache of the leading slots
    // and the chunk (here the whole context is one chunk), with the peak statistic.
    let mut direct = before.clone();
    let mut input = prompts.first.clone();
    input.extend_from_slice(&prompts.suffix);
    input.extend_from_slice(&s.context[s.prefix..]);
    let st = peak_stats(&lm, &input, &mut direct);
    let want = st.heads[3][2].reconstruction.as_ref().unwrap();
    let got = seq.stats.heads[3][2].reconstruction.as_ref().unwrap();
    for j in s.prefix..n {
        assert!(
            (got[j] - want[j]).abs() <= 1e-6 * (1.0 + want[j]),
            "{j}: {} vs {}",
            got[j],
            want[j]
        );
    }
    // KVzip compresses from those scores to its budget over the whole cache, without
    // a second pass.
    let slots = seq.cache.total_slots();
    let report = seq.compress(&lm).unwrap();
    assert_eq!(report.pass_secs, secs, "the pass ran once");
    let kept = seq.cache.total_slots();
    assert!(
        (kept as f64 - slots as f64 * 0.5).abs() <= 90.0,
        "{kept} of {slots}"
    );
    // Compressed: the question is appended, not fed.
    assert!(seq.feed(&lm.model, &s.question).is_err());
    seq.append(&lm.model, &s.question).unwrap();
    assert_eq!(seq.cache.n_seen, n + s.question.len());
}

#[test]
fn each_reconstruction_chunk_attends_over_the_whole_context() {
    let lm = open("smollm2-135m");
    let s = lm.split_prompt(CONTEXT, QUESTION, "", true).unwrap();
    let mut seq = Sequence::new(&lm.model, KvDtype::F32, at_half("kvzip"));
    seq.protect(s.prefix);
    seq.feed(&lm.model, &s.context).unwrap();
    let mut prompts = lm.repeat_prompts().unwrap();
    prompts.chunk = 16;
    let before = seq.cache.clone();
    seq.score_with(&lm.model, &prompts).unwrap();
    let n = s.context.len();
    assert!(n - s.prefix > 32, "several chunks");
    // The second chunk by hand: the whole context's cache, fed the "repeat the part
    // ... starting with" prompt, the previous chunk's last 8 tokens, the turn's end
    // and the chunk.
    let (c0, c1) = (s.prefix + 16, s.prefix + 32);
    let mut cache = before.clone();
    let mut input = prompts.later.clone();
    input.extend_from_slice(&s.context[c0 - 8..c0]);
    input.extend_from_slice(&prompts.suffix);
    input.extend_from_slice(&s.context[c0..c1]);
    let st = peak_stats(&lm, &input, &mut cache);
    for (l, g) in [(0, 0), (11, 1), (29, 2)] {
        let want = st.heads[l][g].reconstruction.as_ref().unwrap();
        let got = seq.stats.heads[l][g].reconstruction.as_ref().unwrap();
        for j in c0..c1 {
            assert!(
                (got[j] - want[j]).abs() <= 1e-6,
                "layer {l} head {g} slot {j}: {} vs {}",
                got[j],
                want[j]
            );
        }
    }
}

#[test]
fn a_plain_forward_never_passes_off_its_own_attention_as_kvzips_scores() {
    let lm = open("smollm2-135m");
    let s = lm.split_prompt(CONTEXT, QUESTION, "", true).unwrap();
    let comp = at_half("kvzip");
    let mut cache = lm.model.new_cache(KvDtype::F16);
    let mut stats = Default::default();
    lm.model
        .forward(
            &s.context,
            &mut cache,
            comp.needs(),
            Some(&mut stats),
            Logits::Last,
        )
        .unwrap();
    let e = comp
        .compress_prompt(&mut cache, &stats)
        .unwrap_err()
        .to_string();
    assert!(e.contains("reconstruction"), "{e}");
}

#[test]
fn expected_attention_runs_on_query_moments_collected_by_the_engine() {
    let lm = open("qwen2.5-0.5b");
    let s = lm.split_prompt(CONTEXT, QUESTION, "", true).unwrap();
    let comp = at_half("expected_attention");
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, comp.clone());
    seq.feed(&lm.model, &s.context).unwrap();
    let q = &seq.stats.queries;
    assert_eq!(q.len(), lm.model.cfg.n_layers);
    assert_eq!(q[0].len(), lm.model.cfg.n_heads);
    // Every position but the 4 sinks is counted.
    assert_eq!(q[0][0].count as usize, s.context.len() - 4);
    let n = s.context.len();
    let report = seq.compress(&lm).unwrap();
    assert_eq!(
        seq.cache.total_slots(),
        report.layer_slots.iter().map(|x| x.1).sum::<usize>()
    );
    for l in &seq.cache.layers {
        for h in l {
            assert_eq!(h.len(), (n as f64 * 0.5).round() as usize);
        }
    }
}

/// `method` with its default options at half the prompt, budgets uniform over layers.
fn at_half(method: &str) -> Arc<Compressor> {
    Arc::new(
        Compressor::new(
            method,
            &Options::new(),
            Budget::Fraction(0.5),
            Schedule::Uniform,
        )
        .unwrap(),
    )
}

fn snapkv_window(window: usize) -> Arc<Compressor> {
    let mut o = Options::new();
    o.set("window", window);
    Arc::new(Compressor::new("snapkv", &o, Budget::Fraction(0.5), Schedule::Uniform).unwrap())
}

/// A compressed context asked a second question: the first question's sequence (with a
/// decoded answer) cut back to the context and given the second question reads exactly
/// what a fresh compression of the context given that question reads.
#[test]
fn a_sequence_cut_back_to_its_compressed_context_answers_like_a_fresh_one() {
    let lm = open("smollm2-135m");
    let second = "What does Alice watch by the river?";
    let s1 = lm.split_prompt(CONTEXT, QUESTION, "", true).unwrap();
    let s2 = lm.split_prompt(CONTEXT, second, "", true).unwrap();
    assert_eq!(s1.context, s2.context);
    for method in ["keydiff", "h2o", "kvmerger"] {
        let c = at_half(method);
        let fresh_context = |seq: &mut Sequence| {
            seq.feed_context(&lm, &s1.context).unwrap();
        };
        let mut first = Sequence::new(&lm.model, KvDtype::F16, c.clone());
        fresh_context(&mut first);
        let n = first.tokens().len();
        assert_eq!(first.compressed_end(), n);
        let bytes = first.kv_bytes();
        first.append(&lm.model, &s1.question).unwrap();
        for t in [11, 12, 13] {
            first.step(&lm.model, t).unwrap();
        }
        // Not into the compressed part: its slots stand for several tokens.
        assert!(first.clone().truncate(n - 1).is_err());
        let mut reused = first.clone();
        reused.truncate(n).unwrap();
        assert_eq!(reused.tokens(), &s1.context[..]);
        assert_eq!(reused.cache.n_seen, n);
        assert_eq!(reused.kv_bytes(), bytes, "{method}");
        reused.append(&lm.model, &s2.question).unwrap();

        let mut fresh = Sequence::new(&lm.model, KvDtype::F16, c.clone());
        fresh_context(&mut fresh);
        fresh.append(&lm.model, &s2.question).unwrap();
        assert_eq!(reused.logits(), fresh.logits(), "{method}");
        assert_eq!(reused.cache.lengths(), fresh.cache.lengths(), "{method}");
    }
}

/// Long work asks its cancellation check between steps: KVzip's pass over a long
/// context stops within a chunk once told to, and so does a long prefill.
#[test]
fn a_cancelled_pass_or_prefill_stops_within_a_step() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let lm = open("smollm2-135m");
    let text: String = (0..300)
        .map(|i| format!("Line {i}: the fox counted {} stones. ", i * 7 % 13))
        .collect();
    let ids = lm.tokenizer.encode(&text, true).unwrap();
    assert!(ids.len() > 2000, "{}", ids.len());
    let asked = Arc::new(AtomicUsize::new(0));
    let cancel = |after: usize| {
        let asked = asked.clone();
        asked.store(0, Ordering::SeqCst);
        kvmerger_engine::Cancel(Arc::new(move || {
            (asked.fetch_add(1, Ordering::SeqCst) >= after).then(|| "told to stop".to_string())
        }))
    };
    // The prefill: 2000+ tokens are 8+ chunks of 256; stopped at the third.
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, at_half("kvzip"));
    seq.set_cancel(cancel(2));
    let e = seq.feed(&lm.model, &ids).unwrap_err();
    assert!(matches!(e, kvmerger_engine::Error::Cancelled(_)), "{e}");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "asked once per chunk, stopped at once"
    );
    // KVzip's pass: prefilled whole, then stopped partway through the pass.
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, at_half("kvzip"));
    seq.feed(&lm.model, &ids).unwrap();
    seq.set_cancel(cancel(3));
    let e = seq.compress(&lm).unwrap_err();
    assert!(matches!(e, kvmerger_engine::Error::Cancelled(_)), "{e}");
    assert!(!seq.is_compressed());
    assert_eq!(asked.load(Ordering::SeqCst), 4);
}
