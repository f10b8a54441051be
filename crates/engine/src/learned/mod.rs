//! KVzap's learned scorer: the scorer itself (applied inside the forward pass) lives in
//! `kvmerger-models`; [`train`] fits it to KVzip's scores over sequences this crate runs.

pub use kvmerger_models::learned::*;

pub mod train;
