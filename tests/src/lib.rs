//! End-to-end tests across Outpost's crates and of the files that ship beside
//! the binaries (`images/`, `scripts/`). The tests live next to this crate's
//! manifest; this library only gives them a package to belong to.

use std::path::PathBuf;

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().expect("tests/ has a parent").to_path_buf()
}
