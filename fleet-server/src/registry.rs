//! The fleet's registry: models, versions, devices and the audit log, in one
//! SQLite file under `data_dir`.
//!
//! - Schema changes are numbered migrations applied in order inside a
//!   transaction, recorded in `schema_migrations`; a registry written by a
//!   newer server (unknown migration number) is refused rather than guessed at.
//! - Bundles themselves are files, content-addressed by sha256 under
//!   `data_dir/bundles/`; the registry holds their digest and size.
//! - Device credentials are stored hashed. They are 32 random bytes made at
//!   provisioning, so a salted SHA-256 is enough: there is no low-entropy
//!   password to brute-force, which is what slow hashes (argon2, bcrypt) are for.
//! - Every operator action lands in `audit` with what, when, and the result.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// Migrations, applied in order. Never edit one that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE models (
         name TEXT PRIMARY KEY,
         created_at INTEGER NOT NULL
     );
     CREATE TABLE versions (
         model TEXT NOT NULL REFERENCES models(name),
         version TEXT NOT NULL,
         sequence INTEGER NOT NULL,
         bundle_sha256 TEXT NOT NULL,
         bundle_size INTEGER NOT NULL,
         accuracy REAL,
         published_at INTEGER NOT NULL,
         PRIMARY KEY (model, version),
         UNIQUE (model, sequence)
     );
     CREATE TABLE devices (
         id TEXT PRIMARY KEY,
         tags TEXT NOT NULL,
         credential_salt BLOB NOT NULL,
         credential_hash BLOB NOT NULL,
         public_key BLOB NOT NULL,
         created_at INTEGER NOT NULL,
         last_seen INTEGER,
         model TEXT,
         version TEXT,
         status TEXT,
         last_counter INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE audit (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         at INTEGER NOT NULL,
         actor TEXT NOT NULL,
         action TEXT NOT NULL,
         target TEXT NOT NULL,
         result TEXT NOT NULL
     );",
    // 2: what the fleet last told each device (the signed directive, kept
    // so it can be re-published retained after a restart: the embedded
    // broker keeps retained messages in memory only), the last error a
    // device reported, and named monotonic counters.
    "ALTER TABLE devices ADD COLUMN last_error TEXT;
     ALTER TABLE versions ADD COLUMN manifest_sha256 TEXT NOT NULL DEFAULT '';
     CREATE TABLE counters (
         name TEXT PRIMARY KEY,
         value INTEGER NOT NULL
     );
     CREATE TABLE directives (
         device TEXT PRIMARY KEY REFERENCES devices(id),
         sequence INTEGER NOT NULL,
         model TEXT NOT NULL,
         version TEXT NOT NULL,
         issued_at INTEGER NOT NULL,
         signed BLOB NOT NULL
     );",
    // 3: rollouts (see `crate::rollout::store`: one row per rollout, the
    // whole record as JSON, rewritten on each transition), and what a
    // device's state says about the last directive it accepted and whether
    // the version it serves is committed — the rollout engine counts a
    // device as a success only for a committed version of *its* directive.
    "ALTER TABLE devices ADD COLUMN directive_sequence INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE devices ADD COLUMN committed INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE rollouts (
         id TEXT PRIMARY KEY,
         model TEXT NOT NULL,
         version TEXT NOT NULL,
         state TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         updated_at INTEGER NOT NULL,
         record TEXT NOT NULL
     );
     CREATE INDEX rollouts_model_state ON rollouts (model, state);",
    // 4: device lifecycle and replay defence across restarts.
    // `counter_floor`: the highest counter the fleet accepted from the
    // device in any kind of message, written in batches by the MQTT link
    // (see `fleet_link`), the floor for every kind after a restart.
    // `decommissioned_at`: set by `decommission`, which also empties the
    // credential and the public key, so neither can be used again; a new
    // `provision` of the id replaces the row with new ones.
    "ALTER TABLE devices ADD COLUMN counter_floor INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE devices ADD COLUMN decommissioned_at INTEGER;",
];

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("registry schema version {found} is newer than this server knows ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("{model}@{version} already exists")]
    VersionExists { model: String, version: String },
    #[error("device {0} already exists")]
    DeviceExists(String),
    #[error("unknown device {0}")]
    UnknownDevice(String),
    #[error("registry lock poisoned by a panicked thread")]
    Poisoned,
}

/// A device's stored broker credential: enough to check a secret, never
/// to recover it. The embedded broker caches these (see `broker`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCredential {
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl StoredCredential {
    /// Whether `secret` is this credential's secret.
    pub fn matches(&self, secret: &str) -> bool {
        let h = credential_hash(&self.salt, secret);
        // Constant-time enough: both sides are fixed-length digests, and
        // the comparison result is all an attacker observes.
        h.len() == self.hash.len() && h.iter().zip(&self.hash).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The directive the fleet last published for a device.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DirectiveRecord {
    pub device: String,
    pub sequence: u64,
    pub model: String,
    pub version: String,
    pub issued_at: i64,
    /// The signed directive as published (postcard `Signed<Directive>`).
    #[serde(skip)]
    pub signed: Vec<u8>,
}

/// How many devices report one (status, model, version).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DeviceCount {
    pub status: String,
    pub model: String,
    pub version: String,
    pub count: u64,
}

/// A published model version.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VersionRecord {
    pub model: String,
    pub version: String,
    pub sequence: u64,
    pub bundle_sha256: String,
    pub bundle_size: u64,
    pub accuracy: Option<f64>,
    pub published_at: i64,
    /// sha256 of the signed manifest bytes (what a directive names).
    pub manifest_sha256: String,
}

/// A provisioned device and what it last reported.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DeviceRecord {
    pub id: String,
    pub tags: Vec<String>,
    #[serde(skip)]
    pub public_key: Vec<u8>,
    pub created_at: i64,
    pub last_seen: Option<i64>,
    pub model: Option<String>,
    pub version: Option<String>,
    pub status: Option<String>,
    /// Highest message counter accepted from this device (replay defence).
    pub last_counter: u64,
    pub last_error: Option<String>,
    /// The last directive sequence the device said it accepted.
    pub directive_sequence: u64,
    /// Whether the version it serves passed probation.
    pub committed: bool,
    /// When it was decommissioned (its credential and key are gone), if it was.
    pub decommissioned_at: Option<i64>,
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AuditEntry {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub result: String,
}

/// What a device last said about itself (from its signed state message).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceStateUpdate<'a> {
    pub device: &'a str,
    pub counter: u64,
    pub seen_at: i64,
    pub model: Option<&'a str>,
    pub version: Option<&'a str>,
    pub status: &'a str,
    pub last_error: Option<&'a str>,
    /// The last directive sequence the device accepted.
    pub directive_sequence: u64,
    /// Whether the serving version is committed.
    pub committed: bool,
}

pub struct Registry {
    conn: Mutex<Connection>,
}

/// `synchronous=NORMAL` for the life of one device-report write, FULL again
/// after. In WAL mode NORMAL commits without an fsync: the write survives a
/// crash of the process, and the next FULL commit (an operator action, a
/// rollout transition) or checkpoint makes it durable with everything
/// before it. Losing the last moments of device reports to a power cut
/// costs nothing — devices re-send their retained state on reconnect — while
/// an fsync per report capped the fleet at ~300 state messages per second
/// on this machine (the 10,000-device benchmark, issue 9).
struct Relaxed<'a>(&'a Connection);

impl<'a> Relaxed<'a> {
    fn new(conn: &'a Connection) -> Result<Relaxed<'a>, RegistryError> {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Relaxed(conn))
    }
}

impl Drop for Relaxed<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.pragma_update(None, "synchronous", "FULL") {
            log::error!("registry: cannot restore synchronous=FULL: {e}");
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn credential_hash(salt: &[u8], secret: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().to_vec()
}

impl Registry {
    /// Opens (creating if needed) the registry at `path` and brings its
    /// schema up to date.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let conn = Connection::open(path)?;
        // WAL: readers (API, dashboard) never block the writer (MQTT state
        // updates); synchronous=FULL so an acknowledged publish, a rollout
        // transition or an audit entry survives a power cut. Device reports
        // are the exception (see `relaxed`).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let registry = Registry { conn: Mutex::new(conn) };
        registry.migrate()?;
        Ok(registry)
    }

    /// The connection. A panic while a thread held it (caught by the
    /// supervisor) does not end the registry: a transaction open at the
    /// panic was rolled back when it was dropped during unwinding, and every
    /// other statement is atomic, so the connection is consistent.
    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, RegistryError> {
        Ok(self.conn.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn migrate(&self) -> Result<(), RegistryError> {
        let mut conn = self.conn()?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INTEGER PRIMARY KEY,
                 applied_at INTEGER NOT NULL
             );",
        )?;
        let current: i64 = conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?;
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(RegistryError::SchemaTooNew { found: current, known });
        }
        for (ix, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![ix as i64 + 1, now()],
            )?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Runs `f` inside one transaction on the registry's connection, for
    /// modules that own tables of their own (the rollout store): committed
    /// if `f` returns `Ok`, rolled back otherwise.
    pub(crate) fn with_transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// The schema version in force.
    pub fn schema_version(&self) -> Result<i64, RegistryError> {
        Ok(self.conn()?.query_row("SELECT MAX(version) FROM schema_migrations", [], |r| r.get(0))?)
    }

    /// The sequence the next version of `model` gets: one above every
    /// sequence ever used for it, so a device never sees one twice.
    pub fn next_sequence(&self, model: &str) -> Result<u64, RegistryError> {
        let max: Option<i64> = self.conn()?.query_row(
            "SELECT MAX(sequence) FROM versions WHERE model = ?1",
            params![model],
            |r| r.get(0),
        )?;
        Ok(max.map(|m| m as u64 + 1).unwrap_or(1))
    }

    /// Records a published version. Refuses a version that already exists;
    /// on any error nothing is written.
    pub fn insert_version(&self, v: &VersionRecord) -> Result<(), RegistryError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM versions WHERE model = ?1 AND version = ?2",
                params![v.model, v.version],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Err(RegistryError::VersionExists { model: v.model.clone(), version: v.version.clone() });
        }
        tx.execute(
            "INSERT OR IGNORE INTO models (name, created_at) VALUES (?1, ?2)",
            params![v.model, now()],
        )?;
        tx.execute(
            "INSERT INTO versions (model, version, sequence, bundle_sha256, bundle_size, accuracy, published_at,
                 manifest_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                v.model,
                v.version,
                v.sequence as i64,
                v.bundle_sha256,
                v.bundle_size as i64,
                v.accuracy,
                v.published_at,
                v.manifest_sha256
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>, RegistryError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT model, version, sequence, bundle_sha256, bundle_size, accuracy, published_at, manifest_sha256
                 FROM versions WHERE model = ?1 AND version = ?2",
                params![model, version],
                version_from_row,
            )
            .optional()?)
    }

    /// Every version of every model, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionRecord>, RegistryError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT model, version, sequence, bundle_sha256, bundle_size, accuracy, published_at, manifest_sha256
             FROM versions ORDER BY model, sequence",
        )?;
        let rows = stmt.query_map([], version_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Registers a device with its tags, broker secret and public key.
    pub fn add_device(
        &self,
        id: &str,
        tags: &[String],
        secret: &str,
        public_key: &[u8],
    ) -> Result<(), RegistryError> {
        let mut salt = [0u8; 16];
        // A failing OS RNG would make every salt equal; that only weakens a
        // defence-in-depth layer (secrets are random), so fall back loudly.
        if getrandom::getrandom(&mut salt).is_err() {
            log::warn!("OS random source unavailable; device {id} credential salt is zero");
        }
        let hash = credential_hash(&salt, secret);
        let tags_json = serde_json::to_string(tags).unwrap_or_else(|_| "[]".into());
        let conn = self.conn()?;
        let inserted = conn.execute(
            "INSERT OR IGNORE INTO devices (id, tags, credential_salt, credential_hash, public_key, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, tags_json, salt.to_vec(), hash, public_key, now()],
        )?;
        if inserted == 1 {
            return Ok(());
        }
        // A decommissioned id is provisioned afresh: new credential and key,
        // and nothing the old device reported. Its counters start over — the
        // new key signs from the new agent's first counter, and nothing the
        // old key signed is believed any more (a different key).
        let renewed = conn.execute(
            "UPDATE devices SET tags = ?2, credential_salt = ?3, credential_hash = ?4, public_key = ?5, created_at = ?6,
                 last_seen = NULL, model = NULL, version = NULL, status = NULL, last_counter = 0, last_error = NULL,
                 directive_sequence = 0, committed = 0, counter_floor = 0, decommissioned_at = NULL
             WHERE id = ?1 AND decommissioned_at IS NOT NULL",
            params![id, tags_json, salt.to_vec(), hash, public_key, now()],
        )?;
        if renewed == 0 {
            return Err(RegistryError::DeviceExists(id.to_string()));
        }
        Ok(())
    }

    /// Decommissions device `id`: its broker credential and public key are
    /// emptied (no secret matches an empty hash, no signature verifies
    /// against an empty key), its recorded directive is dropped (nothing is
    /// republished to it) and it leaves the device list. `Ok(false)` if it
    /// already was decommissioned.
    pub fn decommission(&self, id: &str) -> Result<bool, RegistryError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let state: Option<Option<i64>> = tx
            .query_row("SELECT decommissioned_at FROM devices WHERE id = ?1", params![id], |r| r.get(0))
            .optional()?;
        match state {
            None => return Err(RegistryError::UnknownDevice(id.to_string())),
            Some(Some(_)) => return Ok(false),
            Some(None) => {}
        }
        tx.execute(
            "UPDATE devices SET credential_salt = X'', credential_hash = X'', public_key = X'', decommissioned_at = ?2,
                 status = 'decommissioned'
             WHERE id = ?1",
            params![id, now()],
        )?;
        tx.execute("DELETE FROM directives WHERE device = ?1", params![id])?;
        tx.commit()?;
        Ok(true)
    }

    /// Every device's replay floor: the highest counter accepted from it in
    /// any message (`counter_floor`, and the state counter). Decommissioned
    /// devices are left out.
    pub fn counter_floors(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, MAX(counter_floor, last_counter) FROM devices WHERE decommissioned_at IS NULL ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Raises the replay floors of devices in one transaction (a floor never
    /// goes down). Returns how many devices were updated.
    pub fn raise_counter_floors(&self, floors: &[(String, u64)]) -> Result<usize, RegistryError> {
        if floors.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE devices SET counter_floor = MAX(counter_floor, ?2) WHERE id = ?1 AND decommissioned_at IS NULL",
            )?;
            for (id, floor) in floors {
                n += stmt.execute(params![id, (*floor).min(i64::MAX as u64) as i64])?;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Whether `secret` is the broker credential of device `id`.
    pub fn check_credentials(&self, id: &str, secret: &str) -> Result<bool, RegistryError> {
        Ok(self.credential(id)?.is_some_and(|c| c.matches(secret)))
    }

    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT id, tags, public_key, created_at, last_seen, model, version, status, last_counter, last_error,
                     directive_sequence, committed, decommissioned_at
                 FROM devices WHERE id = ?1",
                params![id],
                device_from_row,
            )
            .optional()?)
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, tags, public_key, created_at, last_seen, model, version, status, last_counter, last_error,
                     directive_sequence, committed, decommissioned_at
             FROM devices WHERE decommissioned_at IS NULL ORDER BY id",
        )?;
        let rows = stmt.query_map([], device_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Applies a device's state report if its counter is above the last one
    /// accepted (any counter, 0 included, for a device's first report). Returns whether it was applied: an old or replayed message
    /// changes nothing.
    pub fn update_device_state(&self, u: &DeviceStateUpdate<'_>) -> Result<bool, RegistryError> {
        let conn = self.conn()?;
        let _relaxed = Relaxed::new(&conn)?;
        let changed = conn.execute(
            "UPDATE devices SET last_seen = ?2, model = ?3, version = ?4, status = ?5, last_counter = ?6,
                 last_error = ?7, directive_sequence = ?8, committed = ?9
             WHERE id = ?1 AND (last_counter < ?6 OR status IS NULL) AND decommissioned_at IS NULL",
            params![
                u.device,
                u.seen_at,
                u.model,
                u.version,
                u.status,
                u.counter as i64,
                u.last_error,
                u.directive_sequence as i64,
                u.committed
            ],
        )?;
        if changed == 0 {
            let known: bool = conn
                .query_row("SELECT 1 FROM devices WHERE id = ?1", params![u.device], |_| Ok(()))
                .optional()?
                .is_some();
            if !known {
                return Err(RegistryError::UnknownDevice(u.device.to_string()));
            }
        }
        Ok(changed == 1)
    }

    /// The stored credential of device `id`, if it is provisioned.
    pub fn credential(&self, id: &str) -> Result<Option<StoredCredential>, RegistryError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT credential_salt, credential_hash FROM devices WHERE id = ?1 AND decommissioned_at IS NULL",
                params![id],
                |r| Ok(StoredCredential { salt: r.get(0)?, hash: r.get(1)? }),
            )
            .optional()?)
    }

    /// Marks a device as heard from (a verified message other than state).
    pub fn touch_device(&self, id: &str, seen_at: i64) -> Result<(), RegistryError> {
        let conn = self.conn()?;
        let _relaxed = Relaxed::new(&conn)?;
        conn.execute("UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?2) WHERE id = ?1", params![id, seen_at])?;
        Ok(())
    }

    /// Devices grouped by reported status, model and version (for metrics);
    /// a device that never reported counts as status `unknown`.
    pub fn device_counts(&self) -> Result<Vec<DeviceCount>, RegistryError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT COALESCE(status, 'unknown'), COALESCE(model, ''), COALESCE(version, ''), COUNT(*)
             FROM devices WHERE decommissioned_at IS NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceCount { status: r.get(0)?, model: r.get(1)?, version: r.get(2)?, count: r.get::<_, i64>(3)? as u64 })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Takes the next value of the named monotonic counter (first value 1).
    /// Committed before it is returned, so a value is never handed out twice,
    /// even across a crash.
    pub fn next_counter(&self, name: &str) -> Result<u64, RegistryError> {
        let conn = self.conn()?;
        let value: i64 = conn.query_row(
            "INSERT INTO counters (name, value) VALUES (?1, 1)
             ON CONFLICT(name) DO UPDATE SET value = value + 1
             RETURNING value",
            params![name],
            |r| r.get(0),
        )?;
        Ok(value as u64)
    }

    /// Records the directive just signed for a device (replacing the previous one).
    pub fn set_directive(&self, d: &DirectiveRecord) -> Result<(), RegistryError> {
        let conn = self.conn()?;
        let known: bool =
            conn.query_row("SELECT 1 FROM devices WHERE id = ?1", params![d.device], |_| Ok(())).optional()?.is_some();
        if !known {
            return Err(RegistryError::UnknownDevice(d.device.clone()));
        }
        conn.execute(
            "INSERT INTO directives (device, sequence, model, version, issued_at, signed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(device) DO UPDATE SET sequence = ?2, model = ?3, version = ?4, issued_at = ?5, signed = ?6",
            params![d.device, d.sequence as i64, d.model, d.version, d.issued_at, d.signed],
        )?;
        Ok(())
    }

    /// Every device's current directive.
    pub fn directives(&self) -> Result<Vec<DirectiveRecord>, RegistryError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare("SELECT device, sequence, model, version, issued_at, signed FROM directives ORDER BY device")?;
        let rows = stmt.query_map([], directive_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn directive(&self, device: &str) -> Result<Option<DirectiveRecord>, RegistryError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT device, sequence, model, version, issued_at, signed FROM directives WHERE device = ?1",
                params![device],
                directive_from_row,
            )
            .optional()?)
    }

    /// Removes a version record (undoing a publish whose bundle could not be
    /// kept); true if there was one.
    pub fn delete_version(&self, model: &str, version: &str) -> Result<bool, RegistryError> {
        Ok(self.conn()?.execute("DELETE FROM versions WHERE model = ?1 AND version = ?2", params![model, version])? == 1)
    }

    /// Appends to the audit log.
    pub fn audit(&self, actor: &str, action: &str, target: &str, result: &str) -> Result<(), RegistryError> {
        self.conn()?.execute(
            "INSERT INTO audit (at, actor, action, target, result) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![now(), actor, action, target, result],
        )?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, RegistryError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare("SELECT at, actor, action, target, result FROM audit ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok(AuditEntry { at: r.get(0)?, actor: r.get(1)?, action: r.get(2)?, target: r.get(3)?, result: r.get(4)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn version_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRecord> {
    Ok(VersionRecord {
        model: r.get(0)?,
        version: r.get(1)?,
        sequence: r.get::<_, i64>(2)? as u64,
        bundle_sha256: r.get(3)?,
        bundle_size: r.get::<_, i64>(4)? as u64,
        accuracy: r.get(5)?,
        published_at: r.get(6)?,
        manifest_sha256: r.get(7)?,
    })
}

fn directive_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DirectiveRecord> {
    Ok(DirectiveRecord {
        device: r.get(0)?,
        sequence: r.get::<_, i64>(1)? as u64,
        model: r.get(2)?,
        version: r.get(3)?,
        issued_at: r.get(4)?,
        signed: r.get(5)?,
    })
}

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let tags: String = r.get(1)?;
    Ok(DeviceRecord {
        id: r.get(0)?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        public_key: r.get(2)?,
        created_at: r.get(3)?,
        last_seen: r.get(4)?,
        model: r.get(5)?,
        version: r.get(6)?,
        status: r.get(7)?,
        last_counter: r.get::<_, i64>(8)? as u64,
        last_error: r.get(9)?,
        directive_sequence: r.get::<_, i64>(10)? as u64,
        committed: r.get(11)?,
        decommissioned_at: r.get(12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_registry() -> (tempdir::Dir, Registry) {
        let dir = tempdir::Dir::new();
        let reg = Registry::open(&dir.path.join("registry.sqlite")).expect("opens");
        (dir, reg)
    }

    /// A throwaway directory removed on drop (no extra crate for one test).
    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                let mut bytes = [0u8; 8];
                getrandom::getrandom(&mut bytes).expect("random");
                let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let path = std::env::temp_dir().join(format!("outpost-registry-{name}"));
                std::fs::create_dir_all(&path).expect("mkdir");
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    fn version(v: &str, seq: u64) -> VersionRecord {
        VersionRecord {
            model: "bc".into(),
            version: v.into(),
            sequence: seq,
            bundle_sha256: "ab".repeat(32),
            bundle_size: 1234,
            accuracy: Some(0.95),
            published_at: 1,
            manifest_sha256: "cd".repeat(32),
        }
    }

    #[test]
    fn versions_are_unique_and_sequences_grow() {
        let (_d, reg) = temp_registry();
        assert_eq!(reg.next_sequence("bc").expect("seq"), 1);
        reg.insert_version(&version("1.0.0", 1)).expect("insert");
        assert_eq!(reg.next_sequence("bc").expect("seq"), 2);
        let err = reg.insert_version(&version("1.0.0", 2)).expect_err("duplicate");
        assert!(matches!(err, RegistryError::VersionExists { .. }), "{err}");
        assert_eq!(reg.versions().expect("list").len(), 1, "refusal wrote nothing");
        assert!(reg.insert_version(&version("1.1.0", 1)).is_err(), "sequence reuse refused");
        assert_eq!(reg.version("bc", "1.0.0").expect("get"), Some(version("1.0.0", 1)));
    }

    #[test]
    fn credentials_are_checked_and_stored_hashed() {
        let (_d, reg) = temp_registry();
        reg.add_device("dev-1", &["pi4".into()], "s3cret", &[7; 32]).expect("add");
        assert!(reg.check_credentials("dev-1", "s3cret").expect("check"));
        assert!(!reg.check_credentials("dev-1", "wrong").expect("check"));
        assert!(!reg.check_credentials("dev-2", "s3cret").expect("check"));
        assert!(matches!(reg.add_device("dev-1", &[], "x", &[0; 32]), Err(RegistryError::DeviceExists(_))));
        let stored: Vec<u8> = reg
            .conn()
            .expect("conn")
            .query_row("SELECT credential_hash FROM devices", [], |r| r.get(0))
            .expect("row");
        assert_ne!(stored, b"s3cret".to_vec());
    }

    #[test]
    fn stale_state_reports_change_nothing() {
        let (_d, reg) = temp_registry();
        reg.add_device("dev-1", &[], "s", &[1; 32]).expect("add");
        let update = |counter, status| DeviceStateUpdate {
            device: "dev-1",
            counter,
            seen_at: 10,
            model: Some("bc"),
            version: Some("1.0.0"),
            status,
            last_error: None,
            directive_sequence: 0,
            committed: false,
        };
        // A device's very first report may carry counter 0.
        assert!(reg.update_device_state(&update(0, "idle")).expect("first report"));
        assert!(!reg.update_device_state(&update(0, "failed")).expect("replayed first report"));
        assert!(reg.update_device_state(&update(5, "serving")).expect("apply"));
        assert!(!reg.update_device_state(&update(5, "offline")).expect("replay"));
        assert!(!reg.update_device_state(&update(3, "offline")).expect("old"));
        let dev = reg.device("dev-1").expect("get").expect("exists");
        assert_eq!(dev.status.as_deref(), Some("serving"));
        assert_eq!(dev.last_counter, 5);
        assert!(matches!(
            reg.update_device_state(&DeviceStateUpdate { device: "ghost", ..update(9, "x") }),
            Err(RegistryError::UnknownDevice(_))
        ));
        // Device reports are written without an fsync of their own; every
        // other write is FULL again afterwards, even after a failed report.
        let sync: i64 = reg.conn().expect("conn").query_row("PRAGMA synchronous", [], |r| r.get(0)).expect("pragma");
        assert_eq!(sync, 2, "synchronous=FULL after device reports");
    }

    #[test]
    fn decommissioning_revokes_and_provisioning_again_starts_afresh() {
        let (_d, reg) = temp_registry();
        reg.add_device("dev-1", &["pi4".into()], "old-secret", &[1; 32]).expect("add");
        let update = |counter| DeviceStateUpdate {
            device: "dev-1",
            counter,
            seen_at: 10,
            model: None,
            version: None,
            status: "serving",
            last_error: None,
            directive_sequence: 3,
            committed: true,
        };
        assert!(reg.update_device_state(&update(40)).expect("report"));
        reg.raise_counter_floors(&[("dev-1".into(), 55)]).expect("floors");
        reg.raise_counter_floors(&[("dev-1".into(), 50)]).expect("a floor never goes down");
        assert_eq!(reg.counter_floors().expect("floors"), vec![("dev-1".to_string(), 55)]);

        assert!(reg.decommission("dev-1").expect("decommission"));
        assert!(!reg.decommission("dev-1").expect("twice"), "already decommissioned");
        assert!(matches!(reg.decommission("ghost"), Err(RegistryError::UnknownDevice(_))));
        assert!(!reg.check_credentials("dev-1", "old-secret").expect("check"), "credential revoked");
        let d = reg.device("dev-1").expect("get").expect("kept for the record");
        assert!(d.public_key.is_empty() && d.decommissioned_at.is_some(), "{d:?}");
        assert!(reg.devices().expect("list").is_empty(), "out of the fleet");
        assert!(reg.counter_floors().expect("floors").is_empty());
        assert!(!reg.update_device_state(&update(90)).expect("refused"), "reports from it change nothing");

        // Provisioned again: new secret and key, nothing of the old device.
        reg.add_device("dev-1", &["pi5".into()], "new-secret", &[2; 32]).expect("again");
        assert!(reg.check_credentials("dev-1", "new-secret").expect("check"));
        assert!(!reg.check_credentials("dev-1", "old-secret").expect("check"));
        let d = reg.device("dev-1").expect("get").expect("device");
        assert_eq!((d.public_key, d.tags, d.status, d.last_counter, d.decommissioned_at), (vec![2; 32], vec!["pi5".to_string()], None, 0, None));
        assert_eq!(reg.counter_floors().expect("floors"), vec![("dev-1".to_string(), 0)]);
        assert!(matches!(reg.add_device("dev-1", &[], "x", &[3; 32]), Err(RegistryError::DeviceExists(_))), "a live id stays taken");
    }

    #[test]
    fn registry_survives_reopen_and_refuses_newer_schema() {
        let dir = tempdir::Dir::new();
        let path = dir.path.join("r.sqlite");
        {
            let reg = Registry::open(&path).expect("open");
            reg.insert_version(&version("1.0.0", 1)).expect("insert");
            reg.audit("operator", "publish", "bc@1.0.0", "ok").expect("audit");
        }
        let reg = Registry::open(&path).expect("reopen");
        assert_eq!(reg.versions().expect("list").len(), 1);
        assert_eq!(reg.audit_log(10).expect("audit")[0].action, "publish");
        assert_eq!(reg.schema_version().expect("v"), MIGRATIONS.len() as i64);
        reg.conn()
            .expect("conn")
            .execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)", [])
            .expect("fake newer");
        drop(reg);
        assert!(matches!(Registry::open(&path), Err(RegistryError::SchemaTooNew { found: 99, .. })));
    }
}
