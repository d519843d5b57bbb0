//! # chain
//!
//! Opens any image with its parents and gives one [`block_io::BlockDevice`]:
//! - [`detect`](fn@detect): the format by content (VHDX signature, VHD footer cookie, else
//!   raw);
//! - [`PathPolicy`]: parent paths from the child's locators, resolved inside the child's
//!   folder tree or configured roots, with Windows separators and drive letters handled;
//! - lineage: a child's recorded parent identity (VHDX `parent_linkage`/`parent_linkage2`
//!   against the parent's DataWriteGuid; VHD parent unique id and timestamp against the
//!   parent's footer) is checked on open; a mismatch is [`ChainError::LineageMismatch`]
//!   unless [`OpenOptions::ignore_lineage`] overrides it;
//! - [`Disk`]: reads fall through the layers sector-exactly, writes go to the top.
//! - image locks shared with QEMU on every layer ([`OpenOptions::lock`]): a writable top
//!   excludes other writers, parents refuse writers while a child is open on them, and
//!   [`block_io::LockMode::Off`] (`-U`, force share) skips them;
//! - [`rebase`](fn@rebase): point a child at another parent, copying what it needs to keep
//!   its content (qemu-img rebase), or at a moved or copied parent (same content, verified)
//!   by rewriting only its parent locator.
//! - [`cor`]: copy-on-read from a remote parent into a local replica, which then becomes
//!   the child's local parent (streaming).
//! - [`remote`]: images on web servers, object stores and NBD exports as the top of a chain,
//!   and remote parents of local children (opt-in: [`OpenOptions::remote_parents`]).
//!
//! ```no_run
//! use chain::{Disk, OpenOptions};
//! use block_io::BlockDevice;
//!
//! let disk = Disk::open("child.vhdx", &OpenOptions::new().read_only(true))?;
//! let mut buf = vec![0u8; 4096];
//! disk.read_at(&mut buf, 0)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod cache;
pub mod cor;
mod detect;
mod disk;
mod error;
mod layer;
#[cfg(feature = "remote")]
mod nbd_parent;
mod policy;
mod rebase;
pub mod remote;

pub use detect::{detect, Format};
pub use disk::{file_key, Disk, LinkCheck, OpenOptions};
pub use error::{braced, ChainError, Tried};
pub use layer::{
    open_layer, open_layer_from_storage, open_layer_with, Expected, Identity, Layer, LayerOptions,
    ParentLink,
};
pub use policy::{Candidate, PathPolicy};
pub use rebase::{parent_paths, rebase, rebase_with_progress, RebaseOptions, RebaseProgress};
pub use remote::RemoteParents;
