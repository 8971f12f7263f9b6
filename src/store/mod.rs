//! Crash-safe on-disk state: every state file is written to a temp file,
//! fsynced, renamed over the old one, and the directory fsynced, so a kill -9
//! at any point leaves either the old or the new content, never a torn file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("decode {path}: {source}")]
    Decode {
        path: String,
        source: serde_json::Error,
    },
}

/// Atomically replaces `path` with `data`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let err = |source| StoreError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per write: two threads may replace the same file at once.
    let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    sync_dir(dir).map_err(err)
}

/// Serialises `value` as JSON and writes it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Write {
        path: path.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(path, &data)
}

/// Reads a JSON state file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| StoreError::Decode {
                path: path.display().to_string(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// fsyncs a directory so that a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Locks a state mutex; a panic while it was held leaves plain data behind,
/// so keep serving rather than poisoning every later RPC.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How an id or id prefix matched the keys of an index.
#[derive(Debug, PartialEq, Eq)]
pub enum IdMatch {
    Found(String),
    NotFound,
    Ambiguous,
}

/// Finds `id` exactly, or as the unambiguous prefix of one key.
pub fn resolve_id<V>(index: &std::collections::BTreeMap<String, V>, id: &str) -> IdMatch {
    if index.contains_key(id) {
        return IdMatch::Found(id.to_string());
    }
    if id.is_empty() {
        return IdMatch::NotFound;
    }
    let mut m = index
        .range(id.to_string()..)
        .map(|(k, _)| k)
        .take_while(|k| k.starts_with(id));
    match (m.next(), m.next()) {
        (Some(k), None) => IdMatch::Found(k.clone()),
        (Some(_), Some(_)) => IdMatch::Ambiguous,
        _ => IdMatch::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefixes() {
        let m: std::collections::BTreeMap<String, ()> = ["abc1", "abc2", "b"]
            .iter()
            .map(|k| (k.to_string(), ()))
            .collect();
        assert_eq!(resolve_id(&m, "b"), IdMatch::Found("b".into()));
        assert_eq!(resolve_id(&m, "abc1"), IdMatch::Found("abc1".into()));
        assert_eq!(resolve_id(&m, "abc"), IdMatch::Ambiguous);
        assert_eq!(resolve_id(&m, "c"), IdMatch::NotFound);
        assert_eq!(resolve_id(&m, ""), IdMatch::NotFound);
    }

    #[test]
    fn atomic_roundtrip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        assert!(read_json::<Vec<u32>>(&p).unwrap().is_none());
        write_json(&p, &vec![1u32, 2]).unwrap();
        write_json(&p, &vec![3u32]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&p).unwrap(), Some(vec![3]));
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temp files left behind");
    }

    #[test]
    fn corrupt_file_is_a_decode_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        fs::write(&p, b"{not json").unwrap();
        let e = read_json::<Vec<u32>>(&p).unwrap_err();
        assert!(e.to_string().contains("bad.json"), "{e}");
    }
}
