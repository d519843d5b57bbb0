//! The provider key file of the `vdisk token` verbs: a provider id and its keys, kept
//! between commands so a token minted by one process verifies in another.
//!
//! ```text
//! # vdisk offload-token provider key: keep private (mode 0600). The first key seals; the others only verify.
//! provider 3f2a...-...-...
//! key 2 <64 hex digits>
//! key 1 <64 hex digits>
//! ```
//!
//! Where it lives: the path given, else `$VDISK_TOKEN_KEY`, else
//! `$XDG_CONFIG_HOME/vdisk/token.key`, else `~/.config/vdisk/token.key`. It is created with
//! a fresh random key (mode 0600, its folder 0700) when a token is first minted, atomically
//! (written aside, then hard-linked into place, so two first mints agree on one key).
//! Loading refuses a file that its group or others may read or write, as ssh does.
//! Anyone who can read the file can mint and redeem tokens as its owner.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::hex;
use crate::key::{KeyRing, ProviderKey, SECRET_LEN};

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading, creating or writing failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line does not parse.
    #[error("{}: line {line}: {why}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0: the file as a whole).
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// Others may read or write the file.
    #[error("{} is accessible by others (mode {mode:o}); chmod 600 it", path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No path was given and neither `$VDISK_TOKEN_KEY`, `$XDG_CONFIG_HOME` nor `$HOME` is set.
    #[error("no key file path: set VDISK_TOKEN_KEY or HOME")]
    NoPath,
}

/// A provider's persistent identity: its id and its key ring.
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// The provider id tokens record.
    pub provider: Uuid,
    /// The keys, the sealing one first.
    pub keys: KeyRing,
}

const HEADER: &str = "# vdisk offload-token provider key: keep private (mode 0600). \
                      The first key seals; the others only verify.";

impl KeyFile {
    /// A new provider id with one fresh key (id 1).
    pub fn generate() -> Self {
        KeyFile {
            provider: Uuid::new_v4(),
            keys: KeyRing::new(ProviderKey::generate(1)),
        }
    }

    /// The default path: `$VDISK_TOKEN_KEY`, else `$XDG_CONFIG_HOME/vdisk/token.key`, else
    /// `$HOME/.config/vdisk/token.key`.
    pub fn default_path() -> Result<PathBuf, KeyFileError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(p) = var("VDISK_TOKEN_KEY") {
            return Ok(PathBuf::from(p));
        }
        if let Some(p) = var("XDG_CONFIG_HOME") {
            return Ok(PathBuf::from(p).join("vdisk/token.key"));
        }
        var("HOME")
            .map(|h| PathBuf::from(h).join(".config/vdisk/token.key"))
            .ok_or(KeyFileError::NoPath)
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut s = format!("{HEADER}\nprovider {}\n", self.provider);
        for k in self.keys.keys() {
            s.push_str(&format!("key {} {}\n", k.id(), hex::encode(k.secret())));
        }
        s
    }

    /// Parses the text of the file at `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeyFileError> {
        let err = |line, why| KeyFileError::Parse {
            path: path.to_path_buf(),
            line,
            why,
        };
        let mut provider = None;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["provider", id] => {
                    if provider.is_some() {
                        return Err(err(n, "a second provider line"));
                    }
                    provider =
                        Some(Uuid::parse_str(id).map_err(|_| err(n, "provider id is not a uuid"))?);
                }
                ["key", id, secret] => {
                    let id: u32 = id.parse().map_err(|_| err(n, "key id is not a u32"))?;
                    let secret: [u8; SECRET_LEN] = hex::decode(secret)
                        .and_then(|v| v.try_into().ok())
                        .ok_or_else(|| err(n, "secret is not 64 hex digits"))?;
                    keys.push(ProviderKey::new(id, secret));
                }
                _ => return Err(err(n, "expected 'provider UUID' or 'key ID HEX'")),
            }
        }
        let provider = provider.ok_or_else(|| err(0, "no provider line"))?;
        let keys =
            KeyRing::from_keys(keys).ok_or_else(|| err(0, "no keys, or a repeated key id"))?;
        Ok(KeyFile { provider, keys })
    }

    /// Loads the file at `path`, refusing one that others may access.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let io = |op| {
            move |source| KeyFileError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let meta = fs::metadata(path).map_err(io("read"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(io("read"))?;
        Self::parse(&text, path)
    }

    /// Loads the file at `path` if it exists (`None` if it does not), refusing one that
    /// others may access.
    pub fn load_if_exists(path: &Path) -> Result<Option<Self>, KeyFileError> {
        match Self::load(path) {
            Ok(kf) => Ok(Some(kf)),
            Err(KeyFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Loads the file at `path`, creating it with a fresh key first if it does not exist.
    /// Returns the key file and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyFileError> {
        match Self::load_if_exists(path)? {
            Some(kf) => Ok((kf, false)),
            None => Self::generate().create(path),
        }
    }

    /// Writes this key file to `path`, which must not exist yet (mode 0600, missing folders
    /// 0700), atomically: if another process creates the file meanwhile, its key file is
    /// loaded and returned instead. Returns the key file now at `path` and whether it is
    /// this one. For a caller that generates a key, uses it, and keeps it only if that
    /// worked (a token minted with it must then be minted again with the returned key when
    /// the flag is false).
    pub fn create(self, path: &Path) -> Result<(Self, bool), KeyFileError> {
        let io = |op, p: &Path| {
            let p = p.to_path_buf();
            move |source| KeyFileError::Io {
                op,
                path: p,
                source,
            }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("create the folder of", dir))?;
        }
        let mut aside = path.as_os_str().to_owned();
        aside.push(format!(".{}.tmp", std::process::id()));
        let aside = PathBuf::from(aside);
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&aside)?;
            f.write_all(self.to_text().as_bytes())?;
            f.sync_all()
        })();
        written.map_err(io("write", &aside))?;
        // Linking fails if another process created the file meanwhile: then use theirs.
        let linked = fs::hard_link(&aside, path);
        let _ = fs::remove_file(&aside);
        match linked {
            Ok(()) => Ok((self, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::load(path).map(|k| (k, false))
            }
            Err(e) => Err(io("create", path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_strict_parse() {
        let kf = KeyFile::generate();
        let p = Path::new("k");
        let back = KeyFile::parse(&kf.to_text(), p).unwrap();
        assert_eq!(back.provider, kf.provider);
        assert_eq!(back.keys.keys(), kf.keys.keys());
        assert!(KeyFile::parse("provider x\n", p).is_err());
        assert!(KeyFile::parse(&format!("provider {}\n", kf.provider), p).is_err());
        let bad = format!("provider {}\nkey 1 abcd\n", kf.provider);
        assert!(matches!(
            KeyFile::parse(&bad, p),
            Err(KeyFileError::Parse { line: 2, .. })
        ));
    }

    #[test]
    fn created_private_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/token.key");
        let (a, created) = KeyFile::load_or_create(&p).unwrap();
        assert!(created);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = KeyFile::load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(a.provider, b.provider);
        // A key created by another process meanwhile wins over ours.
        let (c, created) = KeyFile::generate().create(&p).unwrap();
        assert!(!created);
        assert_eq!(c.provider, a.provider);
        assert!(KeyFile::load_if_exists(&d.path().join("none"))
            .unwrap()
            .is_none());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyFile::load_if_exists(&p),
            Err(KeyFileError::Permissions { .. })
        ));
        assert!(matches!(
            KeyFile::load(&p),
            Err(KeyFileError::Permissions { .. })
        ));
    }
}
