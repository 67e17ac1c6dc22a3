//! A/B model slots and the state file: everything the agent keeps on disk,
//! and the only code that changes it.
//!
//! # Layout of `state_dir`
//!
//! ```text
//! state.json            the state file (below); replaced atomically
//! slot-a.outpost        a verified bundle (or absent)
//! slot-b.outpost        the other one
//! slot-X.outpost.part   a download in progress into the inactive slot X
//! ```
//!
//! # Why a kill -9 or power cut at any point is safe
//!
//! Every change is "write a temporary file, fsync it, rename it over the
//! real one, fsync the directory": a rename is atomic, so after a crash each
//! name holds the old content or the new, never half of either, and the
//! directory fsync makes the rename itself survive a power cut. The order of
//! an update is:
//!
//! 1. download into `slot-X.outpost.part` (X = the inactive slot; the active
//!    slot is never written while it is active);
//! 2. once the bundle verified: fsync, rename to `slot-X.outpost`, fsync
//!    the directory ([`Slots::install`]);
//! 3. load and self-test it in memory; only if that passes, write the state
//!    file saying "X is active, on probation, previous = Y"
//!    ([`Slots::activate`]) — **this one rename is the switch on disk**;
//! 4. switch traffic in memory (see `activation`);
//! 5. after probation, [`Slots::commit`] or [`Slots::roll_back`].
//!
//! A crash before step 3 boots on Y with X ignored (and the download resumes
//! or the slot file is reused); a crash after it boots on X still on
//! probation, with the boot counter raised ([`Slots::count_boot`]), so a
//! version that keeps crashing the device is abandoned after
//! `max_boots`. At boot the active slot is verified again before it serves;
//! if it does not verify, the agent falls back to the other slot.
//!
//! # A disk that refuses writes at boot
//!
//! A full or read-only disk must not stop a device from serving the model
//! it has verified. Until [`Slots::booted`], a change that cannot be saved
//! stays in memory and is saved later ([`Slots::retry_save`]): the boot's
//! decisions (count a boot, roll back a crash loop, forget a slot that no
//! longer verifies) are made again from the disk's state after a crash, so
//! acting on them before they are saved loses nothing. After boot every
//! change is saved before it counts, as before. Message counters are
//! handed out only below a reservation that is on disk, so an unsaved
//! reservation means no signed message until the disk takes it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use outpost_runtime::bundle::Digest;
use outpost_runtime::protocol::{Directive, ModelRef, Probation};
use serde::{Deserialize, Serialize};

/// The state file's format number.
pub const STATE_FILE_FORMAT: u32 = 1;
/// The state file is small; a bigger one is corrupt, not a state file.
const STATE_FILE_LIMIT: u64 = 1 << 20;
/// Device message counters are reserved this many at a time, so the counter
/// survives restarts without an fsync per message.
const COUNTER_BLOCK: u64 = 100_000;

/// Errors reading or writing the slots and the state file.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: corrupt state file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SlotError + '_ {
    move |source| SlotError::Io { path: path.to_path_buf(), source }
}

/// One of the two slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            SlotName::A => "slot-a.outpost",
            SlotName::B => "slot-b.outpost",
        }
    }
}

/// What a slot holds: a bundle that verified when it was installed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub model: String,
    pub version: String,
    /// sha256 of the whole bundle file.
    pub bundle_sha256: Digest,
    /// sha256 of its signed manifest (how the bundle is re-verified at boot).
    pub manifest_sha256: Digest,
    /// The directive that installed it.
    pub directive_sequence: u64,
}

impl SlotRecord {
    pub fn model_ref(&self) -> ModelRef {
        ModelRef { name: self.model.clone(), version: self.version.clone() }
    }
}

/// The persisted state. Small JSON, replaced atomically on every change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub active: Option<SlotName>,
    pub slot_a: Option<SlotRecord>,
    pub slot_b: Option<SlotRecord>,
    /// Whether the active slot passed probation.
    pub committed: bool,
    /// During probation: the slot to roll back to.
    pub previous: Option<SlotName>,
    /// Probation parameters of the current trial.
    pub probation: Option<Probation>,
    /// Boots since the current trial began (crash-loop detection).
    pub boots_in_probation: u32,
    /// The last directive sequence accepted (replay/downgrade protection).
    pub last_sequence: Option<u64>,
    /// Highest online-key certificate serial seen (revokes rotated-out keys).
    pub min_certificate_serial: u64,
    /// The accepted directive still being carried out (download, activation).
    pub target: Option<Directive>,
    /// sha256 of the sealed directive bytes last accepted: the retained
    /// message arrives again after every reconnect and is then no news.
    pub accepted_envelope: Option<Digest>,
    pub last_error: Option<String>,
    pub rollback_reason: Option<String>,
    pub rolled_back_from: Option<ModelRef>,
    /// Device message counters below this may have been used.
    pub counter_reserved: u64,
}

impl Default for StateFile {
    fn default() -> StateFile {
        StateFile {
            format: STATE_FILE_FORMAT,
            active: None,
            slot_a: None,
            slot_b: None,
            committed: false,
            previous: None,
            probation: None,
            boots_in_probation: 0,
            last_sequence: None,
            min_certificate_serial: 0,
            target: None,
            accepted_envelope: None,
            last_error: None,
            rollback_reason: None,
            rolled_back_from: None,
            counter_reserved: 0,
        }
    }
}

impl StateFile {
    pub fn record(&self, slot: SlotName) -> Option<&SlotRecord> {
        match slot {
            SlotName::A => self.slot_a.as_ref(),
            SlotName::B => self.slot_b.as_ref(),
        }
    }

    fn record_mut(&mut self, slot: SlotName) -> &mut Option<SlotRecord> {
        match slot {
            SlotName::A => &mut self.slot_a,
            SlotName::B => &mut self.slot_b,
        }
    }

    pub fn active_record(&self) -> Option<&SlotRecord> {
        self.active.and_then(|s| self.record(s))
    }

    /// Whether a trial is running.
    pub fn in_probation(&self) -> bool {
        self.active.is_some() && !self.committed && self.probation.is_some()
    }
}

/// The slots directory and its state file.
#[derive(Debug)]
pub struct Slots {
    dir: PathBuf,
    state: StateFile,
    /// Next device message counter to hand out.
    next_counter: u64,
    /// The counter reservation the disk holds (counters below it are safe
    /// to use: a restart starts above it).
    persisted_reserved: u64,
    /// Memory holds changes the disk does not (boot only; see the module docs).
    unsaved: bool,
    /// Still booting: unsaved changes are kept, not undone.
    booting: bool,
}

impl Slots {
    /// Opens (creating) `dir`, reads the state file, and reserves a block of
    /// message counters.
    pub fn open(dir: &Path) -> Result<Slots, SlotError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("state.json");
        let state = match File::open(&path) {
            Ok(file) => {
                use std::io::Read;
                let mut text = String::new();
                file.take(STATE_FILE_LIMIT + 1).read_to_string(&mut text).map_err(io(&path))?;
                if text.len() as u64 > STATE_FILE_LIMIT {
                    return Err(SlotError::Corrupt { path, reason: "over 1 MiB".into() });
                }
                let state: StateFile = serde_json::from_str(&text)
                    .map_err(|e| SlotError::Corrupt { path: path.clone(), reason: e.to_string() })?;
                if state.format != STATE_FILE_FORMAT {
                    return Err(SlotError::Corrupt { path, reason: format!("format {} is unknown", state.format) });
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(SlotError::Io { path, source: e }),
        };
        let next_counter = state.counter_reserved;
        let mut slots =
            Slots { dir: dir.to_path_buf(), next_counter, persisted_reserved: next_counter, state, unsaved: false, booting: true };
        slots.update(|s| s.counter_reserved = next_counter + COUNTER_BLOCK)?;
        Ok(slots)
    }

    /// Boot is over: from now on a change that cannot be saved is undone
    /// (and reported), as the crash-safety argument needs.
    pub fn booted(&mut self) {
        self.booting = false;
    }

    /// Whether memory holds changes the disk does not.
    pub fn unsaved(&self) -> bool {
        self.unsaved
    }

    /// Tries again to save changes the disk refused at boot.
    pub fn retry_save(&mut self) -> Result<(), SlotError> {
        if !self.unsaved {
            return Ok(());
        }
        self.save()
    }

    pub fn state(&self) -> &StateFile {
        &self.state
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Changes the state and writes it out atomically. While booting, a
    /// change the disk refuses is kept in memory (logged, saved later by
    /// [`retry_save`](Self::retry_save)); after boot it is undone and the
    /// error returned.
    pub fn update(&mut self, change: impl FnOnce(&mut StateFile)) -> Result<(), SlotError> {
        let before = self.state.clone();
        change(&mut self.state);
        if let Err(e) = self.save() {
            if self.booting {
                log::error!("{e}: serving on, saving the state again later");
                self.unsaved = true;
                return Ok(());
            }
            // Memory must not claim what the disk does not hold.
            self.state = before;
            return Err(e);
        }
        Ok(())
    }

    /// The next device message counter (strictly rising across restarts):
    /// only ever below a reservation the disk holds.
    pub fn next_counter(&mut self) -> Result<u64, SlotError> {
        if self.next_counter >= self.persisted_reserved {
            let reserved = self.next_counter + COUNTER_BLOCK;
            let state = self.state.clone();
            self.state.counter_reserved = reserved;
            if let Err(e) = self.save() {
                // Even while booting: a counter the disk has not reserved
                // could be handed out again after a restart.
                self.state = state;
                return Err(e);
            }
        }
        let c = self.next_counter;
        self.next_counter += 1;
        Ok(c)
    }

    pub fn slot_path(&self, slot: SlotName) -> PathBuf {
        self.dir.join(slot.file_name())
    }

    /// Where a download into `slot` is written until it verified.
    pub fn part_path(&self, slot: SlotName) -> PathBuf {
        self.dir.join(format!("{}.part", slot.file_name()))
    }

    /// The slot a new bundle goes to: never the active one, nor (during
    /// probation) the one to roll back to — so during a trial a new
    /// directive has to wait (see `agent`).
    pub fn inactive(&self) -> SlotName {
        self.state.active.map(SlotName::other).unwrap_or(SlotName::A)
    }

    /// Step 2: the verified download becomes the slot's bundle. fsync the
    /// file, rename it over the slot file, fsync the directory. The slot's
    /// record is cleared first, so a crash in between never leaves a record
    /// describing other bytes.
    pub fn install(&mut self, slot: SlotName, record: SlotRecord) -> Result<(), SlotError> {
        if self.state.active == Some(slot) {
            return Err(SlotError::Io {
                path: self.slot_path(slot),
                source: std::io::Error::other("refusing to overwrite the active slot"),
            });
        }
        self.update(|s| *s.record_mut(slot) = None)?;
        let part = self.part_path(slot);
        let target = self.slot_path(slot);
        File::open(&part).and_then(|f| f.sync_all()).map_err(io(&part))?;
        crate::test_hooks::pause_at("rename");
        std::fs::rename(&part, &target).map_err(io(&target))?;
        sync_dir(&self.dir)?;
        self.update(|s| *s.record_mut(slot) = Some(record))
    }

    /// Step 3, **the switch on disk**: `slot` becomes active and on trial,
    /// the active one becomes the one to roll back to.
    pub fn activate(&mut self, slot: SlotName, probation: Probation) -> Result<(), SlotError> {
        self.update(|s| {
            s.previous = s.active.filter(|a| *a != slot && s.record(*a).is_some());
            s.active = Some(slot);
            s.committed = false;
            s.probation = Some(probation);
            s.boots_in_probation = 0;
            s.target = None;
            s.rollback_reason = None;
            s.rolled_back_from = None;
            s.last_error = None;
        })
    }

    /// The trial passed: the active slot is committed.
    pub fn commit(&mut self) -> Result<(), SlotError> {
        self.update(|s| {
            s.committed = true;
            s.previous = None;
            s.probation = None;
            s.boots_in_probation = 0;
        })
    }

    /// The trial failed: back to the previous slot (if any), with the
    /// reason. Returns the slot now active.
    pub fn roll_back(&mut self, reason: &str) -> Result<Option<SlotName>, SlotError> {
        let from = self.state.active_record().map(SlotRecord::model_ref);
        self.update(|s| {
            s.active = s.previous.take().or(s.active);
            s.committed = true;
            s.probation = None;
            s.boots_in_probation = 0;
            s.rollback_reason = Some(reason.to_string());
            s.rolled_back_from = from;
        })?;
        Ok(self.state.active)
    }

    /// Raises the boot counter of a running trial (called once per start).
    pub fn count_boot(&mut self) -> Result<u32, SlotError> {
        if self.state.in_probation() {
            self.update(|s| s.boots_in_probation += 1)?;
        }
        Ok(self.state.boots_in_probation)
    }

    /// Forgets a slot whose file no longer verifies.
    pub fn forget(&mut self, slot: SlotName) -> Result<(), SlotError> {
        self.update(|s| {
            *s.record_mut(slot) = None;
            if s.active == Some(slot) {
                s.active = None;
            }
            if s.previous == Some(slot) {
                s.previous = None;
            }
        })
    }

    fn save(&mut self) -> Result<(), SlotError> {
        let path = self.dir.join("state.json");
        let text = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| SlotError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        write_atomically(&path, &text)?;
        self.unsaved = false;
        self.persisted_reserved = self.state.counter_reserved;
        Ok(())
    }
}

/// Temporary file, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SlotError> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(io(path))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// fsync a directory, so renames and creations in it survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), SlotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(v: &str) -> SlotRecord {
        SlotRecord {
            model: "m".into(),
            version: v.into(),
            bundle_sha256: Digest([1; 32]),
            manifest_sha256: Digest([2; 32]),
            directive_sequence: 1,
        }
    }

    #[test]
    fn install_activate_roll_back_commit_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        assert_eq!(s.inactive(), SlotName::A);
        std::fs::write(s.part_path(SlotName::A), b"bundle-a").unwrap();
        s.install(SlotName::A, record("1.0.0")).unwrap();
        s.activate(SlotName::A, Probation::default()).unwrap();
        s.commit().unwrap();
        std::fs::write(s.part_path(SlotName::B), b"bundle-b").unwrap();
        s.install(SlotName::B, record("2.0.0")).unwrap();
        s.activate(SlotName::B, Probation::default()).unwrap();
        assert_eq!(s.state().previous, Some(SlotName::A));
        drop(s);
        let mut s = Slots::open(dir.path()).unwrap();
        assert!(s.state().in_probation());
        assert_eq!(s.count_boot().unwrap(), 1);
        assert_eq!(s.roll_back("crash loop").unwrap(), Some(SlotName::A));
        let s = Slots::open(dir.path()).unwrap();
        assert_eq!(s.state().active, Some(SlotName::A));
        assert_eq!(s.state().rolled_back_from.as_ref().map(|m| m.version.as_str()), Some("2.0.0"));
        assert_eq!(std::fs::read(s.slot_path(SlotName::B)).unwrap(), b"bundle-b");
    }

    #[test]
    fn counters_rise_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        let a = s.next_counter().unwrap();
        let b = s.next_counter().unwrap();
        assert!(b > a);
        drop(s);
        let mut s = Slots::open(dir.path()).unwrap();
        assert!(s.next_counter().unwrap() > b);
    }

    #[test]
    fn a_disk_refusing_writes_at_boot_keeps_the_state_in_memory_until_it_saves() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        std::fs::write(s.part_path(SlotName::A), b"bundle-a").unwrap();
        s.install(SlotName::A, record("1.0.0")).unwrap();
        s.activate(SlotName::A, Probation::default()).unwrap();
        let used = s.next_counter().unwrap();
        drop(s);
        let on_disk = std::fs::read(dir.path().join("state.json")).unwrap();
        // A directory where the temporary copy goes: every save fails.
        let obstacle = dir.path().join("state.tmp");
        std::fs::create_dir(&obstacle).unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        assert!(s.unsaved());
        assert_eq!(s.state().active, Some(SlotName::A));
        // Boot decisions stand in memory.
        assert_eq!(s.count_boot().unwrap(), 1);
        assert_eq!(s.state().boots_in_probation, 1);
        // No counter without a reservation on disk.
        assert!(s.next_counter().is_err());
        s.booted();
        // After boot a refused change is undone.
        assert!(s.update(|st| st.last_error = Some("x".into())).is_err());
        assert_eq!(s.state().last_error, None);
        assert!(s.retry_save().is_err());
        assert_eq!(std::fs::read(dir.path().join("state.json")).unwrap(), on_disk);
        std::fs::remove_dir(&obstacle).unwrap();
        s.retry_save().unwrap();
        assert!(!s.unsaved());
        assert!(s.next_counter().unwrap() > used);
        let reopened = Slots::open(dir.path()).unwrap();
        assert_eq!(reopened.state().boots_in_probation, 1, "the boot's change reached the disk");
    }

    #[test]
    fn never_overwrites_the_active_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Slots::open(dir.path()).unwrap();
        std::fs::write(s.part_path(SlotName::A), b"x").unwrap();
        s.install(SlotName::A, record("1.0.0")).unwrap();
        s.activate(SlotName::A, Probation::default()).unwrap();
        assert!(s.install(SlotName::A, record("1.0.1")).is_err());
    }
}
