//! `vdisk io`: qemu-io's basic commands against any image.
//!
//! `read [-P byte] OFF LEN`, `write [-P byte] OFF LEN`, `write -z [-u] OFF LEN`,
//! `discard OFF LEN`, `flush`. Offsets and lengths take K/M/G/T suffixes and need not be
//! sector-aligned (partial sectors are read-modify-written). A failed `read -P` check makes
//! the whole run exit 1 after the remaining commands.

use std::path::Path;
use std::time::Instant;

use vdisk::block_io::{check_request, read_bytes, write_bytes, BlockDevice, ErrorKind};

use crate::image;
use crate::size::parse_size;
use crate::{CliError, CliResult};

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoCmd {
    /// Read and optionally verify a pattern.
    Read {
        off: u64,
        len: u64,
        pattern: Option<u8>,
    },
    /// Write a pattern (0xcd by default, as qemu-io).
    Write { off: u64, len: u64, pattern: u8 },
    /// Write zeros, unmapping if asked.
    WriteZeroes { off: u64, len: u64, unmap: bool },
    /// Discard.
    Discard { off: u64, len: u64 },
    /// Flush.
    Flush,
}

fn parse_pattern(s: &str) -> Result<u8, CliError> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(h, 16)
    } else {
        s.parse::<u8>()
    };
    v.map_err(|_| {
        CliError::new(format!(
            "invalid pattern '{s}': use a byte, 0..255 or 0x00..0xff"
        ))
    })
}

/// Parses one `-c` command.
pub fn parse(cmd: &str) -> Result<IoCmd, CliError> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return Err(CliError::new("empty command"));
    };
    let mut pattern = None;
    let mut zero = false;
    let mut unmap = false;
    let mut args = Vec::new();
    let mut it = rest.iter();
    while let Some(&w) = it.next() {
        match w {
            "-P" => {
                let p = it
                    .next()
                    .ok_or_else(|| CliError::new(format!("'{cmd}': -P needs a pattern")))?;
                pattern = Some(parse_pattern(p)?);
            }
            "-z" => zero = true,
            "-u" => unmap = true,
            "-q" => {}
            _ if w.starts_with('-')
                && w.len() > 1
                && !w[1..].starts_with(|c: char| c.is_ascii_digit()) =>
            {
                return Err(CliError::new(format!("'{cmd}': unknown flag {w}")))
            }
            _ => args.push(w),
        }
    }
    let off_len = || -> Result<(u64, u64), CliError> {
        match args.as_slice() {
            [o, l] => Ok((parse_size(o)?, parse_size(l)?)),
            _ => Err(CliError::new(format!("'{cmd}': expected OFFSET LENGTH"))),
        }
    };
    Ok(match name {
        "read" => {
            let (off, len) = off_len()?;
            IoCmd::Read { off, len, pattern }
        }
        "write" if zero => {
            let (off, len) = off_len()?;
            IoCmd::WriteZeroes { off, len, unmap }
        }
        "write" => {
            let (off, len) = off_len()?;
            IoCmd::Write {
                off,
                len,
                pattern: pattern.unwrap_or(0xcd),
            }
        }
        "discard" => {
            let (off, len) = off_len()?;
            IoCmd::Discard { off, len }
        }
        "flush" if args.is_empty() => IoCmd::Flush,
        _ => return Err(CliError::new(format!("unknown command '{cmd}'"))),
    })
}

/// Runs `commands` against the image at `path`.
pub fn run(path: &Path, format: Option<&str>, read_only: bool, commands: &[String]) -> CliResult {
    let cmds = commands
        .iter()
        .map(|c| parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let img = image::open(path, format, read_only)?;
    let mut failed = false;
    for c in &cmds {
        failed |= !exec(&*img.dev, c)?;
    }
    Ok(u8::from(failed))
}

/// Executes one command; `Ok(false)` when a pattern check failed.
pub fn exec(dev: &dyn BlockDevice, cmd: &IoCmd) -> Result<bool, CliError> {
    let t = Instant::now();
    const MAX: u64 = 1 << 30;
    let big = |len: u64| {
        if len > MAX {
            Err(CliError::new(format!(
                "length {len} is over the 1 GiB limit of one command"
            )))
        } else {
            Ok(len as usize)
        }
    };
    match *cmd {
        IoCmd::Read { off, len, pattern } => {
            let mut buf = vec![0u8; big(len)?];
            read_bytes(dev, &mut buf, off)?;
            if let Some(p) = pattern {
                if let Some(i) = buf.iter().position(|&b| b != p) {
                    println!(
                        "Pattern verification failed at offset {}, {len} bytes",
                        off + i as u64
                    );
                    return Ok(false);
                }
            }
            report("read", off, len, t);
        }
        IoCmd::Write { off, len, pattern } => {
            write_bytes(dev, &vec![pattern; big(len)?], off)?;
            report("wrote", off, len, t);
        }
        IoCmd::WriteZeroes { off, len, unmap } => {
            // Whole sectors go to write_zeroes; partial ones are read-modify-written.
            match check_request(&dev.info(), off, len, true) {
                Ok(()) => dev.write_zeroes(off, len, unmap)?,
                Err(e) if e.kind() == ErrorKind::Unaligned => {
                    write_bytes(dev, &vec![0u8; big(len)?], off)?
                }
                Err(e) => return Err(e.into()),
            }
            report("wrote", off, len, t);
        }
        IoCmd::Discard { off, len } => {
            dev.discard(off, len)?;
            report("discard", off, len, t);
        }
        IoCmd::Flush => dev.flush()?,
    }
    Ok(true)
}

fn report(what: &str, off: u64, len: u64, t: Instant) {
    let secs = t.elapsed().as_secs_f64();
    println!("{what} {len}/{len} bytes at offset {off}");
    println!(
        "{}, 1 ops; {secs:.4} sec ({}/sec)",
        crate::cmds::human(len),
        crate::cmds::human((len as f64 / secs.max(1e-9)) as u64)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_io_commands() {
        assert_eq!(
            parse("read -P 0xab 1M 4k").unwrap(),
            IoCmd::Read {
                off: 1 << 20,
                len: 4096,
                pattern: Some(0xab)
            }
        );
        assert_eq!(
            parse("write 0 512").unwrap(),
            IoCmd::Write {
                off: 0,
                len: 512,
                pattern: 0xcd
            }
        );
        assert_eq!(
            parse("write -z -u 0 1M").unwrap(),
            IoCmd::WriteZeroes {
                off: 0,
                len: 1 << 20,
                unmap: true
            }
        );
        assert_eq!(parse("flush").unwrap(), IoCmd::Flush);
        for bad in [
            "",
            "read 0",
            "write -P 300 0 1",
            "frob 0 1",
            "read -x 0 1",
            "flush 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
