//! The workspace's house rules, checked on its files: every Rust file opens
//! with a `//!` comment saying what it is for, every crate takes its
//! dependencies from `[workspace.dependencies]`, and every dependency a crate
//! names is used by it. The toolchain is pinned in `rust-toolchain.toml`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace holds crates/rookery")
        .to_owned()
}

/// The workspace's member folders.
fn crates() -> Vec<PathBuf> {
    let mut crates: Vec<PathBuf> = std::fs::read_dir(workspace().join("crates"))
        .expect("crates/")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.join("Cargo.toml").is_file())
        .collect();
    crates.sort();
    assert!(crates.len() > 10, "found the crates: {crates:?}");
    crates
}

fn rust_files(folder: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// Every Rust file of a crate: sources, tests, benchmarks, examples.
fn crate_files(krate: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for folder in ["src", "tests", "benches", "examples"] {
        rust_files(&krate.join(folder), &mut files);
    }
    files
}

fn manifest(path: &Path) -> toml::Table {
    std::fs::read_to_string(path)
        .expect("a manifest")
        .parse()
        .expect("the manifest parses")
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    let mut files = Vec::new();
    for krate in crates() {
        files.extend(crate_files(&krate));
    }
    rust_files(&workspace().join("fuzz/fuzz_targets"), &mut files);
    let silent: Vec<String> = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file).expect("readable");
            !text.trim_start().starts_with("//!")
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(
        silent.is_empty(),
        "these files do not open with a //! comment: {silent:#?}"
    );
}

#[test]
fn crates_take_their_dependencies_from_the_workspace() {
    let mut outside = Vec::new();
    for krate in crates() {
        let manifest = manifest(&krate.join("Cargo.toml"));
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            let Some(dependencies) = manifest.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for (name, spec) in dependencies {
                let inherited = spec
                    .as_table()
                    .and_then(|spec| spec.get("workspace"))
                    .and_then(|workspace| workspace.as_bool())
                    == Some(true);
                if !inherited {
                    outside.push(format!("{}: [{section}] {name}", krate.display()));
                }
            }
        }
    }
    assert!(
        outside.is_empty(),
        "declare these in [workspace.dependencies] and use `workspace = true`: {outside:#?}"
    );
}

#[test]
fn every_dependency_is_used() {
    let mut unused = Vec::new();
    for krate in crates() {
        let manifest = manifest(&krate.join("Cargo.toml"));
        let text: String = crate_files(&krate)
            .iter()
            .map(|file| std::fs::read_to_string(file).expect("readable"))
            .collect();
        let mut names = BTreeSet::new();
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            if let Some(dependencies) = manifest.get(section).and_then(|d| d.as_table()) {
                names.extend(dependencies.keys().cloned());
            }
        }
        for name in names {
            let ident = name.replace('-', "_");
            let used = [
                format!("{ident}::"),
                format!("use {ident}"),
                format!("{ident}!"),
            ]
            .iter()
            .any(|pattern| text.contains(pattern.as_str()));
            if !used {
                unused.push(format!("{}: {name}", krate.display()));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "dependencies no file of their crate uses: {unused:#?}"
    );
}

#[test]
fn the_toolchain_is_pinned() {
    let toolchain = manifest(&workspace().join("rust-toolchain.toml"));
    let channel = toolchain["toolchain"]["channel"]
        .as_str()
        .expect("a channel");
    assert!(
        channel.split('.').count() == 3 && channel.split('.').all(|n| n.parse::<u32>().is_ok()),
        "a release such as 1.95.0, not {channel:?}"
    );
    let workspace_manifest = manifest(&workspace().join("Cargo.toml"));
    let rust_version = workspace_manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("a rust-version");
    let release = |version: &str| -> Vec<u32> {
        version
            .split('.')
            .map(|n| n.parse().expect("a number"))
            .collect()
    };
    assert!(
        release(channel) >= release(rust_version),
        "the pinned {channel} builds what rust-version {rust_version} promises"
    );
}
