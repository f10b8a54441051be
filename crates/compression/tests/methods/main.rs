//! Specifications of the compression methods, run against the public API.

mod baselines;
mod data;
mod kvmerger;
mod options;
mod properties;
mod schedule;
