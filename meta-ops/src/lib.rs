//! # meta-ops
//!
//! Online meta-operations over a live `chain::Disk`: merge, compact, convert, copy, stream,
//! mirror and resize, each a job with progress, pause, resume, cancel and a throttle, running
//! while guest I/O continues (see DESIGN.md, "Online meta-operations").
//!
//! **Status: not implemented yet.** No issue has asked for it so far; the building blocks it
//! will use — `block_io::RangeLock` for guest/job coordination, `block_io::RateLimiter` for the
//! throttle and `BlockDevice::block_status` for skipping holes — live in `block-io`.
#![warn(missing_docs)]
