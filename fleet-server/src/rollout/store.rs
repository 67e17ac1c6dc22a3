//! Rollout records in the registry's SQLite file (table `rollouts`,
//! migration 3): one row per rollout, the whole [`Rollout`] as JSON plus
//! the columns queries need (model, state).
//!
//! A record is rewritten in one transaction per transition, with the
//! actions the transition decided (its outbox) inside it: the registry runs
//! with `synchronous=FULL`, so once [`Store::save`] returns the transition
//! survives a power cut, and the driver only then acts.
//!
//! "One live rollout per model" is checked inside the inserting
//! transaction, so two concurrent `rollout start`s cannot both win.

use std::sync::Arc;

use rusqlite::{params, OptionalExtension};

use super::machine::{Rollout, State};
use crate::registry::{Registry, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("model {model} already has rollout {id} ({state}); one rollout per model at a time")]
    Busy { id: String, model: String, state: String },
    #[error("the stored record of rollout {0} is damaged: {1}")]
    Damaged(String, String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Registry(RegistryError::Sqlite(e))
    }
}

#[derive(Clone)]
pub struct Store {
    registry: Arc<Registry>,
}

fn encode(r: &Rollout) -> Result<String, StoreError> {
    serde_json::to_string(r).map_err(|e| StoreError::Damaged(r.id.clone(), e.to_string()))
}

fn decode(id: &str, text: &str) -> Result<Rollout, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Damaged(id.to_string(), e.to_string()))
}

impl Store {
    pub fn new(registry: Arc<Registry>) -> Store {
        Store { registry }
    }

    /// Inserts a new rollout, refusing it while another rollout of the same
    /// model is running or paused.
    pub fn insert(&self, r: &Rollout) -> Result<(), StoreError> {
        let text = encode(r)?;
        let mut busy = None;
        self.registry.with_transaction(|tx| {
            let live: Option<(String, String)> = tx
                .query_row(
                    "SELECT id, state FROM rollouts WHERE model = ?1 AND state IN ('running', 'paused')
                     ORDER BY created_at LIMIT 1",
                    params![r.model],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            if let Some((id, state)) = live {
                busy = Some(StoreError::Busy { id, model: r.model.clone(), state });
                return Ok(());
            }
            tx.execute(
                "INSERT INTO rollouts (id, model, version, state, created_at, updated_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    r.id,
                    r.model,
                    r.version,
                    r.state.as_str(),
                    r.created_at_ms as i64,
                    r.updated_at_ms as i64,
                    text
                ],
            )?;
            Ok(())
        })?;
        match busy {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Rewrites a rollout's record (a transition and its outbox).
    pub fn save(&self, r: &Rollout) -> Result<(), StoreError> {
        let text = encode(r)?;
        self.registry.with_transaction(|tx| {
            tx.execute(
                "UPDATE rollouts SET state = ?2, updated_at = ?3, record = ?4 WHERE id = ?1",
                params![r.id, r.state.as_str(), r.updated_at_ms as i64, text],
            )?;
            Ok(())
        })?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        let text: Option<String> = self.registry.with_transaction(|tx| {
            Ok(tx.query_row("SELECT record FROM rollouts WHERE id = ?1", params![id], |row| row.get(0)).optional()?)
        })?;
        text.map(|t| decode(id, &t)).transpose()
    }

    /// Every rollout, newest first; `active_only`: running or paused.
    pub fn list(&self, active_only: bool) -> Result<Vec<Rollout>, StoreError> {
        let rows: Vec<(String, String)> = self.registry.with_transaction(|tx| {
            let sql = if active_only {
                "SELECT id, record FROM rollouts WHERE state IN ('running', 'paused') ORDER BY created_at DESC, id DESC"
            } else {
                "SELECT id, record FROM rollouts ORDER BY created_at DESC, id DESC"
            };
            let mut stmt = tx.prepare(sql)?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, text) in rows {
            match decode(&id, &text) {
                Ok(r) => out.push(r),
                // One damaged row must not hide every other rollout.
                Err(e) => log::error!("{e}"),
            }
        }
        Ok(out)
    }

    /// How many rollouts are in each state (one `GROUP BY`, no decoding:
    /// the metrics read it every tick).
    pub fn counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.registry.with_transaction(|tx| {
            let mut stmt = tx.prepare("SELECT state, COUNT(*) FROM rollouts GROUP BY state")?;
            let rows = stmt.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?)
    }

    /// The live rollout of `model`, if any.
    pub fn active_for(&self, model: &str) -> Result<Option<Rollout>, StoreError> {
        Ok(self.list(true)?.into_iter().find(|r| r.model == model && r.state != State::Completed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::cohort::Candidate;
    use crate::rollout::gates::Limits;
    use crate::rollout::machine::{plan, OnFailure, Policy};

    fn rollout(id: &str, model: &str) -> Rollout {
        let policy = Policy {
            stages: vec![50, 100],
            bake_ms: 1000,
            silence_deadline_ms: 5000,
            limits: Limits::default(),
            on_failure: OnFailure::Rollback,
        };
        let c = vec![Candidate { id: "d1".into(), tags: vec![] }, Candidate { id: "d2".into(), tags: vec![] }];
        plan(id, model, "1.1.0", &[], policy, &c, 5).expect("plan")
    }

    #[test]
    fn one_live_rollout_per_model_and_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("r.sqlite");
        {
            let store = Store::new(Arc::new(Registry::open(&path).expect("open")));
            store.insert(&rollout("ro-1", "bc")).expect("insert");
            let err = store.insert(&rollout("ro-2", "bc")).expect_err("busy");
            assert!(err.to_string().contains("ro-1"), "{err}");
            store.insert(&rollout("ro-3", "other")).expect("another model is fine");
            let mut r = store.get("ro-1").expect("get").expect("exists");
            r.state = State::Halted;
            r.reason = Some("gate x failed".into());
            store.save(&r).expect("save");
            store.insert(&rollout("ro-4", "bc")).expect("the halted one no longer blocks");
        }
        let store = Store::new(Arc::new(Registry::open(&path).expect("reopen")));
        let r = store.get("ro-1").expect("get").expect("exists");
        assert_eq!(r.state, State::Halted);
        assert_eq!(r.reason.as_deref(), Some("gate x failed"));
        assert_eq!(store.list(false).expect("list").len(), 3);
        assert_eq!(store.list(true).expect("list").len(), 2);
        let mut counts = store.counts().expect("counts");
        counts.sort();
        assert_eq!(counts, vec![("halted".to_string(), 1), ("running".to_string(), 2)]);
        assert_eq!(store.active_for("bc").expect("active").map(|r| r.id), Some("ro-4".into()));
        assert!(store.get("nope").expect("get").is_none());
    }
}
