//! **Test-only** fault injection. `OUTPOST_TEST_PAUSE_AT=<step>` makes the
//! agent stop at that step of an update — it creates
//! `<state_dir>/paused-at-<step>` and then sleeps until it is killed — so
//! the fault-injection tests can SIGKILL it at a precise point. Steps:
//!
//! - `download`: half of the bundle downloaded and written;
//! - `rename`: the download verified and fsynced, just before its rename
//!   into the slot;
//! - `slot-written`: the slot file in place, before the state file switches
//!   to it;
//! - `probation`: serving the new version on trial.
//!
//! Never set it on a real device: the agent would hang at that step (the
//! systemd watchdog would then restart it).

use std::path::PathBuf;
use std::sync::OnceLock;

static STATE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Remembers where to put the marker files.
pub fn init(state_dir: PathBuf) {
    let _ = STATE_DIR.set(state_dir);
}

/// Stops here forever if `OUTPOST_TEST_PAUSE_AT` names `step`.
pub fn pause_at(step: &str) {
    if std::env::var("OUTPOST_TEST_PAUSE_AT").ok().as_deref() != Some(step) {
        return;
    }
    log::warn!("OUTPOST_TEST_PAUSE_AT={step}: pausing here until killed (test hook)");
    if let Some(dir) = STATE_DIR.get() {
        let _ = std::fs::write(dir.join(format!("paused-at-{step}")), b"");
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
