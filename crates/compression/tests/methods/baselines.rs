//! What each baseline keeps, on heads built so the right answer is known.

use crate::data::{build, head, identical, mid, positions};
use kvmerger_compression::methods::pyramidkv::PyramidKv;
use kvmerger_compression::{HeadData, HeadInput, HeadStats, Method, Options, SlotMeta};

/// `n` slots with one-hot-ish keys `[1, i]` and values `[i, i]`.
fn ramp(n: usize) -> HeadData {
    let mut d = HeadData::new(2);
    for i in 0..n {
        d.push(
            &[1.0, i as f32],
            &[i as f32, i as f32],
            SlotMeta::token(i as u32),
        );
    }
    d
}

/// What `m` makes of `data` with these statistics at `budget`, in a middle layer.
fn compress(m: &dyn Method, data: &HeadData, stats: &HeadStats, budget: usize) -> HeadData {
    m.compress(HeadInput {
        data,
        stats,
        pos: mid(),
        budget,
    })
    .unwrap()
}

/// The positions `m` keeps.
fn run(m: &dyn Method, data: &HeadData, stats: &HeadStats, budget: usize) -> Vec<u32> {
    positions(&compress(m, data, stats, budget))
}

#[test]
fn streaming_keeps_the_sinks_and_the_newest_slots() {
    let d = ramp(20);
    assert_eq!(
        run(&*build("streaming", &[]), &d, &HeadStats::default(), 7),
        vec![0, 1, 2, 3, 17, 18, 19]
    );
}

#[test]
fn h2o_keeps_the_recent_half_and_the_heaviest_older_slots() {
    let d = ramp(10);
    let mut acc = vec![0.1; 10];
    acc[2] = 5.0;
    acc[4] = 3.0;
    acc[9] = 0.0;
    let stats = HeadStats {
        accumulated: Some(acc),
        ..Default::default()
    };
    assert_eq!(run(&*build("h2o", &[]), &d, &stats, 4), vec![2, 4, 8, 9]);
    assert_eq!(
        run(&*build("h2o", &[("recent", "0")]), &d, &stats, 2),
        vec![2, 4]
    );
}

#[test]
fn tova_keeps_what_the_newest_query_attends_to() {
    let d = ramp(6);
    let stats = HeadStats {
        last: Some(vec![0.3, 0.0, 0.1, 0.5, 0.05, 0.05]),
        ..Default::default()
    };
    assert_eq!(run(&*build("tova", &[]), &d, &stats, 2), vec![0, 3]);
}

#[test]
fn snapkv_pooling_keeps_the_neighbours_of_a_strong_vote() {
    let d = ramp(20);
    let mut votes = vec![0.01; 20];
    votes[5] = 1.0;
    votes[12] = 0.5;
    let stats = HeadStats {
        window: Some(votes),
        ..Default::default()
    };
    let m = build("snapkv", &[("window", "4"), ("kernel", "3")]);
    assert_eq!(run(&*m, &d, &stats, 7), vec![4, 5, 6, 16, 17, 18, 19]);
    let unpooled = build("snapkv", &[("window", "4"), ("kernel", "1")]);
    assert_eq!(run(&*unpooled, &d, &stats, 6), vec![5, 12, 16, 17, 18, 19]);
}

#[test]
fn pyramidkv_budgets_shrink_up_the_layers_and_average_the_given_budget() {
    let p = PyramidKv::from_options(&Options::new()).unwrap();
    let budgets: Vec<usize> = (0..32).map(|l| p.layer_budget(1024, l, 32)).collect();
    assert!(budgets.windows(2).all(|w| w[0] >= w[1]), "{budgets:?}");
    let total: usize = budgets.iter().sum();
    assert!(total <= 32 * 1024 && total + 32 >= 32 * 1024, "{total}");
    // The top layer keeps the window plus 1/20 of the mean selectable budget (β = 20).
    assert_eq!(budgets[31], 32 + (992.0f64 * 0.05).floor() as usize);
    // The floor bounds the slope.
    let mut o = Options::new();
    o.set("beta", 1);
    o.set("floor", 0.2);
    let steep = PyramidKv::from_options(&o).unwrap();
    assert_eq!(
        steep.layer_budget(1024, 31, 32),
        32 + (992.0f64 * 0.2).floor() as usize
    );
}

#[test]
fn knorm_keeps_the_smallest_keys() {
    let mut d = HeadData::new(2);
    for (i, k) in [3.0f32, 0.5, 2.0, 0.1, 9.0].iter().enumerate() {
        d.push(&[*k, 0.0], &[0.0, 0.0], SlotMeta::token(i as u32));
    }
    assert_eq!(
        run(&*build("knorm", &[]), &d, &HeadStats::default(), 2),
        vec![1, 3]
    );
    assert_eq!(
        run(
            &*build("knorm", &[("recent", "0.5")]),
            &d,
            &HeadStats::default(),
            2
        ),
        vec![3, 4]
    );
}

#[test]
fn random_gives_the_same_subset_for_the_same_seed_and_head() {
    let h = head(200, 4, 1);
    let a = build("random", &[("seed", "7")])
        .compress(h.input(50, mid()))
        .unwrap();
    let b = build("random", &[("seed", "7")])
        .compress(h.input(50, mid()))
        .unwrap();
    let c = build("random", &[("seed", "8")])
        .compress(h.input(50, mid()))
        .unwrap();
    let other_head = kvmerger_compression::HeadPos {
        kv_head: 1,
        ..mid()
    };
    let d = build("random", &[("seed", "7")])
        .compress(h.input(50, other_head))
        .unwrap();
    assert!(identical(&a, &b));
    assert_ne!(positions(&a), positions(&c));
    assert_ne!(positions(&a), positions(&d));
}

#[test]
fn cam_moves_evicted_values_forward_without_losing_them_when_every_merge_is_certain() {
    // Equal attention everywhere: p = 1 for every evicted slot, so the sum of the values
    // is conserved and ends up in the kept slots after the evicted ones.
    let d = ramp(40);
    let stats = HeadStats {
        accumulated: Some(vec![1.0; 40]),
        ..Default::default()
    };
    let out = compress(&*build("cam", &[("m", "4")]), &d, &stats, 12);
    let total_in: f32 = d.values.iter().sum();
    let total_out: f32 = out.values.iter().sum();
    assert!(
        (total_in - total_out).abs() < 1e-3 * total_in,
        "{total_in} vs {total_out}"
    );
    assert_eq!(&out.values[..8], &d.values[..8], "sinks changed");
}

#[test]
fn cam_does_not_merge_slots_that_drew_no_attention() {
    let d = ramp(40);
    let mut acc = vec![1.0; 40];
    acc[4..32].iter_mut().for_each(|a| *a = 0.0);
    let stats = HeadStats {
        accumulated: Some(acc),
        ..Default::default()
    };
    for mode in ["deterministic", "sample"] {
        let out = compress(&*build("cam", &[("mode", mode)]), &d, &stats, 12);
        assert!(out
            .meta
            .iter()
            .enumerate()
            .all(|(j, x)| out.value(j) == d.value(x.position as usize)));
    }
}

#[test]
fn cam_sampling_is_reproducible_with_its_seed() {
    let h = head(300, 8, 5);
    let run = |seed: &str| {
        build(
            "cam",
            &[("mode", "sample"), ("seed", seed), ("select", "h2o")],
        )
        .compress(h.input(100, mid()))
        .unwrap()
    };
    assert!(identical(&run("3"), &run("3")));
    assert!(!identical(&run("3"), &run("4")));
}

#[test]
fn d2o_merges_every_evicted_slot_into_an_identical_kept_key() {
    let mut d = HeadData::new(2);
    for i in 0..30 {
        d.push(&[1.0, 2.0], &[i as f32, 0.0], SlotMeta::token(i as u32));
    }
    let stats = HeadStats {
        accumulated: Some((0..30).map(|i| i as f32).collect()),
        ..Default::default()
    };
    let out = compress(&*build("d2o", &[]), &d, &stats, 6);
    assert_eq!(out.len(), 6);
    assert_eq!(out.meta.iter().map(|x| x.count).sum::<u32>(), 30);
    assert!(out
        .keys
        .chunks(2)
        .all(|k| (k[0] - 1.0).abs() < 1e-6 && (k[1] - 2.0).abs() < 1e-6));
}

#[test]
fn cam_can_spread_over_the_recent_window_or_follow_h2o_eviction() {
    let h = head(120, 4, 9);
    for pairs in [
        &[("m", "recent")][..],
        &[("select", "h2o"), ("recent", "0.25")][..],
    ] {
        let out = build("cam", pairs).compress(h.input(40, mid())).unwrap();
        assert_eq!(out.len(), 40, "{pairs:?}");
    }
}
