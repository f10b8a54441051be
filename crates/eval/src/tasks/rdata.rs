//! R serialization.
