//! KVMerger and KVMerger+: sets, weights, protected slots, budgets and attention mass.

use crate::data::{self, attend, build, head, head_with, identical, mid, options, unchanged, Head};
use kvmerger_compression::methods::kvmerger::{merge_sets, KvMerger, MergePlan};
use kvmerger_compression::methods::kvmerger_plus::KvMergerPlus;
use kvmerger_compression::{
    HeadData, HeadInput, HeadPos, HeadStats, MassCorrection, Method, SlotMeta,
};
use proptest::prelude::*;

fn kvmerger(pairs: &[(&str, &str)]) -> KvMerger {
    KvMerger::from_options(&options(pairs)).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na * nb > 0.0 {
        dot / (na * nb)
    } else {
        0.0
    }
}

/// Every slot is protected, in exactly one set, or dropped.
fn assert_partition(plan: &MergePlan, n: usize) {
    let mut seen = vec![0; n];
    for &i in plan.protected.iter().chain(&plan.dropped) {
        seen[i] += 1;
    }
    for s in &plan.sets {
        for i in s.members.clone() {
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "not a partition: {seen:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn merge_weights_are_convex_and_sets_are_consecutive_runs_of_unprotected_slots(
        n in 2usize..200, cut in 0.05f64..0.95, seed in any::<u64>(),
        mode in prop_oneof![Just("exact"), Just("paper")], chain in prop_oneof![Just("last"), Just("first")],
        sigma in prop_oneof![Just("mean"), Just("0.5"), Just("5")]) {
        let h = head(n, 8, seed);
        let m = kvmerger(&[("mode", mode), ("chain", chain), ("sigma", sigma)]);
        let budget = ((n as f64 * cut) as usize).clamp(1, n - 1);
        let plan = merge_sets(&m, &h.input(budget, mid())).unwrap();
        assert_partition(&plan, n);
        let a = h.stats.accumulated.as_ref().unwrap();
        for s in &plan.sets {
            prop_assert_eq!(s.weights.len(), s.members.len());
            prop_assert!(s.weights.iter().all(|&w| w >= 0.0));
            prop_assert!((s.weights.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            prop_assert!(s.members.contains(&s.pivot));
            prop_assert!(s.members.clone().all(|i| a[i] <= a[s.pivot]), "pivot is not the top-scoring member");
            let pos: Vec<u32> = s.members.clone().map(|i| h.data.meta[i].position).collect();
            prop_assert!(pos.windows(2).all(|w| w[1] == w[0] + 1), "set not consecutive: {pos:?}");
            prop_assert!(s.members.clone().all(|i| plan.protected.binary_search(&i).is_err()));
        }
        prop_assert!(plan.sets.windows(2).all(|w| w[0].members.end <= w[1].members.start));
    }

    #[test]
    fn kvmerger_keeps_the_recent_window_and_heavy_hitters_bit_for_bit(
        n in 2usize..200, cut in 0.05f64..0.95, seed in any::<u64>(),
        mode in prop_oneof![Just("exact"), Just("paper")]) {
        let h = head(n, 8, seed);
        let m = kvmerger(&[("mode", mode)]);
        let budget = ((n as f64 * cut) as usize).clamp(1, n - 1);
        let input = h.input(budget, mid());
        let plan = m.plan(&input).unwrap();
        let out = m.compress(input).unwrap();
        prop_assert!(plan.protected.ends_with(&(n - plan.recent..n).collect::<Vec<_>>()));
        for &i in &plan.protected {
            prop_assert!(unchanged(&h.data, &out, i as u32), "protected slot {i} changed");
        }
        prop_assert_eq!(out.len(), plan.slots());
    }

    #[test]
    fn in_paper_mode_a_set_grows_exactly_while_neighbour_keys_are_above_epsilon(
        n in 2usize..200, seed in any::<u64>(), eps in 0.0f32..0.99) {
        let h = head(n, 8, seed);
        let eps_s = eps.to_string();
        let m = kvmerger(&[("mode", "paper"), ("epsilon", &eps_s)]);
        let plan = m.plan(&h.input(n / 2, mid())).unwrap();
        let k = |i: usize| h.data.key(i);
        for s in &plan.sets {
            for i in s.members.start..s.members.end - 1 {
                prop_assert!(cosine(k(i), k(i + 1)) > eps - 1e-6);
            }
        }
        for w in plan.sets.windows(2) {
            if w[0].members.end == w[1].members.start {
                let b = w[0].members.end;
                prop_assert!(cosine(k(b - 1), k(b)) <= eps + 1e-6, "sets split above epsilon");
            }
        }
    }

    #[test]
    fn exact_mode_drops_nothing_when_the_budget_allows_one_slot_per_run(
        n in 2usize..200, cut in 0.05f64..0.95, seed in any::<u64>()) {
        // min_epsilon=-1 lets any neighbours merge, so dropping is only needed when the
        // budget is below one slot per run.
        let h = head(n, 8, seed);
        let m = kvmerger(&[("min_epsilon", "-1")]);
        let budget = ((n as f64 * cut) as usize).clamp(1, n - 1);
        let plan = m.plan(&h.input(budget, mid())).unwrap();
        let mut runs = 0;
        let mut prev_protected = true;
        for i in 0..n {
            let p = plan.protected.binary_search(&i).is_ok();
            if !p && prev_protected { runs += 1; }
            prev_protected = p;
        }
        if budget >= plan.protected.len() + runs {
            prop_assert!(plan.dropped.is_empty());
            let out = m.apply(&plan, &h.data);
            prop_assert_eq!(out.meta.iter().map(|x| x.count as usize).sum::<usize>(), n);
        }
        prop_assert_eq!(plan.slots(), budget);
    }
}

/// 12 slots; slots 2..8 share one key (with different values); the last three are the
/// recent window; the others have unrelated keys.
fn identical_run() -> Head {
    let mut h = head_with(12, 16, 7, 0.0);
    let shared = h.data.key(2).to_vec();
    for i in 3..8 {
        h.data.keys[i * 16..(i + 1) * 16].copy_from_slice(&shared);
    }
    h
}

/// Options under which `kvmerger` merges [`identical_run`]'s run of identical keys into
/// one slot: paper mode, a threshold only (near-)identical neighbours pass, a quarter of
/// the budget recent, no heavy hitters, no layer skipped.
const MERGE_IDENTICAL: [(&str, &str); 5] = [
    ("mode", "paper"),
    ("epsilon", "0.999"),
    ("recent", "0.25"),
    ("heavy", "0"),
    ("skip_layers", "none"),
];

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_set_of_identical_keys_with_the_log_count_bias_reproduces_full_attention() {
    let h = identical_run();
    let m = kvmerger(&MERGE_IDENTICAL);
    let plan = m.plan(&h.input(6, mid())).unwrap();
    assert!(
        plan.sets.iter().any(|s| s.members == (2..8)),
        "{:?}",
        plan.sets
    );
    let out = m.compress(h.input(6, mid())).unwrap();
    assert_eq!(out.len(), 12 - 5);
    let merged = out.meta.iter().find(|x| x.count == 6).unwrap();
    assert!((merged.bias - 6f32.ln()).abs() < 1e-6);
    for q in 0..12 {
        let query = h.data.key(q);
        assert!(
            max_abs_diff(&attend(query, &h.data), &attend(query, &out)) < 1e-5,
            "query {q}"
        );
    }
    // Without the mass correction the same merge changes the output.
    let none = kvmerger(&[MERGE_IDENTICAL.as_slice(), &[("mass", "none")]].concat());
    let out = none.compress(h.input(6, mid())).unwrap();
    let worst = (0..12).map(|q| {
        max_abs_diff(
            &attend(h.data.key(q), &h.data),
            &attend(h.data.key(q), &out),
        )
    });
    assert!(worst.fold(0.0, f32::max) > 1e-3);
}

#[test]
fn merging_merged_slots_again_keeps_the_bias_at_the_log_of_the_total_count() {
    let h = head_with(300, 8, 3, 0.97);
    let m = kvmerger(&[
        ("mode", "paper"),
        ("epsilon", "0.5"),
        ("skip_layers", "none"),
    ]);
    let once = m.compress(h.input(150, mid())).unwrap();
    let stats = HeadStats {
        accumulated: Some(once.meta.iter().map(|x| x.score).collect()),
        ..Default::default()
    };
    let input = kvmerger_compression::HeadInput {
        data: &once,
        stats: &stats,
        pos: mid(),
        budget: once.len() / 2,
    };
    let twice = m.compress(input).unwrap();
    assert!(twice.len() < once.len());
    assert_eq!(twice.meta.iter().map(|x| x.count).sum::<u32>(), 300);
    for x in &twice.meta {
        assert!((x.bias - (x.count as f32).ln()).abs() < 1e-4, "{x:?}");
    }
}

#[test]
fn value_scaling_multiplies_merged_values_by_the_set_size() {
    let h = identical_run();
    let bias = kvmerger(&MERGE_IDENTICAL)
        .compress(h.input(6, mid()))
        .unwrap();
    let scale_m = kvmerger(&[MERGE_IDENTICAL.as_slice(), &[("mass", "scale")]].concat());
    assert_eq!(scale_m.mass_correction(), MassCorrection::ValueScale);
    let scaled = scale_m.compress(h.input(6, mid())).unwrap();
    let j = bias.meta.iter().position(|x| x.count == 6).unwrap();
    assert_eq!(scaled.meta[j].bias, 0.0);
    for (s, b) in scaled.value(j).iter().zip(bias.value(j)) {
        assert!((s - 6.0 * b).abs() < 1e-5);
    }
}

#[test]
fn a_fixed_sigma_weights_members_by_distance_to_the_pivot() {
    let mut data = HeadData::new(1);
    for (i, k) in [1.0f32, 1.1, 1.3].iter().enumerate() {
        data.push(&[*k], &[i as f32], SlotMeta::token(i as u32));
    }
    data.push(&[-5.0], &[9.0], SlotMeta::token(3));
    let stats = HeadStats {
        accumulated: Some(vec![0.1, 0.5, 0.2, 1.0]),
        ..Default::default()
    };
    let input = kvmerger_compression::HeadInput {
        data: &data,
        stats: &stats,
        pos: mid(),
        budget: 2,
    };
    let m = kvmerger(&[
        ("sigma", "0.2"),
        ("recent", "0.25"),
        ("heavy", "0"),
        ("skip_layers", "none"),
    ]);
    let plan = m.plan(&input).unwrap();
    assert_eq!(plan.sets.len(), 1);
    let s = &plan.sets[0];
    assert_eq!((s.members.clone(), s.pivot), (0..3, 1));
    let g: Vec<f32> = [0.1f32, 0.0, 0.2]
        .iter()
        .map(|d| (-d * d / (2.0 * 0.04)).exp())
        .collect();
    let total: f32 = g.iter().sum();
    for (w, gi) in s.weights.iter().zip(&g) {
        assert!((w - gi / total).abs() < 1e-6);
    }
}

#[test]
fn skipped_layers_are_untouched_in_paper_mode_and_evicted_to_the_budget_in_exact_mode() {
    let h = head(100, 8, 11);
    for layer in [0, 1, 7] {
        let paper = kvmerger(&[("mode", "paper")])
            .compress(h.input(40, data::pos(layer, 8)))
            .unwrap();
        assert!(identical(&paper, &h.data));
        let exact = kvmerger(&[])
            .compress(h.input(40, data::pos(layer, 8)))
            .unwrap();
        assert_eq!(exact.len(), 40);
        assert!(exact
            .meta
            .iter()
            .all(|x| unchanged(&h.data, &exact, x.position)));
    }
    let custom = kvmerger(&[("skip_layers", "2,-2")]);
    assert!(custom.skips_layer(2, 8) && custom.skips_layer(6, 8) && !custom.skips_layer(0, 8));
    assert!(!kvmerger(&[("skip_layers", "none")]).skips_layer(0, 8));
}

#[test]
fn default_protected_shares_follow_the_paper_at_its_two_budgets() {
    let m = kvmerger(&[]);
    assert_eq!(m.protected_counts(1000, 500).unwrap(), (170, 120));
    assert_eq!(m.protected_counts(1000, 350).unwrap(), (80, 20));
    let (r, h) = m.protected_counts(1000, 100).unwrap();
    assert!(r + h < 100);
}

#[test]
fn a_window_score_reads_the_window_statistic() {
    let m = kvmerger(&[("score", "window"), ("window", "16")]);
    assert_eq!(m.needs().window, Some(16));
    assert!(!m.needs().accumulated);
    let h = head(60, 4, 1);
    let stats = HeadStats {
        window: h.stats.window.clone(),
        ..Default::default()
    };
    let input = kvmerger_compression::HeadInput {
        data: &h.data,
        stats: &stats,
        pos: mid(),
        budget: 20,
    };
    assert_eq!(m.compress(input).unwrap().len(), 20);
}

fn plus(pairs: &[(&str, &str)]) -> KvMergerPlus {
    KvMergerPlus::from_options(
        &options(pairs),
        &kvmerger_compression::registry::build_scorer,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn kvmerger_plus_keeps_snapkvs_positions_and_pivot_keys_and_mixes_values_convexly(
        n in 5usize..200, cut in 0.05f64..0.95, seed in any::<u64>()) {
        let h = head(n, 8, seed);
        let budget = ((n as f64 * cut) as usize).clamp(4, n - 1);
        let m = plus(&[("selector", "snapkv"), ("window", "4"), ("merge", "values")]);
        let snap = build("snapkv", &[("window", "4")]);
        let out = m.compress(h.input(budget, mid())).unwrap();
        let reference = snap.compress(h.input(budget, mid())).unwrap();
        prop_assert_eq!(data::positions(&out), data::positions(&reference));
        prop_assert!(data::same_bits(&out.keys, &reference.keys), "a pivot key changed");
        let plan = m.plan_head(&h.input(budget, mid())).unwrap();
        prop_assert_eq!(plan.slots(), budget);
        for s in &plan.sets {
            prop_assert!((s.weights.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            prop_assert!(s.weights.iter().all(|&w| w >= 0.0));
        }
        for x in &out.meta {
            prop_assert!(x.bias >= 0.0 && x.bias <= 4f32.ln() + 1e-6);
        }
    }

    #[test]
    fn kvmerger_plus_on_any_selector_keeps_the_selectors_positions_and_pivot_keys(
        n in 5usize..200, cut in 0.05f64..0.95, seed in any::<u64>(), which in 0usize..4) {
        let h = head(n, 8, seed);
        let budget = ((n as f64 * cut) as usize).clamp(4, n - 1);
        let (selector, extra): (&str, &[(&str, &str)]) = [
            ("keydiff", &[][..]),
            ("expected_attention", &[("sinks", "2")][..]),
            ("kvzip", &[("sinks", "2")][..]),
            ("tova", &[][..]),
        ][which];
        let mut pairs = vec![("selector", selector)];
        pairs.extend_from_slice(extra);
        let m = plus(&[pairs.as_slice(), &[("merge", "values")]].concat());
        let alone = build(selector, extra);
        let input = h.input(budget, mid());
        let out = m.compress(input).unwrap();
        let reference = alone.compress(input).unwrap();
        prop_assert_eq!(out.len(), budget);
        prop_assert_eq!(data::positions(&out), data::positions(&reference));
        prop_assert!(data::same_bits(&out.keys, &reference.keys), "a key changed");
        let plan = m.plan_head(&input).unwrap();
        let mut seen = vec![0; n];
        for &i in plan.protected.iter().chain(&plan.dropped) {
            seen[i] += 1;
        }
        for s in &plan.sets {
            prop_assert!(s.members.contains(&s.pivot));
            prop_assert!((s.weights.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            for i in s.members.clone() {
                seen[i] += 1;
            }
        }
        prop_assert!(seen.iter().all(|&c| c == 1), "every slot is kept, merged or dropped once");
        // Without merging (the default, or said), kvmerger+ is its selector, bit for bit.
        let bare = plus(&pairs).compress(input).unwrap();
        prop_assert!(data::identical(&bare, &reference));
        pairs.push(("merge", "none"));
        let said = plus(&pairs).compress(input).unwrap();
        prop_assert!(data::identical(&said, &reference));
    }
}

#[test]
fn kvmerger_plus_with_full_mass_reproduces_attention_over_identical_keys() {
    let mut h = identical_run();
    // Slots 0, 1 and 8 win the votes; among the tied run 2..8 the newest, 7, is selected
    // and absorbs the others, whose keys equal its own.
    h.stats.window = Some(vec![
        2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0,
    ]);
    let m = plus(&[
        ("selector", "snapkv"),
        ("window", "3"),
        ("kernel", "1"),
        ("epsilon", "0.999"),
        ("damp", "1"),
        ("cap", "100"),
        ("merge", "values"),
    ]);
    let plan = m.plan_head(&h.input(7, mid())).unwrap();
    assert!(
        plan.sets
            .iter()
            .any(|s| s.members == (2..8) && s.pivot == 7),
        "{:?}",
        plan.sets
    );
    let out = m.compress(h.input(7, mid())).unwrap();
    assert_eq!(out.len(), 7);
    for q in 0..12 {
        let query = h.data.key(q);
        assert!(
            max_abs_diff(&attend(query, &h.data), &attend(query, &out)) < 1e-5,
            "query {q}"
        );
    }
}

#[test]
fn sparsity_budgets_move_slots_to_the_layers_that_merge_least_and_keep_the_total() {
    // Layer 0: all keys alike (one merging set at epsilon); layer 1: keys alternate
    // direction (every slot its own set). Observation 2 gives layer 1 the larger share.
    let n = 64;
    let alike = {
        let mut d = HeadData::new(2);
        for i in 0..n {
            d.push(
                &[1.0, 0.001 * i as f32],
                &[i as f32, 0.0],
                SlotMeta::token(i as u32),
            );
        }
        d
    };
    let varied = {
        let mut d = HeadData::new(2);
        for i in 0..n {
            let k = if i % 2 == 0 { [1.0, 0.0] } else { [-1.0, 0.2] };
            d.push(&k, &[i as f32, 0.0], SlotMeta::token(i as u32));
        }
        d
    };
    let stats = |n: usize| HeadStats {
        accumulated: Some((0..n).map(|i| i as f32).collect()),
        ..Default::default()
    };
    let (s0, s1) = (stats(n), stats(n));
    let m = kvmerger(&[
        ("layers", "sparsity"),
        ("skip_layers", "none"),
        ("recent", "0.05"),
        ("heavy", "0.05"),
    ]);
    assert!(m.sparsity(&alike) < 0.1 && m.sparsity(&varied) > 0.9);
    let pos = |layer| HeadPos {
        layer,
        n_layers: 2,
        kv_head: 0,
        n_kv_heads: 1,
    };
    let inputs = [
        HeadInput {
            data: &alike,
            stats: &s0,
            pos: pos(0),
            budget: 24,
        },
        HeadInput {
            data: &varied,
            stats: &s1,
            pos: pos(1),
            budget: 24,
        },
    ];
    let out = m.compress_all(&inputs).unwrap();
    assert_eq!(out[0].len() + out[1].len(), 48, "the total is kept");
    assert!(
        out[1].len() > out[0].len(),
        "{} vs {}",
        out[0].len(),
        out[1].len()
    );
    // Uniform (the paper's literal setting, no longer the default) keeps each layer's
    // own budget.
    let u = kvmerger(&[
        ("layers", "uniform"),
        ("skip_layers", "none"),
        ("recent", "0.05"),
        ("heavy", "0.05"),
    ]);
    let out = u.compress_all(&inputs).unwrap();
    assert_eq!((out[0].len(), out[1].len()), (24, 24));
}

#[test]
fn kvmerger_plus_is_kvzip_with_sinks_sized_to_the_budget_and_merges_only_when_told() {
    let n = 1200;
    let h = head(n, 8, 7);
    let kvzip = |sinks: &str| build("kvzip", &[("sinks", sinks)]);
    // 12.5% kept: kvzip's selection with 64 sinks, nothing merged.
    let tight = h.input(n / 8, mid());
    let out = plus(&[]).compress(tight).unwrap();
    assert!(identical(&out, &kvzip("64").compress(tight).unwrap()));
    assert_eq!(
        &data::positions(&out)[..64],
        &(0..64).collect::<Vec<_>>()[..]
    );
    // Options given explicitly win: merging when asked, the sinks given.
    let plan = plus(&[("merge", "values")]).plan_head(&tight).unwrap();
    assert!(plan.sets.iter().any(|s| s.members.len() > 1));
    let out = plus(&[("sinks", "4")]).compress(tight).unwrap();
    assert!(identical(&out, &kvzip("4").compress(tight).unwrap()));
    // A budget under twice the tight sinks keeps kvzip's default sinks.
    let small = h.input(100, mid());
    let out = plus(&[]).compress(small).unwrap();
    assert!(identical(&out, &kvzip("4").compress(small).unwrap()));
    // 25% kept: kvzip's selection with its own 4 sinks, nothing merged; merging when
    // asked, on the same selection.
    let quarter = h.input(n / 4, mid());
    let out = plus(&[]).compress(quarter).unwrap();
    assert!(identical(&out, &kvzip("4").compress(quarter).unwrap()));
    assert!(plus(&[]).plan_head(&quarter).unwrap().sets.is_empty());
    let plan = plus(&[("merge", "values")]).plan_head(&quarter).unwrap();
    assert!(plan.sets.iter().any(|s| s.members.len() > 1));
    assert_eq!(plan.slots(), n / 4);
    let merged = plus(&[("merge", "values")]).compress(quarter).unwrap();
    assert_eq!(data::positions(&merged), data::positions(&out));
    assert!(!identical(&merged, &out));
    // 6.25% kept (under 8.8%), with room for 128 sinks and 64 more: 128 sinks.
    let long = head(4000, 8, 11);
    let very = long.input(250, mid());
    let out = plus(&[]).compress(very).unwrap();
    assert!(identical(&out, &kvzip("128").compress(very).unwrap()));
    assert_eq!(
        &data::positions(&out)[..128],
        &(0..128).collect::<Vec<_>>()[..]
    );
    // Without that room (150 slots of 4000), the 64 sinks of the tight budget.
    let narrow = long.input(150, mid());
    let out = plus(&[]).compress(narrow).unwrap();
    assert!(identical(&out, &kvzip("64").compress(narrow).unwrap()));
}

#[test]
fn evicted_slots_become_one_mean_slot_that_reproduces_identical_keys_and_bounds_their_mass() {
    // identical_run's slots 2..8 share one key. Window votes keep 0, 1 and 8, the
    // window keeps 9..12: with one slot of the 7 set aside, the evicted are exactly
    // the identical run, and their mean slot reproduces full attention.
    let mut h = identical_run();
    h.stats.window = Some(vec![
        2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0,
    ]);
    let opts = [
        ("selector", "snapkv"),
        ("window", "3"),
        ("kernel", "1"),
        ("merge", "none"),
        ("evicted", "mean"),
    ];
    let out = plus(&opts).compress(h.input(7, mid())).unwrap();
    assert_eq!(out.len(), 7);
    assert_eq!(data::positions(&out), vec![0, 1, 7, 8, 9, 10, 11]);
    assert_eq!(out.meta[2].count, 6);
    for q in 0..12 {
        let query = h.data.key(q);
        let (full, kept) = (attend(query, &h.data), attend(query, &out));
        assert!(max_abs_diff(&full, &kept) < 1e-5, "query {q}");
    }
    // Without it, the run is gone and attention changes.
    let dropped = plus(&opts[..4]).compress(h.input(7, mid())).unwrap();
    assert_eq!(dropped.len(), 7);
    assert!(
        max_abs_diff(
            &attend(h.data.key(0), &h.data),
            &attend(h.data.key(0), &dropped)
        ) > 1e-3
    );

    // Unrelated keys under KVzip's selection: the budget holds, and for any query the
    // mean slot draws at most the mass its members drew.
    let n = 300;
    let h = head(n, 16, 5);
    let out = plus(&[("evicted", "mean"), ("sinks", "4")])
        .compress(h.input(40, mid()))
        .unwrap();
    assert_eq!(out.len(), 40);
    let mean = (0..out.len()).find(|&i| out.meta[i].count > 1).unwrap();
    let kept: Vec<u32> = data::positions(&out)
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| i != mean)
        .map(|(_, p)| p)
        .collect();
    let evicted: Vec<usize> = (0..n).filter(|&i| !kept.contains(&(i as u32))).collect();
    assert_eq!(out.meta[mean].count as usize, evicted.len());
    let scale = 1.0 / 4.0f32;
    let logit =
        |q: &[f32], k: &[f32], b: f32| q.iter().zip(k).map(|(a, c)| a * c).sum::<f32>() * scale + b;
    for q in (0..n).step_by(17) {
        let query = h.data.key(q);
        let bound = logit(query, out.key(mean), out.meta[mean].bias).exp();
        let mass: f32 = evicted
            .iter()
            .map(|&i| logit(query, h.data.key(i), h.data.meta[i].bias).exp())
            .sum();
        assert!(bound <= mass * 1.0001, "query {q}: {bound} > {mass}");
        assert!(bound > 0.0);
    }
}
