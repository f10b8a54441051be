//! KVzap on the real models: each fetchable model loads with the scorer shipped for it;
//! the predictions the forward pass stores in each slot are the scorer applied to the
//! attention block's normalized input; compression needs no second pass and costs a
//! small share of the prefill; a scorer is never attached to another model.

mod common;

use common::model_path;
use kvmerger_compression::{KvDtype, Recipe};
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sequence::Sequence;
use std::sync::Arc;

const DOC: &str = "The lighthouse keeper wrote the code 4471-AZ in the log. \
Every evening the keeper climbed the stairs, counted the ships, and wrote their names. \
In the spring a storm broke the lamp, and the village sent glass from the city.\n";

#[test]
fn every_fetchable_model_loads_with_its_shipped_scorer() {
    for id in ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"] {
        let lm = LoadedModel::open(&model_path(id)).unwrap();
        let s = lm
            .model
            .learned
            .as_ref()
            .unwrap_or_else(|| panic!("{id}: no shipped scorer"));
        assert_eq!(s.fingerprint, lm.fingerprint, "{id}");
        let c = &lm.model.cfg;
        assert!(s.fits(c.n_layers, c.n_kv_heads, c.hidden), "{id}");
    }
}

#[test]
fn slots_carry_the_scorer_applied_to_their_hidden_state_and_kvzap_needs_no_pass() {
    let lm = LoadedModel::open(&model_path("qwen2.5-0.5b")).unwrap();
    let text = DOC.repeat(12);
    let split = lm.split_prompt(&text, "", "", true).unwrap();
    let c = Arc::new(Compressor::from_recipe(&Recipe::parse("kvzap@0.25").unwrap()).unwrap());
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, c);
    seq.protect(split.prefix);
    seq.stats.hidden = Some(Vec::new());
    seq.feed(&lm.model, &split.context).unwrap();
    let scorer = lm.model.learned.clone().unwrap();
    let hidden = seq.stats.hidden.take().unwrap();
    let (h, k) = (lm.model.cfg.hidden, lm.model.cfg.n_kv_heads);
    for layer in [0, 11, 23] {
        let mut want = vec![0.0f32; split.context.len() * k];
        scorer.predict(layer, &hidden[layer], &mut want);
        for g in 0..k {
            let got: Vec<f32> = seq.cache.layers[layer][g]
                .meta()
                .iter()
                .map(|m| m.learned)
                .collect();
            for (t, (a, b)) in got.iter().zip(want.iter().skip(g).step_by(k)).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "layer {layer} head {g} token {t}: {a} vs {b}"
                );
            }
        }
        assert_eq!(hidden[layer].len(), split.context.len() * h);
    }
    let report = seq.compress(&lm).unwrap();
    assert_eq!(report.pass_secs, 0.0, "no reconstruction pass");
    assert!(!seq.has_reconstruction());
    let kept = report.bytes_after as f64 / report.bytes_before as f64;
    assert!((kept - 0.25).abs() < 0.01, "{kept}");
    // A question is answered from the compressed cache.
    seq.append(
        &lm.model,
        &lm.question_ids("What code did the keeper write?", "")
            .unwrap(),
    )
    .unwrap();
    assert!(seq.logits().iter().all(|x| x.is_finite()));
}

#[test]
fn a_scorer_file_for_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut small = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let qwen = LoadedModel::open(&model_path("qwen2.5-0.5b")).unwrap();
    let path = dir.path().join("q.kvzap");
    qwen.model.learned.as_ref().unwrap().write(&path).unwrap();
    let e = small.attach_scorer(&path).unwrap_err().to_string();
    assert!(e.contains("another model"), "{e}");
    // Without any scorer, asking for kvzap is refused by name before any work.
    small.model.learned = None;
    let c = Arc::new(Compressor::from_recipe(&Recipe::parse("kvzap@0.5").unwrap()).unwrap());
    let mut seq = Sequence::new(&small.model, KvDtype::F16, c);
    let ids = small.tokenizer.encode(DOC, true).unwrap();
    let e = seq.feed_context(&small, &ids).unwrap_err().to_string();
    assert!(e.contains("train-scorer"), "{e}");
}
