//! The image store on disk (see ARCHITECTURE "On disk"):
//! `content/sha256/<hex>` verified blobs, `layers/<chain-id hex>/` unpacked
//! layers shared between images, and `images.json`, the index that makes an
//! image visible. A pull writes blobs and layers first (through temp names
//! renamed into place) and the index last, so a kill -9 at any point leaves no
//! half image: leftovers are collected at the next start.

use crate::store::{read_json, write_json, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error(transparent)]
    State(#[from] StoreError),
    #[error("image store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageStoreError + '_ {
    move |source| ImageStoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the (compressed) blob as the registry serves it.
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    pub chain_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:<config digest>`.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    /// Sum of the compressed layer sizes (what containerd reports).
    pub size: u64,
    /// Manifests this image was resolved through: index (if any) and image manifest.
    pub manifests: Vec<String>,
    /// Bottom layer first.
    pub layers: Vec<LayerRecord>,
    /// The config's `User`, as written in the image.
    pub user: String,
    /// Unix seconds.
    pub created: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    images: BTreeMap<String, ImageRecord>,
}

#[derive(Default)]
struct State {
    index: Index,
    /// Blobs and layers an in-flight pull (or a container) relies on although
    /// no image in the index references them yet: GC must keep them.
    leases: HashMap<String, usize>,
}

pub struct ImageStore {
    content: PathBuf,
    ingest: PathBuf,
    layers: PathBuf,
    staging: PathBuf,
    trash: PathBuf,
    index_path: PathBuf,
    state: Mutex<State>,
}

/// Keeps blobs and layers alive while held.
pub struct Lease {
    store: Arc<ImageStore>,
    keys: Vec<String>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.store.lock();
        for k in &self.keys {
            if let Some(n) = st.leases.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    st.leases.remove(k);
                }
            }
        }
    }
}

pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl ImageStore {
    /// Opens (creating) the store under `root`, removes leftovers of
    /// interrupted pulls and collects unreferenced blobs and layers.
    pub fn open(root: &Path) -> Result<Arc<ImageStore>, ImageStoreError> {
        let content = root.join("content/sha256");
        let layers = root.join("layers");
        let s = ImageStore {
            ingest: root.join("content/ingest"),
            staging: layers.join(".staging"),
            trash: root.join(".trash"),
            index_path: root.join("images.json"),
            content,
            layers,
            state: Mutex::new(State::default()),
        };
        for d in [&s.ingest, &s.staging, &s.trash] {
            if d.exists() {
                remove_tree(d).map_err(io_err(d))?;
            }
        }
        for d in [&s.content, &s.ingest, &s.layers, &s.staging, &s.trash] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let index: Index = read_json(&s.index_path)?.unwrap_or_default();
        s.lock().index = index;
        let s = Arc::new(s);
        s.gc()?;
        Ok(s)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.content.join(hex_of(digest))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).exists()
    }

    /// A fresh temp path for a download in progress.
    pub fn ingest_path(&self) -> PathBuf {
        self.ingest.join(random_name())
    }

    /// Moves a verified download into the content store.
    pub fn commit_blob(&self, tmp: &Path, digest: &str) -> Result<(), ImageStoreError> {
        let dst = self.blob_path(digest);
        fs::rename(tmp, &dst).map_err(io_err(&dst))?;
        crate::store::sync_dir(&self.content).map_err(io_err(&self.content))
    }

    pub fn layer_dir(&self, chain_id: &str) -> PathBuf {
        self.layers.join(hex_of(chain_id))
    }

    pub fn has_layer(&self, chain_id: &str) -> bool {
        self.layer_dir(chain_id).is_dir()
    }

    /// A fresh empty directory to unpack a layer into.
    pub fn staging_dir(&self) -> Result<PathBuf, ImageStoreError> {
        let d = self.staging.join(random_name());
        fs::create_dir(&d).map_err(io_err(&d))?;
        Ok(d)
    }

    pub fn commit_layer(&self, staged: &Path, chain_id: &str) -> Result<(), ImageStoreError> {
        let dst = self.layer_dir(chain_id);
        fs::rename(staged, &dst).map_err(io_err(&dst))?;
        crate::store::sync_dir(&self.layers).map_err(io_err(&self.layers))
    }

    /// Removes a staged or partial directory/file in the background-safe way.
    pub fn discard(&self, path: &Path) {
        if let Err(e) = remove_tree(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover");
        }
    }

    pub fn lease(self: &Arc<Self>, keys: Vec<String>) -> Lease {
        let mut st = self.lock();
        for k in &keys {
            *st.leases.entry(k.clone()).or_default() += 1;
        }
        drop(st);
        Lease {
            store: self.clone(),
            keys,
        }
    }

    /// Adds or merges `rec`; `tag` moves to this image from any other.
    pub fn add_image(
        &self,
        mut rec: ImageRecord,
        tag: Option<String>,
        repo_digest: String,
    ) -> Result<ImageRecord, ImageStoreError> {
        let mut st = self.lock();
        if let Some(t) = &tag {
            for other in st.index.images.values_mut() {
                if other.id != rec.id {
                    other.repo_tags.retain(|x| x != t);
                }
            }
        }
        if let Some(existing) = st.index.images.get(&rec.id) {
            rec.repo_tags = existing.repo_tags.clone();
            rec.repo_digests = existing.repo_digests.clone();
            for m in &existing.manifests {
                if !rec.manifests.contains(m) {
                    rec.manifests.push(m.clone());
                }
            }
            rec.created = existing.created;
        }
        if let Some(t) = tag {
            if !rec.repo_tags.contains(&t) {
                rec.repo_tags.push(t);
            }
        }
        if !rec.repo_digests.contains(&repo_digest) {
            rec.repo_digests.push(repo_digest);
        }
        st.index.images.insert(rec.id.clone(), rec.clone());
        // Images left with no name at all cannot be asked for any more.
        st.index
            .images
            .retain(|_, i| !i.repo_tags.is_empty() || !i.repo_digests.is_empty());
        write_json(&self.index_path, &st.index)?;
        Ok(rec)
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        self.lock().index.images.values().cloned().collect()
    }

    #[cfg(test)]
    pub fn get(&self, id: &str) -> Option<ImageRecord> {
        self.lock().index.images.get(id).cloned()
    }

    /// Finds an image by repo tag, by repo digest, by id or by unambiguous id prefix.
    pub fn find(&self, tag_or_digest: Option<&str>, raw: &str) -> Option<ImageRecord> {
        let st = self.lock();
        let images = &st.index.images;
        if let Some(i) = images.get(raw) {
            return Some(i.clone());
        }
        if let Some(name) = tag_or_digest {
            if let Some(i) = images.values().find(|i| {
                i.repo_tags.iter().any(|t| t == name) || i.repo_digests.iter().any(|d| d == name)
            }) {
                return Some(i.clone());
            }
        }
        let hex = raw.strip_prefix("sha256:").unwrap_or(raw);
        if !super::reference::is_hex(hex) {
            return None;
        }
        let mut matches = images.values().filter(|i| hex_of(&i.id).starts_with(hex));
        match (matches.next(), matches.next()) {
            (Some(i), None) => Some(i.clone()),
            _ => None,
        }
    }

    /// Drops the image (all its tags and digests) and collects what no other
    /// image uses. Removing an absent image is not an error.
    pub fn remove(&self, id: &str) -> Result<bool, ImageStoreError> {
        let removed = {
            let mut st = self.lock();
            let removed = st.index.images.remove(id).is_some();
            if removed {
                write_json(&self.index_path, &st.index)?;
            }
            removed
        };
        if removed {
            self.gc()?;
        }
        Ok(removed)
    }

    /// Deletes blobs and layers that neither an image nor a lease references.
    pub fn gc(&self) -> Result<(), ImageStoreError> {
        let doomed: Vec<PathBuf> = {
            let st = self.lock();
            let mut keep: HashSet<String> =
                st.leases.keys().map(|k| hex_of(k).to_string()).collect();
            for i in st.index.images.values() {
                keep.insert(hex_of(&i.id).to_string());
                for m in &i.manifests {
                    keep.insert(hex_of(m).to_string());
                }
                for l in &i.layers {
                    keep.insert(hex_of(&l.digest).to_string());
                    keep.insert(hex_of(&l.chain_id).to_string());
                }
            }
            let mut doomed = Vec::new();
            for dir in [&self.content, &self.layers] {
                for e in fs::read_dir(dir).map_err(io_err(dir))? {
                    let e = e.map_err(io_err(dir))?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') || keep.contains(&name) {
                        continue;
                    }
                    // Renamed away under the lock, so a concurrent pull either
                    // sees the object or re-creates it; never half of it.
                    let t = self.trash.join(random_name());
                    fs::rename(e.path(), &t).map_err(io_err(&e.path()))?;
                    doomed.push(t);
                }
            }
            doomed
        };
        for d in doomed {
            self.discard(&d);
        }
        Ok(())
    }

    pub fn layers_root(&self) -> &Path {
        &self.layers
    }

    pub fn content_root(&self) -> &Path {
        &self.content
    }
}

fn random_name() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Removes a file or a whole tree, not following symlinks.
pub fn remove_tree(p: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, layer: &str) -> ImageRecord {
        ImageRecord {
            id: format!("sha256:{id}"),
            repo_tags: vec![],
            repo_digests: vec![],
            size: 1,
            manifests: vec![],
            layers: vec![LayerRecord {
                digest: format!("sha256:b{layer}"),
                media_type: String::new(),
                size: 1,
                diff_id: String::new(),
                chain_id: format!("sha256:c{layer}"),
            }],
            user: String::new(),
            created: 0,
        }
    }

    #[test]
    fn tags_move_and_gc_keeps_shared_layers() {
        let dir = tempfile::tempdir().unwrap();
        let s = ImageStore::open(dir.path()).unwrap();
        for l in ["1", "2"] {
            fs::write(s.blob_path(&format!("sha256:b{l}")), b"x").unwrap();
            fs::create_dir(s.layer_dir(&format!("sha256:c{l}"))).unwrap();
        }
        s.add_image(rec("aa", "1"), Some("r/x:1".into()), "r/x@sha256:m1".into())
            .unwrap();
        s.add_image(rec("bb", "1"), Some("r/x:1".into()), "r/x@sha256:m2".into())
            .unwrap();
        let a = s.get("sha256:aa").unwrap();
        assert!(a.repo_tags.is_empty(), "tag moved away: {a:?}");
        assert_eq!(s.find(Some("r/x:1"), "r/x:1").unwrap().id, "sha256:bb");
        assert_eq!(s.find(None, "b").unwrap().id, "sha256:bb");
        assert!(s.find(None, "c").is_none());
        // Unreferenced layer 2 goes at the next GC; layer 1 is shared.
        s.gc().unwrap();
        assert!(!s.has_layer("sha256:c2") && !s.has_blob("sha256:b2"));
        s.remove("sha256:aa").unwrap();
        assert!(s.has_layer("sha256:c1"));
        s.remove("sha256:bb").unwrap();
        assert!(!s.has_layer("sha256:c1") && !s.has_blob("sha256:b1"));
        assert!(!s.remove("sha256:bb").unwrap());
    }

    #[test]
    fn leases_protect_and_reopen_cleans() {
        let dir = tempfile::tempdir().unwrap();
        let s = ImageStore::open(dir.path()).unwrap();
        fs::create_dir(s.layer_dir("sha256:c9")).unwrap();
        let lease = s.lease(vec!["sha256:c9".into()]);
        s.gc().unwrap();
        assert!(s.has_layer("sha256:c9"));
        drop(lease);
        let staged = s.staging_dir().unwrap();
        fs::write(s.ingest_path(), b"partial").unwrap();
        drop(s);
        let s = ImageStore::open(dir.path()).unwrap();
        assert!(!staged.exists());
        assert!(!s.has_layer("sha256:c9"));
        assert_eq!(
            fs::read_dir(dir.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
