//! # chain
//!
//! Opens any image with its parents and gives one `BlockDevice`: format detection by content,
//! parent resolution under a path policy, lineage checks, and the layered disk that reads
//! through a differencing chain and writes to the top (see DESIGN.md, "Chains and lineage").
//!
//! **Status:** format detection ([`detect`]) is here; opening chains is the chain issue's work.
#![warn(missing_docs)]

mod detect;

pub use detect::{detect, Format};
