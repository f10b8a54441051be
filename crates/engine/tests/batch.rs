//! Batched forward passes give what one sequence at a time gives. A one-token product
//! uses fused kernels and a batched one dequantizes rows first, so logits agree to
//! rounding (about 1e-4 of the largest logit) and greedy choices agree exactly.

mod common;

use common::model_path;
use kvmerger_compression::{KvDtype, StatsNeeds};
use kvmerger_engine::cache::{KvCache, PrefillStats};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::model::{Logits, Segment};
use kvmerger_engine::sampling::argmax;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a village by the sea, there lived an old fisherman who",
    "def fibonacci(n):\n    ",
];

/// Largest absolute difference, relative to the largest absolute logit.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn prompts(lm: &LoadedModel) -> Vec<Vec<u32>> {
    PROMPTS
        .iter()
        .map(|p| lm.tokenizer.encode(p, true).unwrap())
        .collect()
}

/// Greedy decode of `steps` tokens per prompt, one sequence at a time: the logits of each step.
fn single(lm: &LoadedModel, ids: &[Vec<u32>], steps: usize) -> Vec<Vec<Vec<f32>>> {
    ids.iter()
        .map(|p| {
            let mut cache = lm.model.new_cache(KvDtype::F16);
            let mut logits = lm
                .model
                .forward(p, &mut cache, StatsNeeds::default(), None, Logits::Last)
                .unwrap();
            let mut all = vec![logits.clone()];
            for _ in 0..steps {
                let next = argmax(&logits) as u32;
                logits = lm
                    .model
                    .forward(
                        &[next],
                        &mut cache,
                        StatsNeeds::default(),
                        None,
                        Logits::Last,
                    )
                    .unwrap();
                all.push(logits.clone());
            }
            all
        })
        .collect()
}

fn check_batched_decode_matches(id: &str) {
    let lm = LoadedModel::open(&model_path(id)).unwrap();
    let ids = prompts(&lm);
    let steps = 6;
    let want = single(&lm, &ids, steps);

    // Prefill all three prompts in one batched pass, then decode them together.
    let mut caches: Vec<KvCache> = ids
        .iter()
        .map(|_| lm.model.new_cache(KvDtype::F16))
        .collect();
    let mut segs: Vec<Segment> = ids
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| Segment {
            tokens: p,
            cache,
            needs: StatsNeeds::default(),
            stats: None,
            start: 0,
            total: p.len(),
            logits: Some(Logits::Last),
        })
        .collect();
    let mut logits = lm.model.forward_batch(&mut segs).unwrap();
    drop(segs);
    for step in 0..=steps {
        for (s, (l, want)) in logits.iter().zip(&want).enumerate() {
            let d = rel_diff(&want[step], l);
            assert!(
                d < 5e-4,
                "{id}: sequence {s} step {step}: relative diff {d}"
            );
            assert_eq!(
                argmax(&want[step]),
                argmax(l),
                "{id}: sequence {s} step {step}"
            );
        }
        if step == steps {
            break;
        }
        let next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l) as u32]).collect();
        let mut segs: Vec<Segment> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| Segment::decode(t, cache, StatsNeeds::default(), None))
            .collect();
        logits = lm.model.forward_batch(&mut segs).unwrap();
    }
    for (s, c) in caches.iter().enumerate() {
        assert_eq!(
            c.n_seen,
            ids[s].len() + steps,
            "{id}: sequence {s} positions"
        );
    }
}

#[test]
fn batched_decode_logits_equal_single_sequence_logits_llama() {
    check_batched_decode_matches("smollm2-135m");
}

/// Gemma 3 has sliding-window layers: each sequence's window follows its own positions.
#[test]
fn batched_decode_logits_equal_single_sequence_logits_gemma3() {
    check_batched_decode_matches("gemma3-270m");
}

/// A prefill chunk of one sequence rides in the same pass as decode steps of others,
/// and collects the same attention statistics as a prefill of its own.
#[test]
fn a_prefill_chunk_beside_decode_steps_matches_a_prefill_alone() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let ids = prompts(&lm);
    let needs = StatsNeeds {
        accumulated: true,
        window: Some(8),
        last: true,
        ..Default::default()
    };
    // Alone: prompt 1 prefilled with statistics.
    let mut alone = lm.model.new_cache(KvDtype::F16);
    let mut alone_stats = PrefillStats::default();
    let want = lm
        .model
        .forward(
            &ids[1],
            &mut alone,
            needs,
            Some(&mut alone_stats),
            Logits::Last,
        )
        .unwrap();

    // Batched: prompt 0 is already decoding; prompt 1 is prefilled in two chunks beside it.
    let mut c0 = lm.model.new_cache(KvDtype::F16);
    let l0 = lm
        .model
        .forward(&ids[0], &mut c0, StatsNeeds::default(), None, Logits::Last)
        .unwrap();
    let mut c1 = lm.model.new_cache(KvDtype::F16);
    let mut stats1 = PrefillStats::default();
    let split = ids[1].len() / 2;
    let mut tok0 = [argmax(&l0) as u32];
    let mut got = Vec::new();
    for (start, chunk) in [(0, &ids[1][..split]), (split, &ids[1][split..])] {
        let mut segs = vec![
            Segment::decode(&tok0, &mut c0, StatsNeeds::default(), None),
            Segment {
                tokens: chunk,
                cache: &mut c1,
                needs,
                stats: Some(&mut stats1),
                start,
                total: ids[1].len(),
                logits: Some(Logits::Last),
            },
        ];
        let out = lm.model.forward_batch(&mut segs).unwrap();
        tok0 = [argmax(&out[0]) as u32];
        got = out[1].clone();
    }
    let d = rel_diff(&want, &got);
    assert!(d < 5e-4, "prefill logits: relative diff {d}");
    assert_eq!(c1.n_seen, alone.n_seen);
    for (l, (a, b)) in alone.layers.iter().zip(&c1.layers).enumerate() {
        for (h, (sa, sb)) in a.iter().zip(b).enumerate() {
            let (ma, mb) = (sa.meta(), sb.meta());
            assert_eq!(ma.len(), mb.len());
            for (x, y) in ma.iter().zip(mb) {
                assert_eq!(x.position, y.position);
                assert!(
                    (x.score - y.score).abs() < 1e-3 * (1.0 + x.score.abs()),
                    "layer {l} head {h}: accumulated {} vs {}",
                    x.score,
                    y.score
                );
            }
            let n = alone.n_seen;
            let window = (
                alone_stats.window(l, h, 8, n).unwrap(),
                stats1.window(l, h, 8, n).unwrap(),
            );
            let (wa, wb) = (&alone_stats.heads[l][h], &stats1.heads[l][h]);
            let last = (wa.last.clone().unwrap(), wb.last.clone().unwrap());
            for (x, y) in [window, last] {
                assert_eq!(x.len(), y.len());
                for (p, q) in x.iter().zip(y) {
                    // Sums of attention over many queries, accumulated tile by tile in
                    // f32: equal to a relative 1e-3, like the accumulated scores above.
                    assert!(
                        (p - q).abs() < 1e-3 * (1.0 + p.abs()),
                        "layer {l} head {h}: {p} vs {q}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_segments_are_errors_not_panics() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let mut c = lm.model.new_cache(KvDtype::F16);
    let mut segs = vec![Segment::decode(&[], &mut c, StatsNeeds::default(), None)];
    assert!(lm.model.forward_batch(&mut segs).is_err());
    let outside = [lm.model.cfg.vocab as u32];
    let mut segs = vec![Segment::decode(
        &outside,
        &mut c,
        StatsNeeds::default(),
        None,
    )];
    assert!(lm.model.forward_batch(&mut segs).is_err());
    let mut wrong = KvCache::new(1, 1, 8, KvDtype::F16);
    let mut segs = vec![Segment::decode(
        &[1],
        &mut wrong,
        StatsNeeds::default(),
        None,
    )];
    assert!(lm.model.forward_batch(&mut segs).is_err());
    assert_eq!(c.n_seen, 0, "a rejected pass leaves the cache untouched");
    assert!(lm.model.forward_batch(&mut []).unwrap().is_empty());
}

/// Hand-run: `cargo test --release -p kvmerger-engine --test batch -- --ignored --nocapture`.
/// Decode tokens per second for B sequences, one pass each versus one batched pass.
#[test]
#[ignore]
fn batched_decode_throughput() {
    let id = std::env::var("KVMERGER_BENCH_MODEL").unwrap_or_else(|_| "smollm2-135m".into());
    let lm = LoadedModel::open(&model_path(&id)).unwrap();
    let prompt = lm
        .tokenizer
        .encode(
            "Once upon a time, in a village by the sea, there lived",
            true,
        )
        .unwrap();
    for b in [1usize, 2, 4, 8, 16, 32, 64] {
        let mut caches: Vec<KvCache> = (0..b)
            .map(|_| {
                let mut c = lm.model.new_cache(KvDtype::F16);
                lm.model
                    .forward(&prompt, &mut c, StatsNeeds::default(), None, Logits::Last)
                    .unwrap();
                c
            })
            .collect();
        let steps = 8;
        let t = std::time::Instant::now();
        for _ in 0..steps {
            for c in caches.iter_mut() {
                lm.model
                    .forward(&[42], c, StatsNeeds::default(), None, Logits::Last)
                    .unwrap();
            }
        }
        let seq = (b * steps) as f64 / t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        for _ in 0..steps {
            let tok = [42u32];
            let mut segs: Vec<Segment> = caches
                .iter_mut()
                .map(|c| Segment::decode(&tok, c, StatsNeeds::default(), None))
                .collect();
            lm.model.forward_batch(&mut segs).unwrap();
        }
        let bat = (b * steps) as f64 / t.elapsed().as_secs_f64();
        eprintln!(
            "{id} B={b:3}: one pass each {seq:7.1} tok/s, batched {bat:7.1} tok/s ({:.2}x)",
            bat / seq
        );
    }
}

/// A pass that wants no logits skips the last layer's output projection and
/// feed-forward, and leaves exactly the cache and statistics of a pass that does.
#[test]
fn a_pass_without_logits_leaves_the_same_cache_and_statistics() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let ids = prompts(&lm);
    let needs = StatsNeeds {
        accumulated: true,
        window: Some(4),
        last: true,
        ..Default::default()
    };
    let run = |logits: Logits| {
        let mut cache = lm.model.new_cache(KvDtype::F16);
        let mut stats = PrefillStats::default();
        let out = lm
            .model
            .forward(&ids[1], &mut cache, needs, Some(&mut stats), logits)
            .unwrap();
        (out, cache, stats)
    };
    let (with, ca, sa) = run(Logits::Last);
    let (without, cb, sb) = run(Logits::None);
    assert_eq!(with.len(), lm.model.cfg.vocab);
    assert!(without.is_empty());
    assert_eq!(ca.n_seen, cb.n_seen);
    for (a, b) in ca.layers.iter().flatten().zip(cb.layers.iter().flatten()) {
        let (da, db) = (a.to_data(), b.to_data());
        assert_eq!(da.meta.len(), db.meta.len());
        for j in 0..da.meta.len() {
            assert_eq!(da.key(j), db.key(j));
            assert_eq!(da.value(j), db.value(j));
            assert_eq!(da.meta[j].score, db.meta[j].score);
        }
    }
    let last_layer = sa.heads.len() - 1;
    for (ha, hb) in sa.heads[last_layer].iter().zip(&sb.heads[last_layer]) {
        assert_eq!(ha.last, hb.last);
        assert_eq!(ha.window, hb.window);
    }
}
