//! Compression during prefill on a real model: the cache never holds more than the
//! budget plus one chunk, positions stay the original ones, and recipes that cannot
//! work are refused before any work.

mod common;

use common::model_path;
use kvmerger_compression::{KvDtype, Recipe};
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sequence::Sequence;
use std::sync::Arc;

fn open() -> LoadedModel {
    LoadedModel::open(&model_path("smollm2-135m")).unwrap()
}

/// About 700 tokens of varied text.
fn prompt(lm: &LoadedModel) -> Vec<u32> {
    let text: String = (0..40)
        .map(|i| {
            format!(
                "Line {i}: the {} fox counted {} stones by the {} river. ",
                ["red", "grey", "quick", "old"][i % 4],
                i * 7 % 13,
                ["north", "slow", "wide"][i % 3]
            )
        })
        .collect();
    lm.tokenizer.encode(&text, true).unwrap()
}

fn compressor(recipe: &str) -> Arc<Compressor> {
    Arc::new(Compressor::from_recipe(&Recipe::parse(recipe).unwrap()).unwrap())
}

#[test]
fn the_cache_never_holds_more_than_the_budget_plus_one_chunk() {
    let lm = open();
    let ids = prompt(&lm);
    assert!(ids.len() > 600, "{}", ids.len());
    let cfg = &lm.model.cfg;
    let (budget, chunk) = (128, 64);
    for method in [
        "streaming",
        "h2o",
        "tova",
        "snapkv",
        // pyramidkv gives lower layers more than their target by design; its engine
        // counterpart `snapkv:schedule=pyramid` keeps every layer at its target.
        "snapkv:schedule=pyramid,",
        "knorm",
        "keydiff",
        "expected_attention",
        "random",
        "adakv",
        "cam",
        "d2o",
        "kvmerger+:selector=expected_attention,",
    ] {
        let sep = if method.ends_with(',') { "" } else { ":" };
        let c = compressor(&format!("{method}{sep}prefill_chunk={chunk}@{budget}"));
        let mut seq = Sequence::new(&lm.model, KvDtype::F16, c.clone());
        let report = seq.feed_context(&lm, &ids).unwrap().compress;
        let targets = c.targets(cfg.n_layers, ids.len());
        let slot = seq.cache.slot_bytes();
        let bound: usize = targets
            .iter()
            .map(|&t| (t + chunk) * cfg.n_kv_heads * slot)
            .sum();
        assert!(
            seq.peak_kv_bytes() <= bound,
            "{method}: peak {} over budget + chunk {bound}",
            seq.peak_kv_bytes()
        );
        let full = ids.len() * seq.cache.token_bytes();
        assert!(
            seq.peak_kv_bytes() * 3 < full,
            "{method}: peak near the full cache"
        );
        // Every layer ends at its target (heads of a layer may share it unevenly).
        for (l, heads) in seq.cache.layers.iter().enumerate() {
            let slots: usize = heads.iter().map(|h| h.len()).sum();
            assert_eq!(slots, targets[l] * cfg.n_kv_heads, "{method} layer {l}");
        }
        assert_eq!(seq.cache.n_seen, ids.len(), "{method}");
        assert_eq!(report.bytes_before, full, "{method}");
        assert_eq!(report.bytes_after, seq.kv_bytes(), "{method}");
        assert!(seq.prefill_passes() >= ids.len() / chunk - 2, "{method}");
        assert!(seq.is_compressed());
        // The logits are those of a real next token, not garbage.
        assert!(seq.logits().iter().all(|x| x.is_finite()), "{method}");
    }
}

#[test]
fn positions_stay_the_original_ones() {
    let lm = open();
    let ids = prompt(&lm);
    let c = compressor("streaming:sinks=4,prefill_chunk=50@100");
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, c.clone());
    seq.feed_context(&lm, &ids).unwrap();
    let n = ids.len() as u32;
    for h in seq.cache.layers.iter().flatten() {
        let pos: Vec<u32> = h.meta().iter().map(|m| m.position).collect();
        let want: Vec<u32> = (0..4).chain(n - 96..n).collect();
        assert_eq!(pos, want);
    }
    // A question appended afterwards continues at the next position.
    seq.append(&lm.model, &ids[..3]).unwrap();
    assert_eq!(seq.cache.n_seen, ids.len() + 3);
    let last = seq.cache.layers[0][0].meta().last().unwrap().position;
    assert_eq!(last, n + 2);
}

#[test]
fn one_chunk_as_long_as_the_prompt_is_compression_after_prefill() {
    let lm = open();
    let ids = prompt(&lm);
    for method in ["snapkv", "h2o", "expected_attention"] {
        let whole = compressor(&format!("{method}@0.25"));
        let mut a = Sequence::new(&lm.model, KvDtype::F16, whole.clone());
        a.feed(&lm.model, &ids).unwrap();
        a.compress(&lm).unwrap();
        let chunked = compressor(&format!("{method}:prefill_chunk={}@0.25", ids.len()));
        let mut b = Sequence::new(&lm.model, KvDtype::F16, chunked.clone());
        b.feed_context(&lm, &ids).unwrap();
        assert_eq!(a.logits(), b.logits(), "{method}");
        for (ha, hb) in a
            .cache
            .layers
            .iter()
            .flatten()
            .zip(b.cache.layers.iter().flatten())
        {
            assert_eq!(ha.meta(), hb.meta(), "{method}");
        }
    }
}

#[test]
fn recipes_that_cannot_compress_during_prefill_are_refused_before_any_work() {
    let lm = open();
    let ids = prompt(&lm);
    // KVzip needs a reconstruction pass over the whole prompt.
    let r = Recipe::parse("kvzip:prefill_chunk=64@0.5").unwrap_err();
    assert_eq!(r.field, "prefill_chunk");
    // A budget below one chunk.
    let c = compressor("snapkv:prefill_chunk=256@100");
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, c.clone());
    let e = seq.feed_context(&lm, &ids).unwrap_err().to_string();
    assert!(e.contains("prefill_chunk") && e.contains("100"), "{e}");
    assert_eq!(seq.cache.n_seen, 0);
    assert_eq!(seq.peak_kv_bytes(), 0);
    // A prompt past the model's context, even though the cache would stay small.
    let long = vec![ids[1]; lm.model.cfg.ctx_len + 1];
    let c = compressor("streaming:prefill_chunk=256@512");
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, c.clone());
    let e = seq.feed_context(&lm, &long).unwrap_err().to_string();
    assert!(e.contains("does not fit the context"), "{e}");
    assert_eq!(seq.cache.n_seen, 0);
}
