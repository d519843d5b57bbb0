//! `vdisk split IMG --layers N [--hot-list FILE] [-O vhdx|vhd] [--prefix OUT]`: cut a base
//! image (raw, VHD, VHDX, or a chain's top, read flattened) into a chain of N differencing
//! layers, `OUT-0` (the bottom, a dynamic image) to `OUT-{N-1}` (the top), the blocks a boot
//! reads first in the bottom layers ([`meta_ops::split`]). Each data block is in exactly one
//! layer; the chain opened from its top reads as IMG.
//!
//! The hot list is a text file of recorded accesses, one `OFFSET LENGTH` or `OFFSET+LENGTH`
//! per line in bytes (decimal or 0x hex; `#` comments), or the output of `vdisk map --output
//! json` (its data runs of the top layer). Without one the first blocks go to the bottom.

use std::path::PathBuf;

use serde_json::json;
use vdisk::meta_ops::split::{read_hot_list, SplitFormat, SplitOptions, SplitProgress};

use crate::{CliError, CliResult};

/// `vdisk split` arguments.
#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    /// How many layers to write.
    #[arg(long)]
    pub layers: usize,
    /// Recorded accesses whose blocks go to the bottom layers first.
    #[arg(long)]
    pub hot_list: Option<PathBuf>,
    /// Format of the layers: vhdx or vhd.
    #[arg(short = 'O', default_value = "vhdx")]
    pub out_format: String,
    /// Layer k is written to PREFIX-k.vhdx (default: IMG without its extension, plus -split).
    #[arg(long)]
    pub prefix: Option<PathBuf>,
    /// Bytes of data in the bottom layer (K/M/G suffixes; default: equal shares).
    #[arg(long)]
    pub first_layer: Option<String>,
    /// Block size of the split and of every layer (1M to 256M, a power of two; default 2M).
    #[arg(long)]
    pub block_size: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The image to split.
    pub image: PathBuf,
}

/// Runs the verb.
pub fn run(a: SplitArgs) -> CliResult {
    let format = match a.out_format.as_str() {
        "vhdx" => SplitFormat::Vhdx,
        "vhd" | "vpc" => SplitFormat::Vhd,
        other => {
            return Err(CliError::new(format!(
                "split writes vhdx or vhd layers, not {other}"
            )))
        }
    };
    let prefix = a.prefix.clone().unwrap_or_else(|| {
        let mut p = a.image.with_extension("").into_os_string();
        p.push("-split");
        PathBuf::from(p)
    });
    let mut o = SplitOptions::new(a.layers, prefix);
    o.format = format;
    o.lock = crate::image::lock_mode();
    if let Some(f) = &a.first_layer {
        o.first_layer = Some(crate::size::parse_size(f)?);
    }
    if let Some(b) = &a.block_size {
        let b = crate::size::parse_size(b)?;
        o.block_size =
            u32::try_from(b).map_err(|_| CliError::new(format!("block size {b} is too large")))?;
    }
    if let Some(h) = &a.hot_list {
        o.hot = read_hot_list(h).map_err(|e| CliError::new(crate::cause_chain(&e)))?;
    }
    let bar = a.progress.then(|| crate::cmds::progress_bar(0));
    if let Some(b) = &bar {
        let b = b.clone();
        o.progress = Some(std::sync::Arc::new(move |p: &SplitProgress| {
            b.set_length(p.total_bytes);
            b.set_position(p.done_bytes);
            b.set_message(format!("layer {}/{}", p.layer + 1, p.layers));
        }));
    }
    let r = vdisk::meta_ops::split(&a.image, &o);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = r.map_err(|e| CliError::new(crate::cause_chain(&e)))?;
    if a.json {
        let layers: Vec<_> = r
            .layers
            .iter()
            .map(|l| {
                json!({
                    "path": l.path.display().to_string(),
                    "blocks": l.blocks,
                    "data_bytes": l.data_bytes,
                    "hot_blocks": l.hot_blocks,
                })
            })
            .collect();
        let v = json!({
            "virtual_size": r.virtual_size,
            "block_size": r.block_size,
            "data_blocks": r.data_blocks,
            "hot_blocks": r.hot_blocks,
            "data_bytes": r.data_bytes,
            "layers": layers,
        });
        println!("{v}");
    } else {
        println!(
            "Split {} ({} data blocks of {} bytes, {} hot) into {} layers:",
            a.image.display(),
            r.data_blocks,
            r.block_size,
            r.hot_blocks,
            r.layers.len()
        );
        for (k, l) in r.layers.iter().enumerate() {
            println!(
                "  {k}: {} ({} blocks, {} data bytes, {} hot)",
                l.path.display(),
                l.blocks,
                l.data_bytes,
                l.hot_blocks
            );
        }
    }
    Ok(0)
}
