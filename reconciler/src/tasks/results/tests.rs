//! Bundles made by the real git, as a guest's agent makes them, and hostile ones.

use super::*;
use std::path::{Path, PathBuf};

fn git(dir: &Path, args: &[&str]) -> String {
    crate::tasks::run_git(
        dir,
        &[
            "user.name=Ada",
            "user.email=ada@example.org",
            "init.defaultBranch=main",
            "protocol.file.allow=always",
        ],
        args,
    )
}

/// A repository with one commit (the fetched one), the host's cache holding it, and a
/// guest's clone of it on branch `fleet/t`.
struct Setup {
    dir: tempfile::TempDir,
    base: git2::Oid,
    cache: git2::Repository,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).expect("mkdir");
        git(&src, &["init", "-q"]);
        std::fs::write(src.join("README"), "one\n").expect("write");
        git(&src, &["add", "."]);
        git(&src, &["commit", "-qm", "one"]);
        let base = git2::Oid::from_str(&git(&src, &["rev-parse", "HEAD"])).expect("oid");
        let cache = git2::Repository::init_bare(dir.path().join("cache.git")).expect("cache");
        cache
            .remote_anonymous(&src.to_string_lossy())
            .and_then(|mut r| r.fetch(&["+refs/heads/main:refs/fleet/fetched"], None, None))
            .expect("fetch");
        git(dir.path(), &["clone", "-q", "src", "guest"]);
        git(&dir.path().join("guest"), &["checkout", "-qb", "fleet/t"]);
        Setup { dir, base, cache }
    }
    fn guest(&self) -> PathBuf {
        self.dir.path().join("guest")
    }
    fn bundle(&self, range: &str) -> Vec<u8> {
        let file = self.dir.path().join("out.bundle");
        let _ = std::fs::remove_file(&file);
        git(
            &self.guest(),
            &["bundle", "create", "-q", &file.to_string_lossy(), range],
        );
        std::fs::read(file).expect("bundle")
    }
    fn commit(&self, file: &str, text: &str) -> git2::Oid {
        std::fs::write(self.guest().join(file), text).expect("write");
        git(&self.guest(), &["add", "-A"]);
        git(&self.guest(), &["commit", "-qm", &format!("edit {file}")]);
        git2::Oid::from_str(&git(&self.guest(), &["rev-parse", "HEAD"])).expect("oid")
    }
}

#[test]
fn a_guests_commits_come_back_checked_summed_up_and_pushed_once() {
    let s = Setup::new();
    s.commit("README", "one\ntwo\n");
    let tip = s.commit("NEW", "new file\n");
    let bundle = s.bundle(&format!("{}..fleet/t", s.base));
    let accepted = accept_bundle(&s.cache, &bundle, s.base, "fleet/t").expect("accepted");
    assert_eq!(accepted, Accepted { tip, commits: 2 });

    let change = change(&s.cache, s.base, tip).expect("change");
    assert_eq!(
        (change.files_changed, change.insertions, change.deletions),
        (2, 2, 0)
    );
    let patch = String::from_utf8(change.patch).expect("text");
    assert!(patch.contains("diff --git a/NEW b/NEW"), "{patch}");
    assert!(patch.contains("\n+two\n"), "{patch}");

    // Pushed to a bare repository; again, nothing changes; a branch moved elsewhere is
    // not overwritten.
    let target = s.dir.path().join("target.git");
    git2::Repository::init_bare(&target).expect("target");
    let url = target.to_string_lossy().into_owned();
    push(&s.cache, &url, tip, "fleet/t/run1").expect("pushed");
    push(&s.cache, &url, tip, "fleet/t/run1").expect("pushed again, a no-op");
    assert_eq!(
        git(&target, &["rev-parse", "refs/heads/fleet/t/run1"]),
        tip.to_string()
    );
    assert_eq!(
        git(
            &target,
            &["log", "-1", "--format=%an <%ae>", "fleet/t/run1"]
        ),
        "Ada <ada@example.org>"
    );
    assert!(push(&s.cache, &url, s.base, "fleet/t/run1").is_err());
}

#[test]
fn a_bundle_with_a_rewritten_history_or_another_base_is_refused() {
    let s = Setup::new();
    // A new root: the whole history replaced.
    git(&s.guest(), &["checkout", "-q", "--orphan", "rewritten"]);
    let _ = git(&s.guest(), &["rm", "-rqf", "--cached", "."]);
    let root = s.commit("EVIL", "replaced\n");
    git(&s.guest(), &["branch", "-qM", "rewritten", "fleet/t"]);
    let bundle = s.bundle("fleet/t");
    assert_eq!(
        accept_bundle(&s.cache, &bundle, s.base, "fleet/t"),
        Err(BundleRefused::NotDescendant(
            root.to_string(),
            s.base.to_string()
        ))
    );
    // Built on a commit the host never fetched.
    let other = s.commit("MORE", "more\n");
    let bundle = s.bundle(&format!("{root}..fleet/t"));
    assert_eq!(
        accept_bundle(&s.cache, &bundle, s.base, "fleet/t"),
        Err(BundleRefused::ForeignBase(root.to_string()))
    );
    let _ = other;
}

#[test]
fn a_bundle_with_another_ref_too_large_or_malformed_is_refused() {
    let s = Setup::new();
    s.commit("README", "changed\n");
    git(&s.guest(), &["branch", "-q", "main-too"]);
    let bundle = s.bundle(&format!("{}..main-too", s.base));
    assert_eq!(
        accept_bundle(&s.cache, &bundle, s.base, "fleet/t"),
        Err(BundleRefused::OtherRef(
            "refs/heads/main-too".into(),
            "refs/heads/fleet/t".into()
        ))
    );
    let both = {
        let file = s.dir.path().join("both.bundle");
        git(
            &s.guest(),
            &[
                "bundle",
                "create",
                "-q",
                &file.to_string_lossy(),
                &format!("^{}", s.base),
                "fleet/t",
                "main-too",
            ],
        );
        std::fs::read(file).expect("bundle")
    };
    assert!(matches!(
        accept_bundle(&s.cache, &both, s.base, "fleet/t"),
        Err(BundleRefused::OtherRef(..))
    ));
    assert_eq!(
        accept_bundle(&s.cache, &vec![0; MAX_BUNDLE_BYTES + 1], s.base, "fleet/t"),
        Err(BundleRefused::TooLarge(MAX_BUNDLE_BYTES + 1))
    );
    assert!(matches!(
        accept_bundle(&s.cache, b"# v2 git bundle\n-zz\n\n", s.base, "fleet/t"),
        Err(BundleRefused::Malformed(_))
    ));
    assert!(matches!(
        accept_bundle(&s.cache, b"MZ\x90\x00", s.base, "fleet/t"),
        Err(BundleRefused::Malformed(_))
    ));
    // A pack whose bytes were changed does not index.
    let mut bundle = s.bundle(&format!("{}..fleet/t", s.base));
    let last = bundle.len() - 30;
    bundle[last] ^= 0xff;
    assert!(matches!(
        accept_bundle(&s.cache, &bundle, s.base, "fleet/t"),
        Err(BundleRefused::BadPack(_))
    ));
}

#[test]
fn a_bundle_that_asks_for_a_filter_or_a_hook_runs_nothing_on_the_host() {
    let s = Setup::new();
    let marker = s.dir.path().join("ran");
    // The guest's checkout asks for a clean/smudge filter and carries a hook script; the
    // host reads the bundle's objects only, so neither ever runs.
    std::fs::write(s.guest().join(".gitattributes"), "* filter=evil\n").expect("write");
    std::fs::create_dir_all(s.guest().join("hooks")).expect("mkdir");
    std::fs::write(
        s.guest().join("hooks/post-checkout"),
        format!("#!/bin/sh\ntouch {}\n", marker.display()),
    )
    .expect("write");
    let tip = s.commit("code", "x\n");
    let bundle = s.bundle(&format!("{}..fleet/t", s.base));
    let accepted = accept_bundle(&s.cache, &bundle, s.base, "fleet/t").expect("accepted");
    assert_eq!(accepted.tip, tip);
    let change = change(&s.cache, s.base, tip).expect("change");
    assert_eq!(change.files_changed, 3);
    let target = s.dir.path().join("target.git");
    git2::Repository::init_bare(&target).expect("target");
    git(
        &target,
        &[
            "config",
            "filter.evil.clean",
            &format!("touch {}", marker.display()),
        ],
    );
    push(&s.cache, &target.to_string_lossy(), tip, "fleet/t/r").expect("pushed");
    assert!(!marker.exists(), "something ran on the host");
}

#[test]
fn a_check_leaves_the_cache_as_it_was_and_pushes_from_its_scratch_repository() {
    let s = Setup::new();
    let packs = |s: &Setup| {
        let mut names: Vec<String> = std::fs::read_dir(s.cache.path().join("objects/pack"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let before = packs(&s);
    let tip = s.commit("README", "changed\n");
    let bundle = s.bundle(&format!("{}..fleet/t", s.base));
    let target = s.dir.path().join("target.git");
    git2::Repository::init_bare(&target).expect("target");
    let to = PushTo {
        url: target.to_string_lossy().into_owned(),
        branch: "fleet/t/r1".into(),
        credential: None,
    };
    let checked = check(
        s.cache.path(),
        &bundle,
        &s.base.to_string(),
        "fleet/t",
        Some(&to),
        &crate::spec::HostGit::default(),
    )
    .expect("checked");
    assert_eq!(checked.changes.refused, None);
    assert_eq!(checked.changes.head, Some(tip.to_string()));
    assert_eq!(
        (checked.changes.commits, checked.changes.files_changed),
        (1, 1)
    );
    assert!(checked.patch.contains("+changed"), "{}", checked.patch);
    assert_eq!(
        checked.changes.pushed,
        Some(format!("{} fleet/t/r1", to.url))
    );
    assert_eq!(
        git(&target, &["rev-parse", "refs/heads/fleet/t/r1"]),
        tip.to_string()
    );
    // A refused bundle too: nothing of either reached the cache.
    let refused = check(
        s.cache.path(),
        b"# v2 git bundle\n\n",
        &s.base.to_string(),
        "fleet/t",
        None,
        &crate::spec::HostGit::default(),
    )
    .expect("checked");
    assert!(refused.changes.refused.is_some());
    assert_eq!(packs(&s), before);
    assert!(
        s.cache.find_commit(tip).is_err(),
        "the cache never holds a run's commits"
    );
}
