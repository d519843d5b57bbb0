//! Parent path resolution under a policy.
//!
//! A child names its parent through locator entries (VHDX `relative_path`, `volume_path`,
//! `absolute_win32_path`; VHD `W2ru`, `W2ku`, deprecated `Wi2r`/`Wi2k`, `MacX`), tried in that
//! order. Windows separators become `/`; a drive-letter path (`C:\dir\p.vhdx`) is absolute
//! and resolves only through a drive mapping the policy gives; `\\?\Volume{..}\` paths cannot be
//! resolved on this host and are passed over with the reason.
//!
//! The default policy: a parent must resolve — after symlinks, by canonical path — inside the
//! child's folder tree or one of the configured roots. Absolute paths are refused unless
//! allowed (or inside a configured root); relative paths that climb out with `..` are refused
//! unless allowed. Nothing outside policy is ever opened: the check runs before the open.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::error::Tried;

/// Where parents may live.
#[derive(Debug, Clone, Default)]
pub struct PathPolicy {
    /// Extra folders (besides the child's own folder tree) where parents may live.
    pub roots: Vec<PathBuf>,
    /// Allow absolute parent paths anywhere.
    pub allow_absolute: bool,
    /// Allow relative paths that climb out of the child's folder tree with `..`.
    pub allow_escape: bool,
    /// Maps a Windows drive letter (upper case) to a host folder, for `absolute_win32_path`
    /// and `W2ku` entries.
    pub drives: BTreeMap<char, PathBuf>,
}

/// A parent path as written in a child, with the locator entry it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// "relative_path", "volume_path", "absolute_win32_path", "W2ru", "W2ku", ...
    pub source: String,
    /// The path text.
    pub path: String,
}

/// A path after Windows normalisation.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Relative(PathBuf),
    Absolute(PathBuf),
    Unresolvable(String),
}

fn parse(raw: &str, drives: &BTreeMap<char, PathBuf>) -> Parsed {
    let s = raw.trim_end_matches('\0');
    if let Some(rest) = s.strip_prefix("file://") {
        // MacX: a UTF-8 file URL.
        return Parsed::Absolute(PathBuf::from(rest));
    }
    if s.starts_with("\\\\?\\") || s.starts_with("\\\\.\\") || s.starts_with("\\\\") {
        return Parsed::Unresolvable(
            "a Windows volume or UNC path has no meaning on this host".into(),
        );
    }
    let bytes = s.as_bytes();
    if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
        let letter = (bytes[0] as char).to_ascii_uppercase();
        let Some(base) = drives.get(&letter) else {
            return Parsed::Unresolvable(format!("drive {letter}: has no mapping on this host"));
        };
        let rest = s[2..].replace('\\', "/");
        return Parsed::Absolute(base.join(rest.trim_start_matches('/')));
    }
    let unix = s.replace('\\', "/");
    if unix.starts_with('/') {
        Parsed::Absolute(PathBuf::from(unix))
    } else {
        Parsed::Relative(PathBuf::from(unix))
    }
}

fn climbs_out(rel: &Path) -> bool {
    let mut depth: i64 = 0;
    for c in rel.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

impl PathPolicy {
    /// Resolves the candidates of `child` in order; returns the first parent path that exists
    /// and passes the policy, or every candidate with the reason it failed.
    ///
    /// A candidate refused by policy is recorded and the search goes on (a later locator may
    /// point inside the allowed tree); the refusal is reported if nothing else resolves.
    pub fn resolve(&self, child: &Path, candidates: &[Candidate]) -> Result<PathBuf, Vec<Tried>> {
        let mut tried = Vec::new();
        let dir = child.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let canon_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        for c in candidates {
            let mut t = Tried {
                source: c.source.clone(),
                raw: c.path.clone(),
                resolved: None,
                reason: String::new(),
            };
            if c.path.trim_end_matches('\0').is_empty() {
                t.reason = "empty path".into();
                tried.push(t);
                continue;
            }
            let (joined, absolute, escapes) = match parse(&c.path, &self.drives) {
                Parsed::Unresolvable(why) => {
                    t.reason = why;
                    tried.push(t);
                    continue;
                }
                Parsed::Absolute(p) => (p, true, false),
                Parsed::Relative(p) => {
                    let esc = climbs_out(&p);
                    (canon_dir.join(p), false, esc)
                }
            };
            t.resolved = Some(joined.clone());
            let canon = match std::fs::canonicalize(&joined) {
                Ok(p) => p,
                Err(e) => {
                    t.reason = format!("not found ({e})");
                    tried.push(t);
                    continue;
                }
            };
            t.resolved = Some(canon.clone());
            let in_tree = canon.starts_with(&canon_dir);
            let in_root = self
                .roots
                .iter()
                .filter_map(|r| std::fs::canonicalize(r).ok())
                .any(|r| canon.starts_with(r));
            let verdict = if absolute && !(self.allow_absolute || in_root) {
                Some("absolute parent paths are not allowed (allow them or add a root)")
            } else if escapes && !(self.allow_escape || in_root) && !in_tree {
                Some("the path climbs out of the child's folder with '..' (allow escapes or add a root)")
            } else if !(in_tree
                || in_root
                || (absolute && self.allow_absolute)
                || (escapes && self.allow_escape))
            {
                Some("the parent resolves outside the child's folder tree and the allowed roots")
            } else if !canon.is_file() {
                Some("not a regular file")
            } else {
                None
            };
            match verdict {
                Some(rule) => {
                    t.reason = rule.into();
                    tried.push(t);
                }
                None => return Ok(canon),
            }
        }
        Err(tried)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(source: &str, path: &str) -> Candidate {
        Candidate {
            source: source.into(),
            path: path.into(),
        }
    }

    #[test]
    fn windows_paths_parse() {
        let mut drives = BTreeMap::new();
        drives.insert('C', PathBuf::from("/mnt/c"));
        assert_eq!(
            parse(".\\fat-parent.vhd", &drives),
            Parsed::Relative(PathBuf::from("./fat-parent.vhd"))
        );
        assert_eq!(
            parse("c:\\Projects\\p.vhd", &drives),
            Parsed::Absolute(PathBuf::from("/mnt/c/Projects/p.vhd"))
        );
        assert!(matches!(
            parse("D:\\x.vhd", &drives),
            Parsed::Unresolvable(_)
        ));
        assert!(matches!(
            parse(
                "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\x.vhdx",
                &drives
            ),
            Parsed::Unresolvable(_)
        ));
        assert_eq!(
            parse("/abs/p", &drives),
            Parsed::Absolute(PathBuf::from("/abs/p"))
        );
        assert!(climbs_out(Path::new("../x")));
        assert!(climbs_out(Path::new("a/../../x")));
        assert!(!climbs_out(Path::new("a/../x")));
    }

    #[test]
    fn policy_keeps_parents_inside_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("top");
        std::fs::create_dir_all(top.join("sub")).unwrap();
        std::fs::write(top.join("sub/p.img"), b"x").unwrap();
        std::fs::write(d.path().join("outside.img"), b"x").unwrap();
        let child = top.join("child.img");
        let p = PathPolicy::default();
        // Relative inside: fine, with Windows separators.
        assert_eq!(
            p.resolve(&child, &[cand("relative_path", ".\\sub\\p.img")])
                .unwrap(),
            std::fs::canonicalize(top.join("sub/p.img")).unwrap()
        );
        // '..' escape refused; absolute refused; both recorded with reasons.
        let err = p
            .resolve(
                &child,
                &[
                    cand("relative_path", "..\\outside.img"),
                    cand(
                        "absolute_win32_path",
                        &d.path().join("outside.img").display().to_string(),
                    ),
                    cand("W2ku", "C:\\outside.img"),
                ],
            )
            .unwrap_err();
        assert_eq!(err.len(), 3);
        assert!(err[0].reason.contains(".."), "{:?}", err[0]);
        assert!(err[1].reason.contains("absolute"), "{:?}", err[1]);
        assert!(err[2].reason.contains("drive C:"), "{:?}", err[2]);
        // A symlink inside the tree that points outside is refused.
        std::os::unix::fs::symlink(d.path().join("outside.img"), top.join("link.img")).unwrap();
        let err = p
            .resolve(&child, &[cand("relative_path", "link.img")])
            .unwrap_err();
        assert!(err[0].reason.contains("outside"), "{:?}", err[0]);
        // Allowed through a root.
        let p = PathPolicy {
            roots: vec![d.path().to_path_buf()],
            ..PathPolicy::default()
        };
        assert!(p
            .resolve(&child, &[cand("relative_path", "../outside.img")])
            .is_ok());
        assert!(p
            .resolve(&child, &[cand("relative_path", "link.img")])
            .is_ok());
        // Missing files say so, and a later candidate is still tried.
        let p = PathPolicy::default();
        let got = p
            .resolve(
                &child,
                &[cand("W2ru", "nope.img"), cand("W2ku", "sub/p.img")],
            )
            .unwrap();
        assert!(got.ends_with("sub/p.img"));
    }
}
