//! The compressed-context file on a real model: every storage type and every method
//! family (eviction, merging with moved keys, merged values with a logit bias, chunked
//! prefill) round-trips to a sequence that answers exactly as the one saved; a file
//! is never applied to another model, and damage is named, not served.

mod common;

use common::model_path;
use kvmerger_compression::{KvDtype, Recipe};
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::kvc::{self, KvcError};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sequence::Sequence;
use std::sync::Arc;

const DOC: &str = "Alice keeps bees behind the old mill. Every morning she counts the hives, \
writes the number in a green notebook, and walks to the river to watch the herons. \
One day the notebook went missing, and the whole village helped her look for it. \
The baker found it under a bench by the bridge, damp but readable.\n\n";

fn compressed(lm: &LoadedModel, recipe: &str, dtype: KvDtype) -> Sequence {
    let c = Compressor::from_recipe(&Recipe::parse(recipe).unwrap()).unwrap();
    let split = lm.split_prompt(DOC, "", "", true).unwrap();
    let mut seq = Sequence::new(&lm.model, dtype, Arc::new(c));
    seq.protect(split.prefix);
    seq.feed_context(lm, &split.context).unwrap();
    seq
}

/// The greedy answer to `q` from a copy of `seq`, and the logits it starts from.
fn answer(lm: &LoadedModel, seq: &Sequence, q: &str) -> (Vec<f32>, Vec<u32>) {
    let mut s = seq.clone();
    s.append(&lm.model, &lm.question_ids(q, "").unwrap())
        .unwrap();
    let logits = s.logits().to_vec();
    let params = kvmerger_engine::generate::GenerateParams {
        max_tokens: 6,
        ..Default::default()
    };
    let gen = s
        .generate(&lm.model, &lm.tokenizer, &params, &mut |_| true)
        .unwrap();
    (logits, gen.tokens)
}

#[test]
fn every_storage_type_and_method_family_round_trips_to_the_same_answers() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    for (recipe, dtype) in [
        ("keydiff@0.5", KvDtype::F16),
        ("keydiff@0.5", KvDtype::F32),
        ("keydiff@0.5", KvDtype::Q8_0),
        ("kvmerger@0.5", KvDtype::F16),
        (
            "kvmerger+:selector=snapkv,scope=head,merge=values@0.5",
            KvDtype::F16,
        ),
        ("h2o:prefill_chunk=32,recompress_margin=8@64", KvDtype::Q8_0),
        ("kvzip@0.25", KvDtype::F16),
    ] {
        let seq = compressed(&lm, recipe, dtype);
        let bytes = kvc::encode(&seq, &lm, "agnostic", serde_json::json!({"note": recipe}));
        let (back, h) = kvc::decode(&bytes, &lm).unwrap();
        assert_eq!(
            h.recipe.to_string(),
            Recipe::parse(recipe).unwrap().to_string()
        );
        assert_eq!(h.extra["note"], recipe);
        assert_eq!(h.dtype, dtype);
        assert_eq!(back.tokens(), seq.tokens(), "{recipe}");
        assert_eq!(back.compressed_end(), seq.compressed_end());
        assert_eq!(back.targets(), seq.targets());
        assert_eq!(back.cache.lengths(), seq.cache.lengths(), "{recipe}");
        for (a, b) in back
            .cache
            .layers
            .iter()
            .flatten()
            .zip(seq.cache.layers.iter().flatten())
        {
            assert_eq!(a.to_data(), b.to_data(), "{recipe} {dtype:?}");
        }
        assert!(back.cache.bytes() < seq.tokens().len() * back.cache.token_bytes());
        // The file is the cache plus its token ids and header: within 5% of the cache.
        assert!(
            (bytes.len() as f64) < 1.05 * back.cache.bytes() as f64 + 4096.0,
            "{recipe}: {} bytes for a cache of {}",
            bytes.len(),
            back.cache.bytes()
        );
        let q = "Where did Alice write the number of hives?";
        assert_eq!(
            answer(&lm, &back, q),
            answer(&lm, &seq, q),
            "{recipe} {dtype:?}"
        );
    }
}

#[test]
fn a_file_is_never_applied_to_another_model_and_damage_is_named() {
    let small = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let qwen = LoadedModel::open(&model_path("qwen2.5-0.5b")).unwrap();
    let seq = compressed(&small, "keydiff@0.5", KvDtype::F16);
    let bytes = kvc::encode(&seq, &small, "agnostic", serde_json::Value::Null);
    assert!(matches!(
        kvc::decode(&bytes, &qwen),
        Err(KvcError::Model { .. })
    ));
    let mut flipped = bytes.clone();
    let at = bytes.len() - 100;
    flipped[at] ^= 1;
    assert!(matches!(
        kvc::decode(&flipped, &small),
        Err(KvcError::Checksum)
    ));
    assert!(matches!(
        kvc::decode(&bytes[..bytes.len() - 1], &small),
        Err(KvcError::Checksum)
    ));
    assert!(matches!(
        kvc::decode(b"KVCTX", &small),
        Err(KvcError::Magic)
    ));
    // A newer format version is refused by name (the header says so before any data).
    let mut newer = bytes.clone();
    let hlen = u32::from_le_bytes(newer[8..12].try_into().unwrap()) as usize;
    let h = String::from_utf8_lossy(&newer[12..12 + hlen]).to_string();
    let at = 12 + h.find("\"version\":1").unwrap() + "\"version\":".len();
    newer[at] = b'7';
    assert!(matches!(
        kvc::decode(&newer, &small),
        Err(KvcError::Version(7))
    ));
    // The header alone is enough to list a file.
    let h = kvc::peek_header(&bytes[..bytes.len() / 10 + 4096]).unwrap();
    assert_eq!(h.tokens, seq.tokens().len());
}
