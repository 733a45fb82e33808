//! The command line and the repository around it: usage errors, the
//! guest list, the docs, the tests' own folders and skips.

mod common;

use std::process::Command;

use common::*;

fn kvmsim_plain(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_254_and_help_exits_0() {
    for args in [
        &["run", "--bogus"][..],
        &[][..],
        &["nonsense"][..],
        &["run", "--arg", "x"][..],
    ] {
        let (st, _, err) = kvmsim_plain(args);
        assert_eq!(st, 254, "kvmsim {args:?}: {err}");
        assert!(
            err.contains("error:") || err.contains("Usage: kvmsim"),
            "{err}"
        );
    }
    for args in [&["--help"][..], &["run", "--help"][..], &["--version"][..]] {
        let (st, out, _) = kvmsim_plain(args);
        assert_eq!(st, 0, "kvmsim {args:?}");
        assert!(!out.is_empty());
    }
    let (_, out, _) = kvmsim_plain(&["run", "--help"]);
    assert!(out.contains("--no-stdin"), "{out}");
}

#[test]
fn guests_lists_each_guest_with_what_it_does_and_its_arguments() {
    let (st, out, _) = kvmsim_plain(&["guests"]);
    assert_eq!(st, 0);
    for (name, _) in guests::GUESTS {
        let a = guests::about(name).unwrap();
        let line = out
            .lines()
            .position(|l| l.starts_with(&format!("builtin:{name} ")))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[line].contains(a.about), "{}", lines[line]);
        assert!(lines[line + 1].contains(&format!("args: {}", a.args)));
    }
}

#[test]
fn the_readme_names_every_built_in_guest() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n## Guests")
        .nth(1)
        .expect("README has a Guests section");
    for (name, _) in guests::GUESTS {
        assert!(
            section.contains(&format!("`{name}`")),
            "README's Guests section does not name `{name}`"
        );
    }
}

#[test]
fn the_docs_cite_only_files_in_the_repository() {
    let repo = repo();
    for doc in ["README.md", "docs/ARCHITECTURE.md"] {
        let text = std::fs::read_to_string(repo.join(doc)).unwrap();
        for word in text.split(|c: char| !(c.is_alphanumeric() || "._-/".contains(c))) {
            let Some(stem) = word.strip_suffix(".md") else {
                continue;
            };
            if stem.is_empty() {
                continue;
            }
            let found = [repo.join(word), repo.join("docs").join(word)]
                .iter()
                .any(|p| p.is_file());
            assert!(found, "{doc} cites {word}, which is not in the repository");
        }
    }
}

#[test]
fn test_folders_go_when_the_test_passes_and_stay_when_it_fails() {
    // Passed: removed with the last handle, here a run's.
    let d = outdir("guard-pass");
    std::fs::create_dir_all(&*d).unwrap();
    std::fs::write(d.join("f"), "x").unwrap();
    let r = kvmsim(&["run"], &d.join("o"));
    let path = d.to_path_buf();
    drop(d);
    assert!(path.exists(), "the run still holds it");
    drop(r);
    assert!(!path.exists(), "{} left behind", path.display());
    // Failed: kept for inspection.
    let failing = std::thread::spawn(|| {
        let d = outdir("guard-fail");
        std::fs::create_dir_all(&*d).unwrap();
        panic!("a failing test ({})", d.display());
    });
    assert!(failing.join().is_err());
    let kept = std::env::temp_dir().join(format!("kvmsim-test-{}-guard-fail", std::process::id()));
    assert!(kept.is_dir(), "a failing test's folder was removed");
    std::fs::remove_dir_all(&kept).unwrap();
}

#[test]
fn tests_that_cannot_run_here_are_counted_as_ignored() {
    // build.rs marks the tests ignored from the same facts the tests check
    // when they run: the summary's "ignored" count is where a skip shows.
    let require_kvm = std::env::var("KVMSIM_REQUIRE_KVM").as_deref() == Ok("1");
    let device = std::env::var_os("KVMSIM_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .is_ok();
    assert_eq!(
        cfg!(kvmsim_no_kvm),
        !kvm && !require_kvm,
        "built with a different KVM than this run has: rebuild (touch crates/kvmsim/build.rs)"
    );
    let linux_dir = std::env::var_os("KVMSIM_LINUX_DIR").is_some_and(|d| !d.is_empty());
    let require_linux = std::env::var("KVMSIM_REQUIRE_LINUX").as_deref() == Ok("1");
    assert_eq!(
        cfg!(kvmsim_linux_guest),
        linux_dir || require_linux,
        "built with a different Linux guest than this run has: rebuild (touch crates/kvmsim/build.rs)"
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn host_notices_are_said_once_per_process_not_once_per_system() {
    if !kvm_or_skip("notices") {
        return;
    }
    let (dir, cfg) = config(
        "notices",
        "[[system]]\nkernel = \"builtin:hello\"\nmemory = \"16MiB\"\n\
         [[system]]\nkernel = \"builtin:hello\"\nmemory = \"16MiB\"\n\
         [[system]]\nkernel = \"builtin:hello\"\nmemory = \"16MiB\"\n",
    );
    let r = kvmsim(&["run", &cfg, "--quiet"], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "{}", r.stderr);
    let want = usize::from(kvm::doctor::cached().needs_syscall_repair());
    assert_eq!(
        r.stderr.matches("repair applied").count(),
        want,
        "{}",
        r.stderr
    );
}
