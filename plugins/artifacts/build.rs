//! Compiles every plugin under plugins/ (and the test fixtures under tests/components/) to a
//! wasm32-wasip2 component, as wasmtime's test-programs and Spin's test-components do, so that
//! no test or demo needs a manual step.
//!
//! The plugins are built by a nested `cargo build` into `<target>/plugins`, a target directory
//! of its own: sharing the outer build's directory would wait forever on its lock. The paths of
//! the results become constants of this crate (see src/lib.rs).

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let plugins_dir = manifest_dir.parent().unwrap();
    let workspace = plugins_dir.parent().unwrap();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target_dir = cargo_target_dir(&out_dir).join("plugins");

    let mut plugins = guest_crates(plugins_dir);
    plugins.extend(guest_crates(&workspace.join("tests").join("components")));
    for watched in ["plugins", "tests/components", "sdk", "wit", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(workspace).args(["build", "--release", "--target", TARGET, "--target-dir"]).arg(&target_dir);
    for plugin in &plugins {
        build.args(["--package", plugin]);
    }
    // The outer build's flags and profile settings are for the host, not for the guests.
    // (A wrapper such as clippy-driver under `cargo clippy` is for the outer build too.)
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        build.env_remove(var);
    }
    // Plugins need no debug info: smaller components compile faster in the host.
    build.env("CARGO_PROFILE_RELEASE_DEBUG", "false");

    let status = build.status().expect("failed to run cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the plugins for {TARGET} failed ({status}); is the target installed? \
             Run `rustup target add {TARGET}`"
        );
    }

    let mut constants = String::new();
    for plugin in &plugins {
        // Libraries (plugins) get underscores in their file names, binaries keep the dashes.
        let release = target_dir.join(TARGET).join("release");
        let file = [plugin.replace('-', "_"), plugin.clone()]
            .map(|stem| release.join(format!("{stem}.wasm")))
            .into_iter()
            .find(|file| file.exists())
            .unwrap_or_else(|| panic!("the plugin build did not produce {plugin}.wasm in {}", release.display()));
        let name = plugin.to_uppercase().replace('-', "_");
        let path = file.display().to_string();
        writeln!(constants, "/// Path of the `{plugin}` component.\npub const {name}: &str = {path:?};").unwrap();
        writeln!(
            constants,
            "/// The `{plugin}` component's bytes.\npub const {name}_WASM: &[u8] = include_bytes!({path:?});"
        )
        .unwrap();
    }
    writeln!(constants, "/// Every plugin component, by crate name.\npub const ALL: &[(&str, &str)] = &[").unwrap();
    for plugin in &plugins {
        writeln!(constants, "    ({plugin:?}, {}),", plugin.to_uppercase().replace('-', "_")).unwrap();
    }
    constants.push_str("];\n");
    std::fs::write(out_dir.join("plugins.rs"), constants).unwrap();
}

/// Every crate directly under `dir` except this one, by package name (= directory name).
fn guest_crates(dir: &Path) -> Vec<String> {
    let mut plugins: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.join("Cargo.toml").exists() && !path.ends_with("artifacts"))
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    plugins.sort();
    plugins
}

/// The target directory of the outer build: the ancestor of OUT_DIR where cargo keeps
/// `.rustc_info.json` or its CACHEDIR.TAG (this respects CARGO_TARGET_DIR and `--target-dir`).
/// Both, because cargo writes the tag only into a target directory it creates itself, and
/// `tests/run` may have created `target/` first (for the Tansu broker).
fn cargo_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join(".rustc_info.json").exists() || dir.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| panic!("no cargo target directory above {}", out_dir.display()))
        .to_path_buf()
}
