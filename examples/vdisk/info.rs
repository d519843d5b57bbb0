//! `vdisk info`: what an image is, with `--backing-chain` every layer, its ids, and whether
//! each link verifies. A differencing image whose parent is absent still gives its own facts.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use vdisk::block_io::{FileStorage, Storage};
use vdisk::chain::{self, braced, Expected, Format, Identity};
use vdisk::{vhd_format, vhdx_format};

use crate::image::{chain_options, parse_format};
use crate::{CliError, CliResult};

/// The facts of one image file as JSON (never opens a parent).
pub fn facts(path: &Path, format: Option<Format>) -> Result<Value, CliError> {
    if crate::remote::is_url(path) {
        return crate::remote::facts(path, format);
    }
    let mut s = FileStorage::open(path, &crate::image::file_options(true))?;
    let file_size = s.len()?;
    let format = match format {
        Some(f) => f,
        None => chain::detect(&s)?,
    };
    crate::image::refuse_writers_if_format(&mut s, format)?;
    let mut v = json!({
        "filename": path.display().to_string(),
        "format": format.name(),
        "file_size": file_size,
        "actual_size": actual_size(path),
    });
    let extra = match format {
        Format::Raw => json!({
            "subformat": "raw",
            "virtual_size": file_size,
            "logical_sector_size": 512,
            "physical_sector_size": 512,
        }),
        Format::Vhd => vhd_facts(&vhd_format::read_details(s)?),
        Format::Vhdx => vhdx_facts(
            &vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(true))?
                .details(),
        ),
    };
    merge(&mut v, extra);
    Ok(v)
}

pub fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

pub fn vhd_facts(d: &vhd_format::VhdDetails) -> Value {
    let locators: Vec<Value> = d
        .locators
        .iter()
        .map(|l| json!({ "platform": l.platform_code, "path": l.path }))
        .collect();
    json!({
        "subformat": d.subformat(),
        "virtual_size": d.virtual_size,
        "original_size": d.original_size,
        "logical_sector_size": 512,
        "physical_sector_size": 512,
        "chs": {
            "cylinders": d.geometry.cylinders,
            "heads": d.geometry.heads,
            "sectors_per_track": d.geometry.sectors_per_track,
            "size": d.chs_size,
        },
        "creator": {
            "app": d.creator_app,
            "version": format!("{}.{}", d.creator_version.0, d.creator_version.1),
            "os": d.creator_os,
        },
        "unique_id": braced(&d.unique_id),
        "timestamp": d.timestamp,
        "timestamp_unix": vhd_format::VhdDetails::unix_time(d.timestamp),
        "saved_state": d.saved_state,
        "footer_source": format!("{:?}", d.footer_source),
        "end_footer_error": d.end_footer_error,
        "block_size": d.block_size,
        "max_table_entries": d.max_table_entries,
        "allocated_blocks": d.allocated_blocks,
        "azure_compatible": d.is_azure_compatible(),
        "parent_name": d.parent_name,
        "parent_id": d.parent_unique_id.map(|u| braced(&u)),
        "parent_timestamp": d.parent_timestamp,
        "parent_locators": locators,
    })
}

pub fn vhdx_facts(d: &vhdx_format::VhdxDetails) -> Value {
    let locator: Vec<Value> = d
        .parent_locator
        .iter()
        .map(|(k, v)| json!({ "key": k, "value": v }))
        .collect();
    json!({
        "subformat": d.subformat.as_str(),
        "virtual_size": d.virtual_size,
        "block_size": d.block_size,
        "logical_sector_size": d.logical_sector_size,
        "physical_sector_size": d.physical_sector_size,
        "disk_id": braced(&d.disk_id),
        "data_write_guid": braced(&d.data_write_guid),
        "file_write_guid": braced(&d.file_write_guid),
        "log_dirty": d.log_dirty,
        "log_size": d.log_size,
        "creator": d.creator,
        "parent_locator": locator,
    })
}

/// One layer of `--backing-chain` output: its facts, plus the link to its parent.
fn walk_chain(path: &Path, format: Option<Format>) -> Result<Vec<Value>, CliError> {
    let opts = chain_options(None, true)?;
    let mut out = Vec::new();
    let mut cur: PathBuf = path.to_path_buf();
    let mut fmt = format;
    let mut seen = std::collections::HashSet::new();
    loop {
        let mut v = facts(&cur, fmt)?;
        let layer = open_top(&cur, fmt)?;
        merge(&mut v, json!({ "identity": layer.identity.to_string() }));
        let canon = std::fs::canonicalize(&cur).unwrap_or_else(|_| cur.clone());
        if !seen.insert(canon) || out.len() >= opts.max_depth {
            merge(
                &mut v,
                json!({ "link": { "error": "the chain loops or is too deep" } }),
            );
            out.push(v);
            break;
        }
        let Some(link) = layer.parent.clone() else {
            out.push(v);
            break;
        };
        let mut l = json!({ "expected": link.expected.to_string() });
        let url = link
            .candidates
            .iter()
            .find(|c| chain::remote::is_url(&c.path));
        let resolved = match url {
            Some(c) => Ok(PathBuf::from(&c.path)),
            None => opts.policy.resolve(&cur, &link.candidates),
        };
        let parent = match resolved {
            Ok(parent) => parent,
            Err(tried) => {
                let t: Vec<String> = tried.iter().map(|t| t.to_string()).collect();
                merge(
                    &mut l,
                    json!({ "verified": false, "error": "parent not found", "tried": t }),
                );
                merge(&mut v, json!({ "link": l }));
                out.push(v);
                break;
            }
        };
        let p = match parent.to_str().filter(|s| chain::remote::is_nbd_url(s)) {
            // An NBD export has the identity it advertises, or its fingerprint.
            Some(_) => crate::remote::nbd_parent_layer(&cur, &parent, layer.format)?,
            None => open_top(&parent, None)?,
        };
        let ok = link.expected.matches(&p.identity);
        merge(
            &mut l,
            json!({
                "parent": parent.display().to_string(),
                "found": p.identity.to_string(),
                "verified": ok,
            }),
        );
        if !ok {
            merge(
                &mut l,
                json!({ "error": lineage_hint(&link.expected, &p.identity) }),
            );
        }
        merge(&mut v, json!({ "link": l }));
        out.push(v);
        cur = parent;
        fmt = None;
    }
    Ok(out)
}

fn lineage_hint(e: &Expected, found: &Identity) -> String {
    format!("possible corruption: the child expects {e} but the parent has {found}")
}

pub fn run(path: &Path, format: Option<&str>, json: bool, backing_chain: bool) -> CliResult {
    let format = format.map(parse_format).transpose()?;
    let layers = if backing_chain {
        walk_chain(path, format)?
    } else {
        vec![facts(path, format)?]
    };
    if json {
        let v = if backing_chain {
            Value::Array(layers)
        } else {
            layers.into_iter().next().unwrap_or(Value::Null)
        };
        println!("{}", crate::cmds::pretty(&v));
        return Ok(0);
    }
    for (i, v) in layers.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_human(v, "");
    }
    Ok(0)
}

fn print_human(v: &Value, indent: &str) {
    let Value::Object(m) = v else { return };
    for (k, val) in m {
        match val {
            Value::Null => {}
            Value::Object(_) => {
                println!("{indent}{k}:");
                print_human(val, &format!("{indent}    "));
            }
            Value::Array(a) if a.is_empty() => {}
            Value::Array(a) => {
                println!("{indent}{k}:");
                for item in a {
                    match item {
                        Value::Object(_) => {
                            print_human(item, &format!("{indent}  - "));
                        }
                        other => println!("{indent}  - {}", plain(other)),
                    }
                }
            }
            other => println!("{indent}{k}: {}", plain(other)),
        }
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Bytes the file occupies on disk (holes excluded); 0 when it cannot be stat'ed.
pub fn actual_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Opens one layer read-only as `info` looks at it (locks per `-U`; a VHD/VHDX refuses
/// writers while it looks, a raw file does not).
fn open_top(path: &Path, format: Option<Format>) -> Result<chain::Layer, CliError> {
    if let Some(url) = path.to_str().filter(|s| chain::remote::is_object_url(s)) {
        return Ok(chain::remote::open_object_layer(url, format)?);
    }
    if crate::remote::is_url(path) {
        return crate::remote::nbd_layer(path);
    }
    Ok(chain::open_layer_with(
        path,
        format,
        &chain::LayerOptions {
            read_only: true,
            lock: crate::image::lock_mode(),
            ..Default::default()
        },
    )?)
}
