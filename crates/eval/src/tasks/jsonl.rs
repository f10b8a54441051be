//! LongBench and ZeroSCROLLS JSONL readers.
use std::path::Path;

use super::Error;
use crate::sample::Sample;

/// One line that could not be read.
#[derive(Clone, Debug, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// The samples of a file and the lines that could not be read.
#[derive(Clone, Debug, Default)]
pub struct JsonlSamples {
    pub samples: Vec<Sample>,
    pub errors: Vec<LineError>,
}

pub fn read_longbench(_path: &Path, _dataset: Option<&str>) -> Result<JsonlSamples, Error> {
    todo!()
}

pub fn read_zeroscrolls(_path: &Path, _dataset: Option<&str>) -> Result<JsonlSamples, Error> {
    todo!()
}
