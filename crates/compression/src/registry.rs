//! Method names, one-line descriptions and options, and [`build`].
//!
//! Adding a method: a file in `methods/` and one line in [`METHODS`] (and [`build`]).

use crate::method::{Method, Options};
use crate::methods::{self, OptionDoc};
use crate::Error;

/// A registered method, for `--help` and the README.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub options: &'static [OptionDoc],
}

/// Every method, in the order help text lists them.
pub const METHODS: &[MethodInfo] = &[
    MethodInfo {
        name: "full",
        summary: methods::full::SUMMARY,
        options: methods::full::OPTIONS,
    },
    MethodInfo {
        name: "streaming",
        summary: methods::streaming::SUMMARY,
        options: methods::streaming::OPTIONS,
    },
    MethodInfo {
        name: "h2o",
        summary: methods::h2o::SUMMARY,
        options: methods::h2o::OPTIONS,
    },
    MethodInfo {
        name: "tova",
        summary: methods::tova::SUMMARY,
        options: methods::tova::OPTIONS,
    },
    MethodInfo {
        name: "snapkv",
        summary: methods::snapkv::SUMMARY,
        options: methods::snapkv::OPTIONS,
    },
    MethodInfo {
        name: "pyramidkv",
        summary: methods::pyramidkv::SUMMARY,
        options: methods::pyramidkv::OPTIONS,
    },
    MethodInfo {
        name: "knorm",
        summary: methods::knorm::SUMMARY,
        options: methods::knorm::OPTIONS,
    },
    MethodInfo {
        name: "random",
        summary: methods::random::SUMMARY,
        options: methods::random::OPTIONS,
    },
    MethodInfo {
        name: "cam",
        summary: methods::cam::SUMMARY,
        options: methods::cam::OPTIONS,
    },
    MethodInfo {
        name: "d2o",
        summary: methods::d2o::SUMMARY,
        options: methods::d2o::OPTIONS,
    },
    MethodInfo {
        name: "kvmerger",
        summary: methods::kvmerger::SUMMARY,
        options: methods::kvmerger::OPTIONS,
    },
    MethodInfo {
        name: "kvmerger+",
        summary: methods::kvmerger_plus::SUMMARY,
        options: methods::kvmerger_plus::OPTIONS,
    },
];

const NAMES: &[&str] = &[
    "full",
    "streaming",
    "h2o",
    "tova",
    "snapkv",
    "pyramidkv",
    "knorm",
    "random",
    "cam",
    "d2o",
    "kvmerger",
    "kvmerger+",
];

/// Every method name, in the order of [`METHODS`].
pub fn names() -> &'static [&'static str] {
    NAMES
}

/// The registry entry of `name`.
pub fn info(name: &str) -> Option<&'static MethodInfo> {
    METHODS.iter().find(|m| m.name == name)
}

/// The method `name`, configured by `opts` (unknown keys and invalid values are errors).
pub fn build(name: &str, opts: &Options) -> Result<Box<dyn Method>, Error> {
    use methods::*;
    Ok(match name {
        "full" => Box::new(full::Full::from_options(opts)?),
        "streaming" => Box::new(streaming::Streaming::from_options(opts)?),
        "h2o" => Box::new(h2o::H2o::from_options(opts)?),
        "tova" => Box::new(tova::Tova::from_options(opts)?),
        "snapkv" => Box::new(snapkv::SnapKv::from_options(opts)?),
        "pyramidkv" => Box::new(pyramidkv::PyramidKv::from_options(opts)?),
        "knorm" => Box::new(knorm::KNorm::from_options(opts)?),
        "random" => Box::new(random::Random::from_options(opts)?),
        "cam" => Box::new(cam::Cam::from_options(opts)?),
        "d2o" => Box::new(d2o::D2o::from_options(opts)?),
        "kvmerger" => Box::new(kvmerger::KvMerger::from_options(opts)?),
        "kvmerger+" => Box::new(kvmerger_plus::KvMergerPlus::from_options(opts)?),
        other => return Err(Error::UnknownMethod(other.to_string(), NAMES.join(", "))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_list_every_registered_method_in_order() {
        let from_table: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        assert_eq!(from_table, names());
    }

    #[test]
    fn every_method_builds_with_defaults_and_reports_its_registry_name() {
        for &name in names() {
            let m = build(name, &Options::new()).unwrap();
            assert_eq!(m.name(), name);
        }
    }
}
