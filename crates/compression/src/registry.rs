//! Method names, one-line descriptions and options, and [`build`].
//!
//! Adding a method: a file in `methods/` and one line in [`METHODS`].

use crate::method::{HeadInput, HeadPos, HeadStats, Method, Options};
use crate::methods::{self, OptionDoc};
use crate::store::{HeadData, SlotMeta};
use crate::Error;
use std::sync::OnceLock;

/// Builds a method from its options (unknown keys and invalid values are errors).
pub type Builder = fn(&Options) -> Result<Box<dyn Method>, Error>;

/// A registered method, for `--help`, the README and [`build`].
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub options: &'static [OptionDoc],
    pub build: Builder,
}

macro_rules! method {
    ($name:literal, $module:ident, $ty:ty) => {
        MethodInfo {
            name: $name,
            summary: methods::$module::SUMMARY,
            options: methods::$module::OPTIONS,
            build: |o| Ok(Box::new(<$ty>::from_options(o)?)),
        }
    };
}

/// Every method, in the order help text lists them.
pub const METHODS: &[MethodInfo] = &[
    method!("full", full, methods::full::Full),
    method!("streaming", streaming, methods::streaming::Streaming),
    method!("h2o", h2o, methods::h2o::H2o),
    method!("tova", tova, methods::tova::Tova),
    method!("snapkv", snapkv, methods::snapkv::SnapKv),
    method!("pyramidkv", pyramidkv, methods::pyramidkv::PyramidKv),
    method!("knorm", knorm, methods::knorm::KNorm),
    method!("random", random, methods::random::Random),
    method!("cam", cam, methods::cam::Cam),
    method!("d2o", d2o, methods::d2o::D2o),
    method!("keydiff", keydiff, methods::keydiff::KeyDiff),
    method!(
        "expected_attention",
        expected_attention,
        methods::expected_attention::ExpectedAttention
    ),
    method!("kvzip", kvzip, methods::kvzip::KvZip),
    method!("adakv", adakv, methods::adakv::AdaKv),
    method!("kvmerger", kvmerger, methods::kvmerger::KvMerger),
    method!(
        "kvmerger+",
        kvmerger_plus,
        methods::kvmerger_plus::KvMergerPlus
    ),
];

/// Every method name, in the order of [`METHODS`].
pub fn names() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| METHODS.iter().map(|m| m.name).collect())
}

/// The registry entry of `name`.
pub fn info(name: &str) -> Option<&'static MethodInfo> {
    METHODS.iter().find(|m| m.name == name)
}

/// The method `name`, configured by `opts` (unknown keys and invalid values are errors).
pub fn build(name: &str, opts: &Options) -> Result<Box<dyn Method>, Error> {
    match info(name) {
        Some(m) => (m.build)(opts),
        None => Err(Error::UnknownMethod(name.to_string(), names().join(", "))),
    }
}

/// Whether `method` scores slots (so that head-wise allocation can use it).
pub fn is_scorer(method: &dyn Method) -> bool {
    let mut data = HeadData::new(1);
    data.push(&[1.0], &[1.0], SlotMeta::token(0));
    let input = HeadInput {
        data: &data,
        stats: &HeadStats::default(),
        pos: HeadPos {
            layer: 0,
            n_layers: 1,
            kv_head: 0,
            n_kv_heads: 1,
        },
        budget: 1,
    };
    method.scores(&input).is_some()
}

/// The names of the methods that score slots with their default options.
pub fn scorers() -> &'static [&'static str] {
    static SCORERS: OnceLock<Vec<&'static str>> = OnceLock::new();
    SCORERS.get_or_init(|| {
        METHODS
            .iter()
            .filter(|m| {
                (m.build)(&Options::new())
                    .map(|b| is_scorer(b.as_ref()))
                    .unwrap_or(false)
            })
            .map(|m| m.name)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_list_every_registered_method_in_order_once() {
        let from_table: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        assert_eq!(from_table, names());
        let mut sorted = from_table.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), from_table.len());
    }

    #[test]
    fn every_method_builds_with_defaults_and_reports_its_registry_name() {
        for &name in names() {
            let m = build(name, &Options::new()).unwrap();
            assert_eq!(m.name(), name);
        }
    }

    #[test]
    fn the_scorers_are_the_top_k_methods() {
        let s = scorers();
        for name in [
            "snapkv",
            "h2o",
            "tova",
            "knorm",
            "keydiff",
            "expected_attention",
            "kvzip",
        ] {
            assert!(s.contains(&name), "{name} should score slots: {s:?}");
        }
        for name in [
            "full",
            "kvmerger",
            "kvmerger+",
            "adakv",
            "cam",
            "d2o",
            "streaming",
        ] {
            assert!(!s.contains(&name), "{name} is not a scorer");
        }
    }
}
