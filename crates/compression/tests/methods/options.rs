//! Errors: unknown methods and options, invalid values, windows that do not fit, missing statistics.

use crate::data::{head, mid, options as opts};
use kvmerger_compression::{registry, Error, HeadInput, HeadStats, Options};

/// Option pairs as written in a test table.
type Pairs = &'static [(&'static str, &'static str)];

#[test]
fn an_unknown_method_is_an_error_that_lists_the_known_ones() {
    match registry::build("h3o", &Options::new()) {
        Err(e @ Error::UnknownMethod(..)) => {
            let msg = e.to_string();
            assert!(registry::names().iter().all(|n| msg.contains(n)), "{msg}");
        }
        other => panic!(
            "expected UnknownMethod, got {:?}",
            other.map(|m| m.name().to_string())
        ),
    }
}

#[test]
fn every_method_rejects_an_unknown_option() {
    for &name in registry::names() {
        let err = registry::build(name, &opts(&[("bogus", "1")]))
            .err()
            .expect(name);
        assert!(err.to_string().contains("bogus"), "{name}: {err}");
    }
}

#[test]
fn every_documented_default_is_accepted_as_a_value() {
    for info in registry::METHODS {
        for o in info.options {
            // Options that apply only beside another choice.
            let context: &[(&str, &str)] = match (info.name, o.key) {
                ("cam", "recent") => &[("select", "h2o")],
                ("kvmerger", "window") => &[("score", "window")],
                _ => &[],
            };
            if o.default != "auto" {
                registry::build(info.name, &opts(&[context, &[(o.key, o.default)]].concat()))
                    .unwrap_or_else(|e| panic!("{} {}={}: {e}", info.name, o.key, o.default));
            }
        }
    }
}

#[test]
fn invalid_values_are_errors() {
    let bad: &[(&str, Pairs)] = &[
        ("streaming", &[("sinks", "-1")]),
        ("streaming", &[("sinks", "four")]),
        ("h2o", &[("recent", "1.5")]),
        ("h2o", &[("recent", "nan")]),
        ("snapkv", &[("pool", "median")]),
        ("snapkv", &[("kernel", "4")]),
        ("snapkv", &[("window", "0.5")]),
        ("pyramidkv", &[("beta", "2")]),
        ("pyramidkv", &[("floor", "-0.1")]),
        ("knorm", &[("recent", "-1")]),
        ("random", &[("seed", "x")]),
        ("cam", &[("select", "tova")]),
        ("cam", &[("mode", "random")]),
        ("cam", &[("m", "0")]),
        ("cam", &[("select", "h2o"), ("sinks", "4")]),
        ("cam", &[("recent", "0.5")]),
        ("d2o", &[("ema", "1.1")]),
        ("kvmerger", &[("epsilon", "1.5")]),
        ("kvmerger", &[("chain", "middle")]),
        ("kvmerger", &[("sigma", "-1")]),
        ("kvmerger", &[("sigma", "median")]),
        ("kvmerger", &[("mass", "log")]),
        ("kvmerger", &[("mode", "fast")]),
        ("kvmerger", &[("skip_layers", "0,x")]),
        ("kvmerger", &[("score", "last")]),
        ("kvmerger", &[("window", "16")]),
        ("kvmerger", &[("recent", "2")]),
        ("kvmerger", &[("heavy", "-0.1")]),
        ("kvmerger+", &[("damp", "2")]),
        ("kvmerger+", &[("cap", "-1")]),
        ("kvmerger+", &[("selector", "kvmerger")]),
        ("kvmerger+", &[("selector", "adakv")]),
        ("kvmerger+", &[("merge", "keys")]),
        ("kvmerger+", &[("scope", "everything")]),
        ("kvmerger+", &[("epsilon", "-3")]),
    ];
    for (name, pairs) in bad {
        assert!(
            registry::build(name, &opts(pairs)).is_err(),
            "{name} {pairs:?} was accepted"
        );
    }
}

#[test]
fn windows_larger_than_the_budget_are_errors() {
    let h = head(100, 4, 0);
    let cases: &[(&str, Pairs, usize)] = &[
        ("streaming", &[("sinks", "8")], 7),
        ("snapkv", &[], 31),
        ("pyramidkv", &[("window", "16")], 10),
        ("cam", &[("sinks", "8")], 5),
        ("kvmerger", &[("recent", "0.3"), ("heavy", "0.3")], 50),
        (
            "kvmerger",
            &[("recent", "0.3"), ("heavy", "0.3"), ("mode", "paper")],
            50,
        ),
        ("kvmerger+", &[("selector", "snapkv"), ("window", "16")], 15),
        ("kvmerger+", &[("sinks", "16")], 15),
        ("kvmerger+", &[("selector", "keydiff"), ("sinks", "16")], 15),
        ("keydiff", &[("sinks", "8")], 7),
        ("expected_attention", &[("sinks", "8")], 7),
        ("kvzip", &[("sinks", "8")], 7),
        ("kvzap", &[("sinks", "8")], 7),
        ("adakv", &[("scorer", "snapkv"), ("window", "16")], 15),
    ];
    for (name, pairs, budget) in cases {
        let m = registry::build(name, &opts(pairs)).unwrap();
        let err = m.compress(h.input(*budget, mid())).err();
        assert!(
            matches!(err, Some(Error::Invalid(_))),
            "{name} {pairs:?} at budget {budget}: {err:?}"
        );
    }
    // A window equal to the budget is fine.
    let m = registry::build("snapkv", &opts(&[("window", "8")])).unwrap();
    assert_eq!(m.compress(h.input(8, mid())).unwrap().len(), 8);
}

#[test]
fn a_missing_statistic_is_named_in_the_error() {
    let h = head(50, 4, 0);
    let empty = HeadStats::default();
    for &name in registry::names() {
        let m = registry::build(name, &Options::new()).unwrap();
        let input = HeadInput {
            data: &h.data,
            stats: &empty,
            pos: mid(),
            budget: 40,
        };
        match m.compress(input) {
            Err(Error::MissingStats { method, .. }) => {
                assert!(
                    m.needs().any(),
                    "{name} needs nothing yet missed a statistic"
                );
                assert_eq!(method, name);
            }
            Ok(_) => assert!(!m.needs().any(), "{name} declared needs it did not use"),
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

#[test]
fn a_statistic_of_the_wrong_length_is_an_error() {
    let h = head(50, 4, 0);
    let short = HeadStats {
        accumulated: Some(vec![1.0; 49]),
        window: Some(vec![1.0; 49]),
        last: Some(vec![1.0; 49]),
        // Query statistics of another head dimension.
        queries: Some(vec![kvmerger_compression::QueryMoments {
            mean: vec![0.0; 3],
            cov: vec![0.0; 9],
            scale: 1.0,
        }]),
        reconstruction: Some(vec![1.0; 49]),
        learned: Some(vec![1.0; 49]),
    };
    for &name in registry::names() {
        let m = registry::build(name, &Options::new()).unwrap();
        if m.needs().any() {
            let input = HeadInput {
                data: &h.data,
                stats: &short,
                pos: mid(),
                budget: 40,
            };
            assert!(
                matches!(m.compress(input), Err(Error::Invalid(_))),
                "{name}"
            );
        }
    }
}

#[test]
fn skip_layers_outside_any_model_or_outside_this_one_are_refused() {
    for bad in ["100000", "-5000", "x"] {
        assert!(
            registry::build("kvmerger", &opts(&[("skip_layers", bad)])).is_err(),
            "{bad}"
        );
    }
    let m = registry::build("kvmerger", &opts(&[("skip_layers", "0,100")])).unwrap();
    let e = m.check_layers(24).unwrap_err().to_string();
    assert!(e.contains("layer 100") && e.contains("24 layers"), "{e}");
    let m = registry::build("kvmerger", &opts(&[("skip_layers", "-100")])).unwrap();
    assert!(m.check_layers(24).is_err());
    assert!(m.check_layers(128).is_ok());
}
