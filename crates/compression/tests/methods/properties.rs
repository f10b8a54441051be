//! Properties every method must have, on generated heads of every size and budget.

use crate::data::{self, head, identical, mid, positions, unchanged};
use kvmerger_compression::methods::pyramidkv::PyramidKv;
use kvmerger_compression::{registry, HeadPos, Method, Options};
use proptest::prelude::*;

/// Options that let each method work with small budgets (windows of a few slots).
fn small_options(name: &str) -> Options {
    let mut o = Options::new();
    match name {
        "streaming" => o.set("sinks", 2),
        "snapkv" | "pyramidkv" => {
            o.set("window", 3);
            o.set("kernel", 3);
        }
        "kvmerger+" => {
            o.set("selector", "snapkv");
            o.set("window", 3);
            o.set("kernel", 3);
            o.set("merge", "values");
        }
        "cam" => {
            o.set("sinks", 2);
            o.set("m", 4);
        }
        "expected_attention" | "kvzip" | "kvzap" | "adakv" => o.set("sinks", 1),
        _ => {}
    }
    o
}

/// The smallest budget each method accepts with [`small_options`].
fn least_budget(name: &str) -> usize {
    match name {
        "streaming" | "cam" => 2,
        "snapkv" | "pyramidkv" | "kvmerger+" => 3,
        _ => 1,
    }
}

fn build(name: &str) -> Box<dyn Method> {
    registry::build(name, &small_options(name)).unwrap()
}

/// Methods that only choose slots: every output slot is an input slot, bit for bit.
const EVICTION_ONLY: &[&str] = &[
    "streaming",
    "h2o",
    "tova",
    "snapkv",
    "pyramidkv",
    "knorm",
    "random",
    "keydiff",
    "expected_attention",
    "kvzip",
    "kvzap",
    "adakv",
];

fn layers() -> impl Strategy<Value = HeadPos> {
    (1usize..8)
        .prop_flat_map(|n_layers| (0..n_layers).prop_map(move |layer| data::pos(layer, n_layers)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_method_keeps_more_than_its_budget(n in 1usize..150, dim in 1usize..12, cut in 0.0f64..1.0,
                                            seed in any::<u64>(), pos in layers()) {
        let h = head(n, dim, seed);
        for &name in registry::names() {
            if name == "full" || name == "pyramidkv" {
                continue;
            }
            let budget = ((n as f64 * cut) as usize).max(least_budget(name));
            let out = build(name).compress(h.input(budget, pos)).unwrap();
            prop_assert!(out.len() <= budget, "{name}: {} slots for a budget of {budget}", out.len());
        }
    }

    #[test]
    fn pyramidkv_keeps_at_most_its_layer_budget_and_the_layers_average_at_most_the_budget(
        n in 1usize..150, cut in 0.0f64..1.0, seed in any::<u64>(), n_layers in 1usize..12) {
        let h = head(n, 4, seed);
        let opts = small_options("pyramidkv");
        let p = PyramidKv::from_options(&opts).unwrap();
        let budget = ((n as f64 * cut) as usize).max(3);
        let mut total = 0;
        for layer in 0..n_layers {
            let out = p.compress(h.input(budget, data::pos(layer, n_layers))).unwrap();
            prop_assert!(out.len() <= p.layer_budget(budget, layer, n_layers));
            total += p.layer_budget(budget, layer, n_layers);
        }
        prop_assert!(total <= n_layers * budget);
    }

    #[test]
    fn outputs_are_in_position_order_and_keep_only_input_positions(
        n in 1usize..120, cut in 0.0f64..1.0, seed in any::<u64>(), pos in layers()) {
        let h = head(n, 6, seed);
        for &name in registry::names() {
            let budget = ((n as f64 * cut) as usize).max(least_budget(name));
            let out = build(name).compress(h.input(budget, pos)).unwrap();
            let p = positions(&out);
            prop_assert!(p.windows(2).all(|w| w[0] < w[1]), "{name}: {p:?}");
            prop_assert!(p.iter().all(|&x| (x as usize) < n), "{name}");
        }
    }

    #[test]
    fn eviction_methods_return_input_slots_bit_for_bit(
        n in 1usize..120, cut in 0.0f64..1.0, seed in any::<u64>(), pos in layers()) {
        let h = head(n, 5, seed);
        for &name in EVICTION_ONLY {
            let budget = ((n as f64 * cut) as usize).max(least_budget(name));
            let out = build(name).compress(h.input(budget, pos)).unwrap();
            for m in &out.meta {
                prop_assert!(unchanged(&h.data, &out, m.position), "{name} changed slot {}", m.position);
            }
        }
    }

    #[test]
    fn a_budget_covering_the_head_leaves_it_bit_identical(
        n in 1usize..100, extra in 0usize..5, seed in any::<u64>(), pos in layers()) {
        let h = head(n, 7, seed);
        for &name in registry::names() {
            let out = build(name).compress(h.input(n + extra, pos)).unwrap();
            prop_assert!(identical(&out, &h.data), "{name} changed a head within its budget");
        }
    }

    #[test]
    fn kvmerger_in_exact_mode_ends_at_exactly_the_budget(
        n in 2usize..150, cut in 0.0f64..1.0, seed in any::<u64>(), pos in layers(),
        chain in prop_oneof![Just("last"), Just("first")]) {
        let h = head(n, 8, seed);
        let mut o = Options::new();
        o.set("chain", chain);
        let m = registry::build("kvmerger", &o).unwrap();
        let budget = ((n as f64 * cut) as usize).clamp(1, n - 1);
        prop_assert_eq!(m.compress(h.input(budget, pos)).unwrap().len(), budget);
    }

    #[test]
    fn kvmerger_in_paper_mode_keeps_every_token_counted(
        n in 1usize..150, cut in 0.0f64..1.0, seed in any::<u64>()) {
        let h = head(n, 8, seed);
        let mut o = Options::new();
        o.set("mode", "paper");
        let m = registry::build("kvmerger", &o).unwrap();
        let budget = ((n as f64 * cut) as usize).max(1);
        let out = m.compress(h.input(budget, mid())).unwrap();
        prop_assert_eq!(out.meta.iter().map(|m| m.count as usize).sum::<usize>(), n);
    }

    #[test]
    fn merging_methods_never_count_more_tokens_than_they_were_given(
        n in 1usize..150, cut in 0.0f64..1.0, seed in any::<u64>()) {
        let h = head(n, 8, seed);
        for name in ["kvmerger", "d2o", "kvmerger+", "cam"] {
            let budget = ((n as f64 * cut) as usize).max(least_budget(name));
            let out = build(name).compress(h.input(budget, mid())).unwrap();
            let counted: usize = out.meta.iter().map(|m| m.count as usize).sum();
            prop_assert!(counted <= n && counted >= out.len(), "{name}: {counted} of {n}");
        }
    }

    #[test]
    fn recent_windows_and_sinks_survive_bit_for_bit(
        n in 1usize..150, cut in 0.0f64..1.0, seed in any::<u64>(), pos in layers()) {
        let h = head(n, 6, seed);
        let budget = |least: usize| ((n as f64 * cut) as usize).max(least);
        let last = |k: usize| (n.saturating_sub(k)..n).map(|i| i as u32).collect::<Vec<_>>();
        // streaming: 2 sinks and the rest of the budget as the recent window
        let b = budget(2);
        let out = build("streaming").compress(h.input(b, pos)).unwrap();
        let mut expect: Vec<u32> = (0..2.min(n) as u32).collect();
        expect.extend(last(b.min(n) - 2.min(n)).into_iter().filter(|&p| p >= 2));
        for &p in &expect {
            prop_assert!(unchanged(&h.data, &out, p), "streaming lost {p}");
        }
        // h2o, random: half the budget is the recent window
        for name in ["h2o", "random"] {
            let b = budget(1);
            let out = build(name).compress(h.input(b, pos)).unwrap();
            let recent = ((b as f64 * 0.5).round() as usize).min(b);
            for p in last(recent.min(n)) {
                prop_assert!(unchanged(&h.data, &out, p), "{name} lost recent slot {p}");
            }
        }
        // snapkv, pyramidkv, kvmerger+: the observation window of 3
        for name in ["snapkv", "pyramidkv", "kvmerger+"] {
            let out = build(name).compress(h.input(budget(3), pos)).unwrap();
            for p in last(3) {
                prop_assert!(unchanged(&h.data, &out, p), "{name} lost window slot {p}");
            }
        }
        // cam: sinks keep their values; every kept slot keeps its key and metadata
        let out = build("cam").compress(h.input(budget(2), pos)).unwrap();
        for p in 0..2.min(n) as u32 {
            prop_assert!(unchanged(&h.data, &out, p), "cam changed sink {p}");
        }
        for (j, m) in out.meta.iter().enumerate() {
            let (k, _, meta) = data::slot_at(&h.data, m.position);
            prop_assert!(data::same_bits(out.key(j), k) && *m == meta);
        }
    }
}
