//! Method names, one-line descriptions and options, and [`build`].
//!
//! Adding a method: a file in `methods/` and one line in [`METHODS`]. A scorer (a
//! method that ranks slots and keeps the best, [`Scorer`]) is registered with
//! `scorer!`, which also makes it available to the composites (`adakv`,
//! `kvmerger+`), which are handed [`build_scorer`] to build the scorer they wrap.

use crate::method::{Method, Options};
use crate::methods::{self, OptionDoc};
use crate::scorer::{Scorer, Selection};
use crate::Error;
use std::sync::OnceLock;

/// How a registered method is built from its options (unknown keys and invalid
/// values are errors).
#[derive(Clone, Copy)]
pub enum Builder {
    Method(fn(&Options) -> Result<Box<dyn Method>, Error>),
    Scorer(fn(&Options) -> Result<Box<dyn Scorer>, Error>),
    /// A method that wraps a scorer, which it builds through the factory it is given.
    Composite(CompositeBuilder),
}

/// Builds a composite from its options and a factory for the scorer it wraps.
pub type CompositeBuilder =
    fn(&Options, methods::ScorerFactory<'_>) -> Result<Box<dyn Method>, Error>;

/// A registered method, for `--help`, the README and [`build`].
#[derive(Clone, Copy)]
pub struct MethodInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub options: &'static [OptionDoc],
    pub build: Builder,
}

impl MethodInfo {
    /// Whether this method ranks slots (usable as `adakv`'s scorer or `kvmerger+`'s
    /// selector).
    pub fn is_scorer(&self) -> bool {
        matches!(self.build, Builder::Scorer(_))
    }
}

macro_rules! method {
    ($name:literal, $module:ident, $ty:ty) => {
        MethodInfo {
            name: $name,
            summary: methods::$module::SUMMARY,
            options: methods::$module::OPTIONS,
            build: Builder::Method(|o| Ok(Box::new(<$ty>::from_options(o)?))),
        }
    };
}

macro_rules! scorer {
    ($name:literal, $module:ident, $ty:ty) => {
        MethodInfo {
            name: $name,
            summary: methods::$module::SUMMARY,
            options: methods::$module::OPTIONS,
            build: Builder::Scorer(|o| Ok(Box::new(<$ty>::from_options(o)?))),
        }
    };
}

macro_rules! composite {
    ($name:literal, $module:ident, $ty:ty) => {
        MethodInfo {
            name: $name,
            summary: methods::$module::SUMMARY,
            options: methods::$module::OPTIONS,
            build: Builder::Composite(|o, make| Ok(Box::new(<$ty>::from_options(o, make)?))),
        }
    };
}

/// Every method, in the order help text lists them.
pub const METHODS: &[MethodInfo] = &[
    method!("full", full, methods::full::Full),
    method!("streaming", streaming, methods::streaming::Streaming),
    scorer!("h2o", h2o, methods::h2o::H2o),
    scorer!("tova", tova, methods::tova::Tova),
    scorer!("snapkv", snapkv, methods::snapkv::SnapKv),
    method!("pyramidkv", pyramidkv, methods::pyramidkv::PyramidKv),
    scorer!("knorm", knorm, methods::knorm::KNorm),
    method!("random", random, methods::random::Random),
    method!("cam", cam, methods::cam::Cam),
    method!("d2o", d2o, methods::d2o::D2o),
    scorer!("keydiff", keydiff, methods::keydiff::KeyDiff),
    scorer!(
        "expected_attention",
        expected_attention,
        methods::expected_attention::ExpectedAttention
    ),
    scorer!("kvzip", kvzip, methods::kvzip::KvZip),
    scorer!("kvzap", kvzap, methods::kvzap::KvZap),
    composite!("adakv", adakv, methods::adakv::AdaKv),
    method!("kvmerger", kvmerger, methods::kvmerger::KvMerger),
    composite!(
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

fn unknown(name: &str) -> Error {
    Error::UnknownMethod(name.to_string(), names().join(", "))
}

/// The method `name`, configured by `opts` (unknown keys and invalid values are errors).
pub fn build(name: &str, opts: &Options) -> Result<Box<dyn Method>, Error> {
    match info(name).map(|m| m.build) {
        Some(Builder::Method(b)) => b(opts),
        Some(Builder::Scorer(b)) => Ok(Box::new(Selection(b(opts)?))),
        Some(Builder::Composite(b)) => b(opts, &build_scorer),
        None => Err(unknown(name)),
    }
}

/// The scorer `name`, configured by `opts`; an error naming the scorers when `name`
/// is a method that does not rank slots.
pub fn build_scorer(name: &str, opts: &Options) -> Result<Box<dyn Scorer>, Error> {
    match info(name).map(|m| m.build) {
        Some(Builder::Scorer(b)) => b(opts),
        Some(_) => Err(Error::InvalidOption(format!(
            "'{name}' does not score slots (scorers: {})",
            scorers().join(", ")
        ))),
        None => Err(unknown(name)),
    }
}

/// The names of the methods that score slots.
pub fn scorers() -> &'static [&'static str] {
    static SCORERS: OnceLock<Vec<&'static str>> = OnceLock::new();
    SCORERS.get_or_init(|| {
        METHODS
            .iter()
            .filter(|m| m.is_scorer())
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
            "kvzap",
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
