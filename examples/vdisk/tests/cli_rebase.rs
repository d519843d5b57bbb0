//! `vdisk rebase -u -b NEWPARENT IMG`: a chain moved to other folders is relinked and reads,
//! checks and verifies exactly as before; a parent with other content is refused and the
//! child left byte-identical. `vdisk rebase -b NEWPARENT IMG` (copying): the image reads as
//! before over another parent; self-parent, wrong format and a missing old parent refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

/// `vdisk ARGS` with `VDISK_PARENT_ROOTS=root`.
fn vdisk_rooted(root: &Path, args: &[&str]) -> Output {
    Command::new(vdisk_bin())
        .env("VDISK_PARENT_ROOTS", root)
        .args(args)
        .output()
        .unwrap()
}

fn backing_chain(root: &Path, img: &str) -> Vec<serde_json::Value> {
    let out = assert_ok(
        vdisk_rooted(root, &["info", "--backing-chain", "--output", "json", img]),
        "info --backing-chain",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().clone()
}

#[test]
fn moved_chain_rebased_reads_checks_and_verifies() {
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let (base, mid, top) = (
            p(dir, &format!("base.{fmt}")),
            p(dir, &format!("mid.{fmt}")),
            p(dir, &format!("top.{fmt}")),
        );
        vdisk_ok(&["create", "-f", fmt, &base, "16M"]);
        vdisk_ok(&["io", &base, "-c", "write -P 7 0 3M"]);
        vdisk_ok(&["create", "-f", fmt, "-b", &base, &mid]);
        vdisk_ok(&[
            "io",
            &mid,
            "-c",
            "write -P 8 1M 1M",
            "-c",
            "write -P 5 7M 4k",
        ]);
        vdisk_ok(&["create", "-f", fmt, "-b", &mid, &top]);
        vdisk_ok(&["io", &top, "-c", "write -P 9 1536k 4k"]);
        let before = p(dir, "before.raw");
        vdisk_ok(&["convert", "-O", "raw", &top, &before]);

        // Move base and mid into folders of their own: the chain no longer opens.
        std::fs::create_dir(dir.join("a")).unwrap();
        std::fs::create_dir(dir.join("b")).unwrap();
        let new_base = p(dir, &format!("a/base.{fmt}"));
        let new_mid = p(dir, &format!("b/mid.{fmt}"));
        std::fs::rename(&base, &new_base).unwrap();
        std::fs::rename(&mid, &new_mid).unwrap();
        assert!(!vdisk_rooted(dir, &["compare", &before, &top])
            .status
            .success());

        assert_ok(
            vdisk_rooted(dir, &["rebase", "-u", "-b", &new_base, &new_mid]),
            "rebase mid",
        );
        assert_ok(
            vdisk_rooted(dir, &["rebase", "-u", "-f", fmt, "-b", &new_mid, &top]),
            "rebase top",
        );

        // Same bytes as before the move, every link verified, every image clean.
        let o = vdisk_rooted(dir, &["compare", &before, &top]);
        assert_eq!(o.status.code(), Some(0), "{fmt}: {o:?}");
        let chain = backing_chain(dir, &top);
        assert_eq!(chain.len(), 3, "{fmt}");
        for layer in &chain[..2] {
            assert_eq!(layer["link"]["verified"], true, "{fmt}: {layer}");
        }
        let parent_of_top = chain[0]["link"]["parent"].as_str().unwrap();
        assert_eq!(
            Path::new(parent_of_top),
            std::fs::canonicalize(&new_mid).unwrap()
        );
        for img in [&top, &new_mid] {
            let o = vdisk_rooted(dir, &["check", img]);
            assert_eq!(o.status.code(), Some(0), "{fmt} check {img}: {o:?}");
        }
        let reads = vdisk_rooted(
            dir,
            &[
                "io",
                "-r",
                &top,
                "-c",
                "read -P 9 1536k 4k",
                "-c",
                "read -P 8 1M 512k",
                "-c",
                "read -P 7 0 1M",
                "-c",
                "read -P 5 7M 4k",
            ],
        );
        assert_ok(reads, "io -r");
        // The locators name the new places.
        let info = vdisk_ok(&["info", "--output", "json", &top]);
        assert!(info.contains(&format!("b\\\\mid.{fmt}")), "{fmt}: {info}");
    }
}

#[test]
fn rebase_onto_other_content_is_refused_and_writes_nothing() {
    for fmt in ["vhd", "vhdx"] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let (base, child, other) = (
            p(dir, &format!("base.{fmt}")),
            p(dir, &format!("child.{fmt}")),
            p(dir, &format!("other.{fmt}")),
        );
        vdisk_ok(&["create", "-f", fmt, &base, "16M"]);
        vdisk_ok(&["create", "-f", fmt, "-b", &base, &child]);
        vdisk_ok(&["io", &child, "-c", "write -P 3 0 64k"]);
        vdisk_ok(&["create", "-f", fmt, &other, "16M"]);
        let bytes = std::fs::read(&child).unwrap();

        let o = vdisk(&["rebase", "-u", "-b", &other, &child]);
        assert!(!o.status.success(), "{fmt}");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let chain = backing_chain(dir, &child);
        let expected = chain[0]["link"]["expected"].as_str().unwrap();
        let found = backing_chain(dir, &other)[0]["identity"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            err.contains("not the same content") && err.contains(expected) && err.contains(&found),
            "{fmt}: {err}"
        );
        assert_eq!(std::fs::read(&child).unwrap(), bytes, "{fmt}");

        assert_eq!(chain[0]["link"]["verified"], true, "{fmt}");
    }
}

/// stderr of a failed `vdisk ARGS`: one line, holding every one of `needles`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let o = vdisk(args);
    assert!(!o.status.success(), "{args:?}: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: no {n:?} in {err}");
    }
}

/// `vdisk rebase -b NEW IMG` without -u copies what the image needs: it reads the same as a
/// flattened copy taken before, now over NEW; refusals are one line naming the cause.
#[test]
fn copying_rebase_keeps_the_content() {
    for (fmt, other_fmt) in [("vhd", "vhdx"), ("vhdx", "vhd")] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let [a, b, c, c2, alien] = ["a", "b", "c", "c2", "alien"].map(|n| {
            let ext = if n == "alien" { other_fmt } else { fmt };
            p(dir, &format!("{n}.{ext}"))
        });
        vdisk_ok(&["create", "-f", fmt, &a, "16M"]);
        vdisk_ok(&["io", &a, "-c", "write -P 1 0 4M", "-c", "write -P 3 8M 1M"]);
        vdisk_ok(&["create", "-f", fmt, &b, "16M"]);
        // Equal to A in [0, 2M), different in [2M, 4M), zeros where A has [8M, 9M), data
        // where A has none.
        vdisk_ok(&[
            "io",
            &b,
            "-c",
            "write -P 1 0 2M",
            "-c",
            "write -P 2 2M 2M",
            "-c",
            "write -P 4 12M 1M",
        ]);
        vdisk_ok(&["create", "-f", fmt, "-b", &a, &c]);
        vdisk_ok(&[
            "io",
            &c,
            "-c",
            "write -P 9 1M 64k",
            "-c",
            "write -P 8 3M 4k",
        ]);
        let before = p(dir, "before.raw");
        vdisk_ok(&["convert", "-O", "raw", &c, &before]);

        let o = vdisk(&["rebase", "-p", "-b", &b, &c]);
        assert_ok(o, "rebase");
        let o = vdisk(&["compare", &before, &c]);
        assert_eq!(o.status.code(), Some(0), "{fmt}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("identical"),
            "{fmt}: {o:?}"
        );
        let chain = backing_chain(dir, &c);
        assert_eq!(chain.len(), 2, "{fmt}");
        assert_eq!(chain[0]["link"]["verified"], true, "{fmt}");
        assert_eq!(
            Path::new(chain[0]["link"]["parent"].as_str().unwrap()),
            std::fs::canonicalize(&b).unwrap()
        );
        let o = vdisk(&["check", &c]);
        assert_eq!(o.status.code(), Some(0), "{fmt} check: {o:?}");
        let reads = vdisk(&[
            "io",
            "-r",
            &c,
            "-c",
            "read -P 1 0 1M",
            "-c",
            "read -P 9 1M 64k",
            "-c",
            "read -P 1 2M 1M",
            "-c",
            "read -P 8 3M 4k",
            "-c",
            "read -P 3 8M 1M",
            "-c",
            "read -P 0 12M 1M",
        ]);
        assert_ok(reads, "io -r");

        // Refusals, each one line naming its cause.
        for u in [&[][..], &["-u"][..]] {
            let mut args = vec!["rebase"];
            args.extend(u);
            args.extend(["-b", &c, &c]);
            fails_with(&args, &["cannot be its own parent"]);
        }
        fails_with(&["rebase", "-b", &c, &b], &["not a differencing image"]);
        vdisk_ok(&["create", "-f", other_fmt, &alien, "16M"]);
        let needs = format!("needs a {fmt} parent");
        fails_with(&["rebase", "-b", &alien, &c], &[&needs]);
        vdisk_ok(&["create", "-f", fmt, "-b", &a, &c2]);
        let bytes = std::fs::read(&c2).unwrap();
        std::fs::rename(&a, p(dir, "moved-away")).unwrap();
        fails_with(
            &["rebase", "-b", &b, &c2],
            &["current parent chain", &format!("a.{fmt}")],
        );
        assert_eq!(std::fs::read(&c2).unwrap(), bytes, "{fmt}");
        // -u does not read the old parent, but B is not its content.
        fails_with(&["rebase", "-u", "-b", &b, &c2], &["not the same content"]);
    }
}
