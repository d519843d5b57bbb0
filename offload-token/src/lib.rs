//! # offload-token
//!
//! ODX-style offload tokens (MS-FSCC STORAGE_OFFLOAD_TOKEN, 512 bytes): minting on offload
//! read, redeeming on offload write, the token registry, and the provider-to-provider transfer
//! over mutual TLS (see DESIGN.md, "Offload tokens").
//!
//! **Status: not implemented yet.** No issue has asked for it so far.
#![warn(missing_docs)]
