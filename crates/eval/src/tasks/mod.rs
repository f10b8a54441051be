//! Sample generators and readers.
