//! Per-layer budget schedules and decode-time re-compression.

use kvmerger_compression::{Budget, Schedule};

#[test]
fn a_uniform_schedule_gives_every_layer_the_base_budget() {
    for l in 0..30 {
        assert_eq!(
            Schedule::Uniform.layer_budget(Budget::Fraction(0.5), l, 30, 4096),
            2048
        );
    }
}

#[test]
fn a_pyramid_shrinks_up_the_layers_and_keeps_the_overall_budget() {
    let s = Schedule::Pyramid { beta: 0.5 };
    let b: Vec<usize> = (0..30)
        .map(|l| s.layer_budget(Budget::Tokens(1000), l, 30, 4096))
        .collect();
    assert_eq!((b[0], b[29]), (1500, 500));
    assert!(b.windows(2).all(|w| w[0] >= w[1]));
    let total: usize = b.iter().sum();
    assert!(total <= 30_000 && total + 30 >= 30_000);
}

#[test]
fn layer_budgets_stay_between_one_slot_and_the_head_length() {
    let s = Schedule::Pyramid { beta: 1.0 };
    assert_eq!(s.layer_budget(Budget::Tokens(800), 0, 10, 1000), 1000);
    assert_eq!(s.layer_budget(Budget::Tokens(800), 9, 10, 1000), 1);
}

#[test]
fn ratio_files_are_relative_weights_per_layer() {
    let s = Schedule::parse_ratios(
        "# measured at epsilon 0.75\nlayer,ratio\n0,0.2\n1,0.6\n\n2, 0.4 # middle\n",
    )
    .unwrap();
    assert_eq!(s, Schedule::File(vec![0.2, 0.6, 0.4]));
    s.check(3).unwrap();
    assert!(s.check(4).is_err());
    let b: Vec<usize> = (0..3)
        .map(|l| s.layer_budget(Budget::Tokens(100), l, 3, 1000))
        .collect();
    assert_eq!(b, vec![50, 150, 100]);
    assert_eq!(
        Schedule::parse_ratios("1\n2\n").unwrap(),
        Schedule::File(vec![1.0, 2.0])
    );
}

#[test]
fn a_ratio_file_for_another_depth_is_read_at_the_same_relative_depth() {
    let s = Schedule::File(vec![1.0, 3.0]);
    assert_eq!(s.layer_budget(Budget::Tokens(100), 0, 4, 1000), 50);
    assert_eq!(s.layer_budget(Budget::Tokens(100), 3, 4, 1000), 150);
}

#[test]
fn malformed_ratio_files_are_errors() {
    for bad in [
        "",
        "# nothing\n",
        "0.5\nabc\n",
        "0.5\n-1\n",
        "0\n0\n",
        "0.5\ninf\n",
    ] {
        assert!(Schedule::parse_ratios(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn schedules_parse_from_their_names() {
    assert_eq!("uniform".parse::<Schedule>().unwrap(), Schedule::Uniform);
    assert_eq!(
        "pyramid:0.3".parse::<Schedule>().unwrap(),
        Schedule::Pyramid { beta: 0.3 }
    );
    assert!(matches!(
        "pyramid".parse::<Schedule>().unwrap(),
        Schedule::Pyramid { .. }
    ));
    for bad in ["pyramid:2", "pyramid:x", "cone", ""] {
        assert!(bad.parse::<Schedule>().is_err(), "{bad}");
    }
}

#[test]
fn no_layer_of_a_schedule_gets_less_than_the_methods_window_and_the_total_holds() {
    // Observation 2's kind of schedule: some layers keep a tiny share.
    let s = Schedule::File(vec![0.6, 0.002, 0.5, 0.01, 0.3, 0.2]);
    let base = Budget::Fraction(0.35);
    let uniform_total = 6 * base.slots(4096);
    let raw: Vec<usize> = (0..6).map(|l| s.layer_budget(base, l, 6, 4096)).collect();
    assert!(raw.iter().any(|&b| b < 32), "{raw:?}");
    let b = s.layer_budgets(base, 6, 4096, 32);
    assert!(b.iter().all(|&x| (32..=4096).contains(&x)), "{b:?}");
    assert_eq!(b.iter().sum::<usize>(), uniform_total);
    // The large layers gave the slots, each no more than it had, in their order.
    for l in 0..6 {
        if raw[l] >= 32 {
            assert!(b[l] <= raw[l], "{l}: {b:?} {raw:?}");
        }
    }
    assert!(b[0] > b[2] && b[2] > b[4] && b[4] > b[5]);
    // Without a minimum, only rounding separates it from the per-layer budgets.
    let free = s.layer_budgets(base, 6, 4096, 0);
    assert_eq!(free.iter().sum::<usize>(), uniform_total);
    assert!(free.iter().zip(&raw).all(|(a, b)| a.abs_diff(*b) <= 1));
    // A uniform budget below the window is left for the method to refuse.
    assert_eq!(
        Schedule::Uniform.layer_budgets(Budget::Tokens(16), 3, 4096, 32),
        vec![16; 3]
    );
    // A total too small for every layer's minimum: each gets the minimum.
    assert_eq!(
        s.layer_budgets(Budget::Tokens(20), 6, 4096, 32),
        vec![32; 6]
    );
    // The minimum never exceeds the head.
    assert_eq!(s.layer_budgets(Budget::Tokens(4), 6, 10, 32), vec![10; 6]);
}

#[test]
fn what_a_full_layer_cannot_use_goes_to_the_others() {
    // At half the cache, layer 0's weight (3x the mean) would ask for 1.5x the head.
    let s = Schedule::File(vec![3.0, 1.0, 1.0, 1.0, 0.5, 0.5]);
    let raw: Vec<usize> = (0..6)
        .map(|l| s.layer_budget(Budget::Fraction(0.5), l, 6, 1000))
        .collect();
    assert_eq!(raw[0], 1000);
    assert!(raw.iter().sum::<usize>() < 3000, "{raw:?}");
    let b = s.layer_budgets(Budget::Fraction(0.5), 6, 1000, 0);
    assert_eq!(b.iter().sum::<usize>(), 3000, "{b:?}");
    assert_eq!(b[0], 1000);
    // The others keep their proportions: 2:2:2:1:1 of the remaining 2000 slots.
    assert_eq!(&b[1..], &[500, 500, 500, 250, 250]);
    // A pyramid spends the uniform total too.
    let p = Schedule::Pyramid { beta: 0.5 };
    let pb = p.layer_budgets(Budget::Tokens(100), 30, 4096, 32);
    assert_eq!(pb.iter().sum::<usize>(), 3000);
    assert_eq!((pb[0], pb[29]), (150, 50));
    // A layer whose ratio is 0 still keeps one slot.
    let z = Schedule::parse_ratios("0\n1\n1\n").unwrap();
    let zb = z.layer_budgets(Budget::Tokens(100), 3, 1000, 0);
    assert_eq!(zb, vec![1, 150, 149]);
    // Asking for every slot gives every slot.
    assert_eq!(
        s.layer_budgets(Budget::Fraction(1.0), 6, 1000, 0),
        vec![1000; 6]
    );
}

#[test]
fn methods_report_the_slots_they_always_keep() {
    use kvmerger_compression::{registry, Options};
    let build = |name: &str, pairs: &[&str]| {
        let mut o = Options::new();
        for p in pairs {
            o.parse_pair(p).unwrap();
        }
        registry::build(name, &o).unwrap().min_slots()
    };
    assert_eq!(build("snapkv", &[]), 32);
    assert_eq!(build("pyramidkv", &["window=8"]), 8);
    assert_eq!(build("kvmerger+", &["selector=snapkv", "window=16"]), 16);
    assert_eq!(build("streaming", &["sinks=2"]), 2);
    assert_eq!(build("cam", &[]), 4);
    assert_eq!(build("cam", &["select=h2o"]), 0);
    assert_eq!(build("h2o", &[]), 0);
    assert_eq!(build("kvmerger", &[]), 0);
}

/// Ratios are relative: scaling them all, even to 1e308 where their sum overflows,
/// gives the same budgets (the budget does not silently fall to a few percent).
#[test]
fn huge_ratios_keep_the_same_budget_as_their_relative_values() {
    let text = "1e308\n1e308\n5e307\n1e308\n";
    let huge = Schedule::parse_ratios(text).unwrap();
    let small = Schedule::File(vec![1.0, 1.0, 0.5, 1.0]);
    let total = |s: &Schedule| -> usize {
        (0..4)
            .map(|l| s.layer_budget(Budget::Fraction(0.5), l, 4, 1000))
            .sum()
    };
    for l in 0..4 {
        assert_eq!(
            huge.layer_budget(Budget::Fraction(0.5), l, 4, 1000),
            small.layer_budget(Budget::Fraction(0.5), l, 4, 1000)
        );
    }
    let t = total(&huge);
    assert!(
        (1990..=2010).contains(&t),
        "total {t} of 4 layers at 50% of 1000"
    );
}
