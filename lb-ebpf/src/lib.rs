//! Data-plane logic that does not touch maps: parsing and the verdict type. It builds for the
//! host too, so it has ordinary unit tests.
#![cfg_attr(not(test), no_std)]

pub mod parse;
pub mod tunnel;
pub mod verdict;

pub use parse::{Flow, FlowKind, Frame, parse_flow};
pub use verdict::Verdict;
