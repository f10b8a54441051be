//! Compressed contexts that outlive the process: every finished request's compressed
//! context is written, as a compressed-context file ([`kvmerger_engine::kvc`]), to a
//! store that a restarted server, or any other replica, finds again.
//!
//! - [`DiskStore`] (`--context-store DIR`): one file per context, written atomically
//!   (temporary file, fsync, rename), bounded by `--context-store-size` with the least
//!   recently used files deleted first (a read refreshes a file's time).
//! - [`RedisStore`] (`--context-store redis://HOST:PORT`): one key per context, shared by
//!   every server that names the same Redis. A Redis that goes away costs a warning
//!   (once) and the server serves from memory until it is back.
//! - [`MemoryStore`]: the same interface in memory (tests, and explicit context handles
//!   when no store is configured).
//!
//! An entry's key is a hash of what makes two contexts the same: the model's
//! fingerprint, the recipe and protocol, the cache's storage type and the context's
//! token ids. So a lookup is one read, and a context from another model or recipe is
//! never found. Every entry carries its own checksum: a corrupted or truncated entry is
//! detected when read, deleted, and recomputed by the request that found it.
//!
//! Reads run on the request's blocking thread; writes go to one writer thread, so
//! neither blocks the engine.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};

/// What a store failed at.
#[derive(Debug, thiserror::Error)]
#[error("context store ({what}): {msg}")]
pub struct StoreError {
    pub what: String,
    pub msg: String,
}

fn err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        what: what.into(),
        msg: e.to_string(),
    }
}

/// One stored entry, as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    pub key: String,
    pub bytes: u64,
}

/// Where compressed contexts are kept.
pub trait ContextStore: Send + Sync {
    /// The entry's bytes, if there is one.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The first `n` bytes of the entry (for its header), if there is one.
    fn get_prefix(&self, key: &str, n: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(key)?.map(|mut b| {
            b.truncate(n);
            b
        }))
    }
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// Whether there was such an entry.
    fn delete(&self, key: &str) -> Result<bool, StoreError>;
    fn list(&self) -> Result<Vec<Listed>, StoreError>;
    /// For logs: `disk /path (at most 2.0 GiB)`.
    fn describe(&self) -> String;
}

/// The key of a context: SHA-256 (hex, 40 characters) of the model fingerprint, the
/// recipe key (method, options, budget, schedule, protocol), the cache's storage type
/// and the context's token ids.
pub fn key(fingerprint: &str, recipe_key: &str, dtype: &str, tokens: &[u32]) -> String {
    let mut h = Sha256::new();
    for part in [fingerprint, recipe_key, dtype] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize()
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `key` is a well-formed store key (so a client's id never names a path).
pub fn valid_key(key: &str) -> bool {
    key.len() == 40
        && key
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A directory of `<key>.kvc` files, at most `max_bytes` in all.
pub struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    /// Serializes writes and eviction (reads need no lock: files appear by rename).
    lock: Mutex<()>,
}

impl DiskStore {
    pub fn open(dir: PathBuf, max_bytes: u64) -> Result<DiskStore, StoreError> {
        std::fs::create_dir_all(&dir).map_err(|e| err(&dir.display().to_string(), e))?;
        let meta = std::fs::metadata(&dir).map_err(|e| err(&dir.display().to_string(), e))?;
        if !meta.is_dir() {
            return Err(err(&dir.display().to_string(), "not a directory"));
        }
        // Leftovers of writes a crash interrupted.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(DiskStore {
            dir,
            max_bytes,
            lock: Mutex::new(()),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.kvc"))
    }

    /// Files by last use, oldest first, with their sizes.
    fn entries(&self) -> Vec<(SystemTime, u64, PathBuf)> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                let ok = p.extension().is_some_and(|x| x == "kvc")
                    && p.file_stem()
                        .and_then(|s| s.to_str())
                        .is_some_and(valid_key);
                if let (true, Ok(m)) = (ok, e.metadata()) {
                    if m.is_file() {
                        v.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), p));
                    }
                }
            }
        }
        v.sort();
        v
    }

    fn evict(&self) {
        let entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        for (_, len, p) in entries {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
    }
}

impl ContextStore for DiskStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if !valid_key(key) {
            return Ok(None);
        }
        let p = self.path(key);
        match std::fs::read(&p) {
            Ok(b) => {
                // Last use, for eviction.
                if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Ok(Some(b))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&p.display().to_string(), e)),
        }
    }

    fn get_prefix(&self, key: &str, n: usize) -> Result<Option<Vec<u8>>, StoreError> {
        use std::io::Read;
        if !valid_key(key) {
            return Ok(None);
        }
        let p = self.path(key);
        match std::fs::File::open(&p) {
            Ok(f) => {
                let mut b = Vec::new();
                f.take(n as u64)
                    .read_to_end(&mut b)
                    .map_err(|e| err(&p.display().to_string(), e))?;
                Ok(Some(b))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&p.display().to_string(), e)),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if !valid_key(key) {
            return Err(err("put", format!("'{key}' is not a store key")));
        }
        if bytes.len() as u64 > self.max_bytes {
            return Err(err(
                "put",
                format!(
                    "an entry of {} bytes is larger than the whole store ({} bytes)",
                    bytes.len(),
                    self.max_bytes
                ),
            ));
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let p = self.path(key);
        kvmerger_engine::write_atomic(&p, bytes).map_err(|e| err("write", e))?;
        self.evict();
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        if !valid_key(key) {
            return Ok(false);
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::remove_file(self.path(key)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(err("delete", e)),
        }
    }

    fn list(&self) -> Result<Vec<Listed>, StoreError> {
        Ok(self
            .entries()
            .into_iter()
            .rev()
            .filter_map(|(_, len, p)| {
                Some(Listed {
                    key: p.file_stem()?.to_str()?.to_string(),
                    bytes: len,
                })
            })
            .collect())
    }

    fn describe(&self) -> String {
        format!(
            "disk {} (at most {:.1} MiB)",
            self.dir.display(),
            self.max_bytes as f64 / (1 << 20) as f64
        )
    }
}

/// Contexts in a Redis server, under `kvmerger:ctx:<key>`.
pub struct RedisStore {
    client: redis::Client,
    url: String,
    /// Seconds an entry lives after its last write or read (0: until Redis evicts it).
    ttl: u64,
    conn: Mutex<Option<redis::Connection>>,
    /// Whether the last attempt failed (a failure is logged once, recovery too).
    down: AtomicBool,
}

const REDIS_PREFIX: &str = "kvmerger:ctx:";

impl RedisStore {
    pub fn open(url: &str, ttl: u64) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| err(url, e))?;
        let s = RedisStore {
            client,
            url: url.to_string(),
            ttl,
            conn: Mutex::new(None),
            down: AtomicBool::new(false),
        };
        // Reachable now? A server that starts before its Redis still starts.
        if let Err(e) = s.with(|c| redis::cmd("PING").query::<String>(c)) {
            eprintln!("warning: {e}; serving from memory until it answers");
        }
        Ok(s)
    }

    /// Runs `f` on a connection (made on first use, or again after a failure).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(Duration::from_secs(2))
                .and_then(|c| {
                    c.set_read_timeout(Some(Duration::from_secs(10)))?;
                    c.set_write_timeout(Some(Duration::from_secs(10)))?;
                    Ok(c)
                });
            match c {
                Ok(c) => *guard = Some(c),
                Err(e) => return Err(self.failed(e)),
            }
        }
        let conn = guard.as_mut().expect("connected above");
        match f(conn) {
            Ok(v) => {
                if self.down.swap(false, Relaxed) {
                    eprintln!("context store: Redis at {} answers again", self.url);
                }
                Ok(v)
            }
            Err(e) => {
                *guard = None;
                Err(self.failed(e))
            }
        }
    }

    fn failed(&self, e: redis::RedisError) -> StoreError {
        let e = err(&format!("redis {}", self.url), e);
        if !self.down.swap(true, Relaxed) {
            eprintln!("warning: {e}; serving from memory until it answers");
        }
        e
    }
}

impl ContextStore for RedisStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if !valid_key(key) {
            return Ok(None);
        }
        let k = format!("{REDIS_PREFIX}{key}");
        let ttl = self.ttl;
        self.with(|c| {
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&k).query(c)?;
            if v.is_some() && ttl > 0 {
                redis::cmd("EXPIRE").arg(&k).arg(ttl).query::<()>(c)?;
            }
            Ok(v)
        })
    }

    fn get_prefix(&self, key: &str, n: usize) -> Result<Option<Vec<u8>>, StoreError> {
        if !valid_key(key) || n == 0 {
            return Ok(None);
        }
        let k = format!("{REDIS_PREFIX}{key}");
        self.with(|c| {
            let v: Vec<u8> = redis::cmd("GETRANGE").arg(&k).arg(0).arg(n - 1).query(c)?;
            Ok((!v.is_empty()).then_some(v))
        })
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        if !valid_key(key) {
            return Err(err("put", format!("'{key}' is not a store key")));
        }
        let k = format!("{REDIS_PREFIX}{key}");
        let ttl = self.ttl;
        self.with(|c| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&k).arg(bytes);
            if ttl > 0 {
                cmd.arg("EX").arg(ttl);
            }
            cmd.query::<()>(c)
        })
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        if !valid_key(key) {
            return Ok(false);
        }
        let k = format!("{REDIS_PREFIX}{key}");
        self.with(|c| redis::cmd("DEL").arg(&k).query::<u64>(c).map(|n| n > 0))
    }

    fn list(&self) -> Result<Vec<Listed>, StoreError> {
        self.with(|c| {
            let mut out = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{REDIS_PREFIX}*"))
                    .arg("COUNT")
                    .arg(256)
                    .query(c)?;
                for k in keys {
                    let bytes: u64 = redis::cmd("STRLEN").arg(&k).query(c)?;
                    if let Some(key) = k.strip_prefix(REDIS_PREFIX) {
                        out.push(Listed {
                            key: key.to_string(),
                            bytes,
                        });
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            Ok(out)
        })
    }

    fn describe(&self) -> String {
        format!("redis {}", self.url)
    }
}

/// Contexts in this process's memory, at most `max_bytes`, least recently used first
/// out.
pub struct MemoryStore {
    max_bytes: u64,
    inner: Mutex<(Entries, u64)>,
}

/// Key -> (last use, bytes).
type Entries = HashMap<String, (u64, Arc<Vec<u8>>)>;

/// A key and the bytes to write under it.
type Entry = (String, Vec<u8>);

impl MemoryStore {
    pub fn new(max_bytes: u64) -> MemoryStore {
        MemoryStore {
            max_bytes,
            inner: Mutex::new((HashMap::new(), 0)),
        }
    }
}

impl ContextStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1 += 1;
        let clock = g.1;
        Ok(g.0.get_mut(key).map(|e| {
            e.0 = clock;
            e.1.as_ref().clone()
        }))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1 += 1;
        let clock = g.1;
        g.0.insert(key.to_string(), (clock, Arc::new(bytes.to_vec())));
        loop {
            let total: u64 = g.0.values().map(|e| e.1.len() as u64).sum();
            if total <= self.max_bytes {
                break;
            }
            let oldest = g.0.iter().min_by_key(|e| e.1 .0).map(|e| e.0.clone());
            match oldest {
                Some(k) => {
                    g.0.remove(&k);
                }
                None => break,
            }
        }
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Ok(g.0.remove(key).is_some())
    }

    fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let sorted: BTreeMap<u64, Listed> =
            g.0.iter()
                .map(|(k, (t, b))| {
                    (
                        *t,
                        Listed {
                            key: k.clone(),
                            bytes: b.len() as u64,
                        },
                    )
                })
                .collect();
        Ok(sorted.into_values().rev().collect())
    }

    fn describe(&self) -> String {
        format!(
            "memory (at most {:.1} MiB)",
            self.max_bytes as f64 / (1 << 20) as f64
        )
    }
}

/// Where `--context-store` points.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreSpec {
    Disk { dir: PathBuf, max_bytes: u64 },
    Redis { url: String, ttl: u64 },
}

impl StoreSpec {
    /// `redis://HOST:PORT[/DB]` or a directory.
    pub fn parse(value: &str, max_bytes: u64, ttl: u64) -> Result<StoreSpec, String> {
        if value.trim().is_empty() {
            return Err("the context store is empty: give a directory or redis://HOST:PORT".into());
        }
        if value.starts_with("redis://") || value.starts_with("rediss://") {
            redis::Client::open(value).map_err(|e| format!("{value}: {e}"))?;
            return Ok(StoreSpec::Redis {
                url: value.to_string(),
                ttl,
            });
        }
        if value.contains("://") {
            return Err(format!(
                "{value}: a context store is a directory or redis://HOST:PORT"
            ));
        }
        Ok(StoreSpec::Disk {
            dir: PathBuf::from(value),
            max_bytes,
        })
    }

    pub fn open(&self) -> Result<Arc<dyn ContextStore>, StoreError> {
        Ok(match self {
            StoreSpec::Disk { dir, max_bytes } => {
                Arc::new(DiskStore::open(dir.clone(), *max_bytes)?)
            }
            StoreSpec::Redis { url, ttl } => Arc::new(RedisStore::open(url, *ttl)?),
        })
    }
}

/// One thread that writes entries, so that the engine never waits on a disk or Redis.
/// Entries are dropped (with a count in the metrics) when more than `queue` wait.
pub struct Writer {
    tx: Mutex<Option<mpsc::SyncSender<Entry>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    pub fn start(
        store: Arc<dyn ContextStore>,
        queue: usize,
        done: impl Fn(Result<usize, StoreError>) + Send + 'static,
    ) -> Writer {
        let (tx, rx) = mpsc::sync_channel::<(String, Vec<u8>)>(queue.max(1));
        let thread = std::thread::Builder::new()
            .name("kvmerger-store".into())
            .spawn(move || {
                for (key, bytes) in rx {
                    done(store.put(&key, &bytes).map(|_| bytes.len()));
                }
            })
            .ok();
        Writer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(thread),
        }
    }

    /// Queue an entry; false when the queue is full (the entry is dropped).
    pub fn write(&self, key: String, bytes: Vec<u8>) -> bool {
        let g = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .is_some_and(|tx| tx.try_send((key, bytes)).is_ok())
    }

    /// Write what is queued, then stop.
    pub fn finish(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_part_and_are_safe_file_names() {
        let k = key("fp", "kvzip@0.25|agnostic", "f16", &[1, 2, 3]);
        assert!(valid_key(&k), "{k}");
        assert_ne!(k, key("fp2", "kvzip@0.25|agnostic", "f16", &[1, 2, 3]));
        assert_ne!(k, key("fp", "kvzip@0.5|agnostic", "f16", &[1, 2, 3]));
        assert_ne!(k, key("fp", "kvzip@0.25|agnostic", "q8_0", &[1, 2, 3]));
        assert_ne!(k, key("fp", "kvzip@0.25|agnostic", "f16", &[1, 2]));
        // Length-prefixed parts: moving a character between parts changes the key.
        assert_ne!(key("ab", "c", "f16", &[]), key("a", "bc", "f16", &[]));
        for bad in [
            "../etc/passwd",
            "",
            "ABCDEF0123456789ABCDEF0123456789ABCDEF01",
        ] {
            assert!(!valid_key(bad));
        }
    }

    #[test]
    fn the_disk_store_evicts_the_least_recently_used_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let k = |i: u32| key("fp", "r", "f16", &[i]);
        let s = DiskStore::open(dir.path().to_path_buf(), 2500).unwrap();
        s.put(&k(1), &[1u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.put(&k(2), &[2u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // A read makes entry 1 the most recent: entry 2 goes when 3 arrives.
        assert_eq!(s.get(&k(1)).unwrap().unwrap().len(), 1000);
        std::thread::sleep(Duration::from_millis(20));
        s.put(&k(3), &[3u8; 1000]).unwrap();
        assert!(s.get(&k(2)).unwrap().is_none());
        drop(s);
        let s = DiskStore::open(dir.path().to_path_buf(), 2500).unwrap();
        assert_eq!(s.get(&k(1)).unwrap().unwrap(), vec![1u8; 1000]);
        assert_eq!(s.get_prefix(&k(3), 10).unwrap().unwrap(), vec![3u8; 10]);
        assert_eq!(s.list().unwrap().len(), 2);
        assert!(s.delete(&k(3)).unwrap());
        assert!(!s.delete(&k(3)).unwrap());
        // An entry larger than the store is refused, not written.
        assert!(s.put(&k(4), &[0u8; 3000]).is_err());
        assert!(s.get(&k(4)).unwrap().is_none());
        // A key that is not one never reaches the file system.
        assert!(s.get("../x").unwrap().is_none());
    }

    #[test]
    fn the_memory_store_keeps_within_its_bound() {
        let s = MemoryStore::new(2500);
        for i in 0..5u32 {
            s.put(&key("fp", "r", "f16", &[i]), &[0u8; 1000]).unwrap();
        }
        assert_eq!(s.list().unwrap().len(), 2);
        assert!(s.get(&key("fp", "r", "f16", &[4])).unwrap().is_some());
        assert!(s.get(&key("fp", "r", "f16", &[0])).unwrap().is_none());
    }
}
