//! `vdisk token read|write|inspect`: ODX-style offload tokens on local images (the
//! `offload-token` crate's provider, one process per command).
//!
//! ```text
//! vdisk token read IMG OFF LEN [--ttl MS] [--out FILE]    mint (FSCTL_OFFLOAD_READ)
//! vdisk token write IMG OFF LEN --token FILE [--token-offset N]   redeem (FSCTL_OFFLOAD_WRITE)
//! vdisk token inspect FILE                                  decode and verify the seal
//! ```
//!
//! `read` writes the 512-byte token to FILE (mode 0600), or as hex on stdout with the
//! transfer length and flags on stderr. It may cover less than asked: at most 256 MiB, not
//! past the end of the disk, and not past the end of the data when the rest reads as zeros
//! (flag ALL_ZERO_BEYOND_CURRENT_RANGE); a zero range gets the zero-data token. `write`
//! reads the token from FILE (raw or hex, `-` for stdin), opens the source image the token
//! names, and loops over short writes (16 MiB per call) until LEN bytes are written.
//! Offsets and lengths take K/M/G/T suffixes and must be whole logical sectors.
//!
//! The key file (`--key-file`, else `$VDISK_TOKEN_KEY`, else
//! `$XDG_CONFIG_HOME/vdisk/token.key` or `~/.config/vdisk/token.key`) holds this provider's
//! id and HMAC keys. `read` creates it (mode 0600, random key) if it is missing, once the
//! token is minted (a `read` that fails leaves none behind); `write` and `inspect` need it.
//! Anyone who can read it can mint and redeem tokens: keep it private. Tokens are minted
//! for the calling user (uid) alone; the operating system's file permissions decide which
//! images that user may read and write.
//!
//! Immutability across processes: no registry outlives one command, so a token records the
//! source image's path and a stamp of its files (for every layer of its chain: device,
//! inode, size, mtime and ctime, the format's identity such as the VHDX DataWriteGuid, and
//! the virtual size). `write` refuses the token if the stamp differs (the source was
//! written, replaced or resized since the mint), and fails afterwards if the source changed
//! during the copy. Limits: ctime is as fine as the kernel's coarse clock, so `read` waits
//! until the newest ctime is 100 ms old before stamping; writes through a shared mapping,
//! a clock set backwards or a block device (no ctime) can escape the stamp; a write that
//! restores identical bytes still refuses the token. Within one `write` command, its own
//! writes overlapping the token's source range (same image) invalidate the token exactly.
//! Such tokens cannot be revoked except by retiring their key; inactivity counts from the
//! mint.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vdisk::block_io::BlockDevice;
use vdisk::offload_token::{
    self as ot, AllowAll, FileState, KeyFile, Opened, Principal, Provider, ReadRequest,
    StampBuilder, Token, TokenBody, TrackedDisk, ALL_ZERO_BEYOND_CURRENT_RANGE,
};

use crate::image::{self, Image};
use crate::size::parse_size;
use crate::{CliError, CliResult};

/// Margin `read` waits for the source's newest ctime to age (see the module docs).
const SETTLE: Duration = Duration::from_millis(100);

/// `vdisk token`: offload tokens on local images.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Provider key file (default: $VDISK_TOKEN_KEY, else ~/.config/vdisk/token.key;
    /// `read` creates it, mode 0600, if missing).
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: TokenCmd,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCmd {
    /// Mint a token over IMG's bytes [OFF, OFF+LEN) (offload read; it may cover less).
    Read {
        /// Source image.
        image: PathBuf,
        /// Offset in bytes (whole sectors; K/M/G/T suffixes).
        offset: String,
        /// Length in bytes (whole sectors; K/M/G/T suffixes).
        length: String,
        /// Inactivity time-to-live in milliseconds (0 or absent: 30 s; at most 10 min).
        #[arg(long, value_name = "MS")]
        ttl: Option<u64>,
        /// Write the 512-byte token here (mode 0600) instead of hex on stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Redeem a token into IMG's bytes [OFF, OFF+LEN) (offload write, looping over short
    /// writes).
    Write {
        /// Destination image.
        image: PathBuf,
        /// Offset in bytes (whole sectors; K/M/G/T suffixes).
        offset: String,
        /// Length in bytes (whole sectors; K/M/G/T suffixes).
        length: String,
        /// The token: a 512-byte file or its hex, `-` for stdin.
        #[arg(long, value_name = "FILE")]
        token: PathBuf,
        /// Where in the token's range to start (bytes, whole sectors).
        #[arg(long, value_name = "N", default_value = "0")]
        token_offset: String,
    },
    /// Decode a token's envelope and body and verify its seal with the key file.
    Inspect {
        /// The token: a 512-byte file or its hex, `-` for stdin.
        token: PathBuf,
    },
}

/// Runs a `vdisk token` verb.
pub fn run(args: TokenArgs) -> CliResult {
    let key_path = match args.key_file {
        Some(p) => p,
        None => KeyFile::default_path().map_err(|e| err(&e))?,
    };
    match args.cmd {
        TokenCmd::Read {
            image,
            offset,
            length,
            ttl,
            out,
        } => read(
            &key_path,
            &image,
            parse_size(&offset)?,
            parse_size(&length)?,
            ttl,
            out.as_deref(),
        ),
        TokenCmd::Write {
            image,
            offset,
            length,
            token,
            token_offset,
        } => write(
            &key_path,
            &image,
            parse_size(&offset)?,
            parse_size(&length)?,
            &token,
            parse_size(&token_offset)?,
        ),
        TokenCmd::Inspect { token } => inspect(&key_path, &token),
    }
}

fn err(e: &(dyn std::error::Error + 'static)) -> CliError {
    CliError::new(crate::cause_chain(e))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CliError {
    CliError::new(format!("cannot {what} {}: {e}", path.display()))
}

/// The calling user, by uid (the key file is per user, so this names whose tokens they are).
fn local_principal() -> Principal {
    match std::fs::metadata("/proc/self") {
        Ok(m) => Principal::new(format!("uid:{}", m.uid())),
        Err(_) => Principal::new("local"),
    }
}

fn provider(kf: &KeyFile) -> Provider {
    Provider::new(kf.provider, kf.keys.clone(), Arc::new(AllowAll))
}

/// A disk id stable across processes: the image file's device and inode.
fn disk_id(st: &FileState) -> uuid::Uuid {
    let stamp = StampBuilder::new()
        .bytes("cli disk id", &st.dev.to_be_bytes())
        .bytes("inode", &st.ino.to_be_bytes())
        .finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&stamp[..16]);
    uuid::Uuid::from_bytes(b)
}

fn state(path: &Path) -> Result<FileState, CliError> {
    FileState::of(path).map_err(|e| io_err("stat", path, e))
}

/// The stamp of an open image: every layer's file state, format and identity, and the
/// virtual size.
fn stamp_of(img: &Image) -> Result<[u8; 32], CliError> {
    let chain = img
        .chain
        .as_ref()
        .ok_or_else(|| CliError::new("the image was not opened as a chain"))?;
    let mut b = StampBuilder::new();
    for layer in chain.layers() {
        b = b
            .file(&state(&layer.path)?)
            .bytes("format", layer.format.name().as_bytes())
            .bytes("identity", layer.identity.to_string().as_bytes());
    }
    Ok(
        b.bytes("virtual size", &img.dev.info().virtual_size.to_be_bytes())
            .finish(),
    )
}

/// A stamp taken once the files' ctimes are old enough that any later write shows.
fn settled_stamp(img: &Image) -> Result<[u8; 32], CliError> {
    let paths: Vec<PathBuf> = img
        .chain
        .as_ref()
        .map(|c| c.layers().iter().map(|l| l.path.clone()).collect())
        .unwrap_or_default();
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    for _ in 0..5 {
        let first = stamp_of(img)?;
        ot::settle(&refs, SETTLE)
            .map_err(|e| CliError::new(format!("cannot stamp the source: {e}")))?;
        if stamp_of(img)? == first {
            return Ok(first);
        }
    }
    Err(CliError::new(
        "the source image keeps changing while a token is minted over it",
    ))
}

fn flags_text(flags: u32) -> String {
    if flags & ALL_ZERO_BEYOND_CURRENT_RANGE != 0 {
        format!("{flags:#010x} (ALL_ZERO_BEYOND_CURRENT_RANGE)")
    } else {
        format!("{flags:#010x}")
    }
}

fn read(
    key_path: &Path,
    image: &Path,
    offset: u64,
    len: u64,
    ttl: Option<u64>,
    out: Option<&Path>,
) -> CliResult {
    let canonical = std::fs::canonicalize(image).map_err(|e| io_err("resolve", image, e))?;
    let locator = canonical.as_os_str().as_bytes().to_vec();
    if locator.len() > ot::MAX_LOCATOR {
        return Err(CliError::new(format!(
            "{} is longer than the {} bytes a token can name",
            canonical.display(),
            ot::MAX_LOCATOR
        )));
    }
    let img = image::open(&canonical, None, true)?;
    let stamp = settled_stamp(&img)?;
    let src = Arc::new(TrackedDisk::with_id(
        img.dev.clone(),
        disk_id(&state(&canonical)?),
    ));
    let req = ReadRequest {
        offset,
        len,
        ttl: ttl.map(Duration::from_millis),
        audience: None,
        source_stamp: stamp,
        locator,
    };
    let mint = |kf: &KeyFile| {
        provider(kf)
            .offload_read_with(&local_principal(), &src, &req)
            .map_err(|e| err(&e))
    };
    // A missing key file is made only once a token was minted with its key: a read that
    // fails (bad arguments, an unreadable image) leaves nothing behind.
    let r = match KeyFile::load_if_exists(key_path).map_err(|e| err(&e))? {
        Some(kf) => mint(&kf)?,
        None => {
            let fresh = KeyFile::generate();
            let r = mint(&fresh)?;
            let (kf, created) = fresh.create(key_path).map_err(|e| err(&e))?;
            if created {
                eprintln!("vdisk: created provider key file {}", key_path.display());
                r
            } else {
                // Another command created the file meanwhile: seal with its key instead.
                mint(&kf)?
            }
        }
    };
    let mut info = Vec::new();
    info.push(if r.token.is_zero() {
        "token: zero-data (STORAGE_OFFLOAD_TOKEN_TYPE_ZERO_DATA)".to_string()
    } else {
        let id = ot::hex::encode(&r.token.raw_body().token_id);
        format!("token: sealed, id {id}")
    });
    info.push(format!(
        "transfer length: {} bytes (of {len} asked at offset {offset})",
        r.transfer_length
    ));
    info.push(format!("flags: {}", flags_text(r.flags)));
    match out {
        Some(path) => {
            write_private(path, r.token.as_bytes())?;
            for l in info {
                println!("{l}");
            }
            println!("written to {}", path.display());
        }
        None => {
            println!("{}", ot::hex::encode(r.token.as_bytes()));
            for l in info {
                eprintln!("{l}");
            }
        }
    }
    Ok(0)
}

/// Writes a token file readable by its owner only (a token is a capability).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err("create", path, e))?;
    f.write_all(bytes).map_err(|e| io_err("write", path, e))
}

/// Reads a token: 512 raw bytes, or their hex (whitespace ignored); `-` is stdin.
fn read_token(path: &Path) -> Result<Token, CliError> {
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| io_err("read", path, e))?;
    } else {
        bytes = std::fs::read(path).map_err(|e| io_err("read", path, e))?;
    }
    if let Some(decoded) = std::str::from_utf8(&bytes).ok().and_then(ot::hex::decode) {
        if decoded.len() == ot::TOKEN_SIZE {
            return Token::from_slice(&decoded).map_err(|e| err(&e));
        }
    }
    Token::from_slice(&bytes).map_err(|e| {
        CliError::new(format!(
            "{}: {e} (expected 512 bytes or 1024 hex digits)",
            path.display()
        ))
    })
}

fn load_keys(key_path: &Path) -> Result<KeyFile, CliError> {
    if !key_path.exists() {
        return Err(CliError::new(format!(
            "no key file at {}: tokens are minted and redeemed with the same key file \
             (`vdisk token read` creates it)",
            key_path.display()
        )));
    }
    KeyFile::load(key_path).map_err(|e| err(&e))
}

fn write(
    key_path: &Path,
    image: &Path,
    offset: u64,
    len: u64,
    token_path: &Path,
    token_offset: u64,
) -> CliResult {
    let token = read_token(token_path)?;
    let kf = load_keys(key_path)?;
    let p = provider(&kf);
    let who = local_principal();
    let dst_state = state(image)?;
    let body = match p.open(&token).map_err(|e| err(&ot::Error::from(e)))? {
        Opened::Zero => {
            let img = image::open(image, None, false)?;
            let dst = TrackedDisk::with_id(img.dev.clone(), disk_id(&dst_state));
            let calls = redeem_loop(&p, &who, &dst, offset, len, &token, 0)?;
            dst.flush()?;
            println!("wrote {len} bytes of zeros at offset {offset} ({calls} offload writes)");
            return Ok(0);
        }
        Opened::Sealed(b) => b,
    };
    let available = body.length.checked_sub(token_offset).ok_or_else(|| {
        CliError::new(format!(
            "token offset {token_offset} is past the token's {} bytes",
            body.length
        ))
    })?;
    if len > available {
        return Err(CliError::new(format!(
            "the token holds {available} bytes from token offset {token_offset}, not {len}"
        )));
    }
    if body.locator.is_empty() {
        return Err(CliError::new("the token names no source image"));
    }
    let src_path = PathBuf::from(OsStr::from_bytes(&body.locator));
    let src_state = state(&src_path)?;
    let same = src_state.same_file(&dst_state);
    // One open when source and destination are one file: its writes then invalidate the
    // token exactly where they overlap its range.
    let dst_img = image::open(image, None, false)?;
    let src_img = if same {
        None
    } else {
        Some(image::open(&src_path, None, true)?)
    };
    let src_ref = src_img.as_ref().unwrap_or(&dst_img);
    let src = Arc::new(TrackedDisk::with_id(
        src_ref.dev.clone(),
        disk_id(&src_state),
    ));
    let dst = if same {
        src.clone()
    } else {
        Arc::new(TrackedDisk::with_id(
            dst_img.dev.clone(),
            disk_id(&dst_state),
        ))
    };
    let stamp = stamp_of(src_ref)?;
    p.admit(&token, &src, &stamp).map_err(|e| {
        CliError::new(format!(
            "{} (source {})",
            crate::cause_chain(&e),
            src_path.display()
        ))
    })?;
    let calls = redeem_loop(&p, &who, &dst, offset, len, &token, token_offset)?;
    dst.flush()?;
    if !same && stamp_of(src_ref)? != stamp {
        return Err(CliError::new(format!(
            "{} changed during the copy: {} may hold a mix of old and new data",
            src_path.display(),
            image.display()
        )));
    }
    println!(
        "wrote {len} bytes at offset {offset} from {} ({calls} offload writes)",
        src_path.display()
    );
    Ok(0)
}

/// Offload writes until `len` bytes are written; returns the number of calls.
fn redeem_loop(
    p: &Provider,
    who: &Principal,
    dst: &TrackedDisk,
    offset: u64,
    len: u64,
    token: &Token,
    token_offset: u64,
) -> Result<u64, CliError> {
    let (mut done, mut calls) = (0u64, 0u64);
    while done < len {
        let n = p
            .offload_write(
                who,
                dst,
                offset + done,
                len - done,
                token,
                token_offset + done,
            )
            .map_err(|e| {
                CliError::new(format!(
                    "{} (after {done} of {len} bytes)",
                    crate::cause_chain(&e)
                ))
            })?;
        if n == 0 {
            return Err(CliError::new(format!(
                "offload write made no progress after {done} of {len} bytes"
            )));
        }
        done += n;
        calls += 1;
    }
    Ok(calls)
}

/// "2026-03-21T10:00:00.123Z" for milliseconds since the epoch (proleptic Gregorian, UTC).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

fn print_body(b: &TokenBody, now: u64) {
    println!("body version: {}", ot::BODY_VERSION);
    println!("key id: {}", b.key_id);
    println!("token id: {}", b.id);
    println!("provider: {}", b.provider);
    println!("source disk: {}", b.disk);
    println!("source write generation: {}", b.generation);
    println!("offset: {}", b.offset);
    println!("length: {}", b.length);
    println!("logical sector size: {}", b.sector_size);
    println!("issued: {}", utc(b.issued_ms));
    println!("inactivity ttl: {} ms", b.inactivity_ttl_ms);
    println!("hard expiry: {}", utc(b.expires_ms));
    let inactive = b.issued_ms.saturating_add(u64::from(b.inactivity_ttl_ms));
    let end = inactive.min(b.expires_ms);
    if now >= end {
        println!("status: expired (across processes inactivity counts from the issue time)");
    } else {
        println!("status: valid for {} ms more", end - now);
    }
    println!("minter: {}", b.minter);
    let members: Vec<String> = b.audience.members().iter().map(|p| p.to_string()).collect();
    println!("audience: {}", members.join(", "));
    println!("source stamp: {}", ot::hex::encode(&b.source_stamp));
    println!("locator: {}", String::from_utf8_lossy(&b.locator));
}

fn inspect(key_path: &Path, token_path: &Path) -> CliResult {
    let token = read_token(token_path)?;
    let raw = token.raw();
    let ty = raw.token_type.get();
    let kind = match ty {
        ot::TOKEN_TYPE_ZERO_DATA => " (STORAGE_OFFLOAD_TOKEN_TYPE_ZERO_DATA)",
        ot::TOKEN_TYPE_VDISK => " (vdisk sealed token)",
        _ => " (unknown)",
    };
    println!("token type: {ty:#010x}{kind}");
    println!("reserved: {}", ot::hex::encode(&raw.reserved));
    println!("token id length: {:#06x}", raw.token_id_length.get());
    match token.envelope() {
        Err(e) => {
            return Err(CliError::with_code(format!("invalid envelope: {e}"), 2));
        }
        Ok(ot::Envelope::Zero) => {
            println!("zero-data token: redeeming it writes zeros");
            return Ok(0);
        }
        Ok(ot::Envelope::Sealed { .. }) => {}
    }
    let now = ot::Clock::now_ms(&ot::SystemClock);
    match TokenBody::try_from(token.raw_body()) {
        Ok(b) => print_body(&b, now),
        Err(e) => println!("body: invalid: {e}"),
    }
    if !key_path.exists() {
        println!("seal: not verified (no key file at {})", key_path.display());
        return Err(CliError::with_code("the seal could not be verified", 2));
    }
    let kf = KeyFile::load(key_path).map_err(|e| err(&e))?;
    match provider(&kf).open(&token) {
        Ok(Opened::Sealed(b)) => {
            let whose = if b.provider == kf.provider {
                "this key file's provider"
            } else {
                "another provider sharing this key"
            };
            println!("seal: valid (HMAC-SHA256, key {}; {whose})", b.key_id);
            Ok(0)
        }
        Ok(Opened::Zero) => Ok(0),
        Err(e) => {
            println!("seal: INVALID ({e})");
            Err(CliError::with_code(format!("token refused: {e}"), 2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }
}
