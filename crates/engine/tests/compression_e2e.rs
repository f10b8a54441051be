//! Compression inside the engine, end to end on the default model.

mod common;

use common::model_path;
use kvmerger_compression::{
    registry, Budget, HeadStore, KvDtype, Options, Schedule, SlotMeta, StatsNeeds,
};
use kvmerger_engine::attention::{attend, LayerAttn, StatsRequest};
use kvmerger_engine::cache::PrefillStats;
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::generate::GenerateParams;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::model::Logits;
use kvmerger_engine::sequence::Sequence;
use std::sync::Arc;

const PROMPT: &str = "Alice keeps bees behind the old mill. Every morning she counts the hives, \
writes the number in a green notebook, and walks to the river to watch the herons. \
One day the notebook went missing, and the whole village helped her look for it. \
Where did Alice write the number of hives?";

fn generate(
    lm: &LoadedModel,
    comp: Compressor,
    ids: &[u32],
    max_tokens: usize,
    ignore_eos: bool,
) -> (Vec<u32>, kvmerger_engine::cache::KvCache) {
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, Arc::new(comp));
    seq.feed_context(lm, ids).unwrap();
    let params = GenerateParams {
        max_tokens,
        ignore_eos,
        ..Default::default()
    };
    let gen = seq
        .generate(&lm.model, &lm.tokenizer, &params, &mut |_| true)
        .unwrap();
    (gen.tokens, seq.cache)
}

#[test]
fn at_budget_one_every_method_generates_exactly_what_full_does() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let ids = lm.tokenizer.encode(PROMPT, true).unwrap();
    let (want, _) = generate(&lm, Compressor::none(), &ids, 12, false);
    for name in registry::names() {
        let comp = Compressor::new(
            name,
            &Options::new(),
            Budget::Fraction(1.0),
            Schedule::Uniform,
        )
        .unwrap();
        let (got, _) = generate(&lm, comp, &ids, 12, false);
        assert_eq!(got, want, "{name} at budget 1.0 changed the generation");
    }
}

#[test]
fn compression_frees_the_memory_of_dropped_slots() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let ids = lm.tokenizer.encode(&PROMPT.repeat(4), true).unwrap();
    for (name, frac) in [
        ("kvmerger", 0.5),
        ("h2o", 0.35),
        ("snapkv", 0.5),
        ("streaming", 0.35),
    ] {
        let comp = Compressor::new(
            name,
            &Options::new(),
            Budget::Fraction(frac),
            Schedule::Uniform,
        )
        .unwrap();
        let mut cache = lm.model.new_cache(KvDtype::F16);
        let mut stats = PrefillStats::default();
        lm.model
            .forward(
                &ids,
                &mut cache,
                comp.needs(),
                Some(&mut stats),
                Logits::Last,
            )
            .unwrap();
        let before = cache.bytes();
        let (report, _) = comp.compress_prompt(&mut cache, &stats).unwrap();
        let ratio = cache.bytes() as f64 / before as f64;
        assert!(
            (ratio - frac).abs() < 0.02,
            "{name}: kept {ratio:.3} of the bytes at budget {frac}"
        );
        assert_eq!(report.bytes_after, cache.bytes());
        // What is allocated is what is kept: the dropped slots' memory was released.
        assert_eq!(cache.allocated_bytes(), cache.bytes(), "{name}");
    }
}

#[test]
fn decode_time_recompression_keeps_every_head_bounded() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let ids = lm.tokenizer.encode(PROMPT, true).unwrap();
    // `kvmerger` shares the budget between layers by sparsity (its default), so only
    // the total is bounded: every layer's own target plus the margin per head, and
    // the targets sum to the uniform total. The others keep 40 + 8 in every head.
    for (name, per_head) in [
        ("h2o", true),
        ("kvmerger", false),
        ("kvmerger:layers=uniform", true),
        ("snapkv", true),
        ("tova", true),
        ("streaming", true),
    ] {
        let mut opts = Options::new();
        let method = match name.split_once(':') {
            Some((m, o)) => {
                opts.parse_pair(o).unwrap();
                m
            }
            None => name,
        };
        let mut comp =
            Compressor::new(method, &opts, Budget::Tokens(40), Schedule::Uniform).unwrap();
        comp.recompress_margin = Some(8);
        let (tokens, cache) = generate(&lm, comp, &ids, 48, true);
        assert_eq!(tokens.len(), 48, "{name} stopped early");
        let heads: usize = cache.layers.iter().map(|l| l.len()).sum();
        let total: usize = cache.layers.iter().flatten().map(|h| h.len()).sum();
        assert!(
            total <= heads * 48,
            "{name}: {total} slots in {heads} heads, budget 40 + margin 8 each"
        );
        for (l, heads) in cache.layers.iter().enumerate() {
            for h in heads {
                assert!(
                    !per_head || h.len() <= 48,
                    "{name}: layer {l} holds {} slots, budget 40 + margin 8",
                    h.len()
                );
            }
        }
        assert_eq!(cache.n_seen, ids.len() + 47);
    }
}

/// A slot standing for `c` identical keys, with a log(c) logit bias, attends exactly like
/// the `c` copies did.
#[test]
fn a_merged_slot_with_log_count_bias_reproduces_full_attention_in_the_engine() {
    let d = 16;
    let key = |i: usize| -> Vec<f32> {
        (0..d)
            .map(|j| ((i * 31 + j * 7) % 13) as f32 * 0.1 - 0.6)
            .collect()
    };
    let val = |i: usize| -> Vec<f32> {
        (0..d)
            .map(|j| ((i * 17 + j * 3) % 11) as f32 * 0.2 - 1.0)
            .collect()
    };
    let mut full = HeadStore::new(d, KvDtype::F32);
    let mut merged = HeadStore::new(d, KvDtype::F32);
    for i in 0..3 {
        full.push(&key(i), &val(i), SlotMeta::token(i as u32));
        merged.push(&key(i), &val(i), SlotMeta::token(i as u32));
    }
    for p in 3..8 {
        full.push(&key(99), &val(99), SlotMeta::token(p));
    }
    merged.push(
        &key(99),
        &val(99),
        SlotMeta {
            position: 3,
            count: 5,
            score: 0.0,
            bias: 5f32.ln(),
            learned: 0.0,
        },
    );
    let q: Vec<f32> = (0..2 * d).map(|j| (j as f32 * 0.37).sin()).collect();
    let p = LayerAttn {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: d,
        scale: 0.25,
        window: None,
    };
    let (mut a, mut b) = (vec![0.0; 2 * d], vec![0.0; 2 * d]);
    attend(
        p,
        std::slice::from_ref(&full),
        &q,
        1,
        &[8],
        StatsRequest::default(),
        &mut a,
    );
    attend(
        p,
        std::slice::from_ref(&merged),
        &q,
        1,
        &[8],
        StatsRequest::default(),
        &mut b,
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    let _ = StatsNeeds::default();
}

/// A 4k-token prompt prefills, compresses to half and to about a third of its KV bytes,
/// and decodes from every cache.
#[test]
fn a_4k_prompt_decodes_from_full_half_and_a_third_of_its_cache() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let mut ids = lm.tokenizer.encode(&PROMPT.repeat(80), true).unwrap();
    ids.truncate(4096);
    assert_eq!(ids.len(), 4096);
    let comps = [
        Compressor::none(),
        Compressor::new(
            "kvmerger",
            &Options::new(),
            Budget::Fraction(0.5),
            Schedule::Uniform,
        )
        .unwrap(),
        Compressor::new(
            "kvmerger",
            &Options::new(),
            Budget::Fraction(0.35),
            Schedule::Uniform,
        )
        .unwrap(),
        Compressor::new(
            "h2o",
            &Options::new(),
            Budget::Fraction(0.35),
            Schedule::Uniform,
        )
        .unwrap(),
    ];
    let comps: Vec<Arc<Compressor>> = comps.into_iter().map(Arc::new).collect();
    let mut base = Sequence::shared(&lm.model, KvDtype::F16, comps.iter().map(|c| c.as_ref()));
    base.feed(&lm.model, &ids).unwrap();
    let full_bytes = base.kv_bytes();
    let slot = 2 * 64 * 2 + std::mem::size_of::<SlotMeta>();
    assert_eq!(full_bytes, 30 * 3 * 4096 * slot);
    for comp in &comps {
        let mut seq = base.clone();
        seq.set_compressor(comp.clone()).unwrap();
        seq.compress(&lm).unwrap();
        let ratio = seq.kv_bytes() as f64 / full_bytes as f64;
        let want = match comp.budget {
            Budget::Fraction(f) => f,
            _ => unreachable!(),
        };
        assert!(
            (ratio - want).abs() < 0.01,
            "{} kept {ratio:.3}, budget {want}",
            comp.name()
        );
        let params = GenerateParams {
            max_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        };
        let gen = seq
            .generate(&lm.model, &lm.tokenizer, &params, &mut |_| true)
            .unwrap();
        let cache = &seq.cache;
        assert_eq!(gen.tokens.len(), 8, "{}", comp.name());
        assert_eq!(cache.n_seen, 4096 + 7);
    }
}
