//! Images: references, registries config, pulling, the on-disk store, layer
//! unpacking, lookups and filesystem usage.

pub mod pull;
pub mod reference;
pub mod registries;
pub mod store;
pub mod unpack;

use crate::config::Config;
use pull::{Credentials, PullError, Puller};
use reference::ImageRef;
use registries::{RegistriesConf, RegistriesError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::{ImageRecord, ImageStore, ImageStoreError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Store(#[from] ImageStoreError),
    #[error(transparent)]
    Registries(#[from] RegistriesError),
    #[error("image {0:?}: empty image reference")]
    Empty(String),
    #[error("read config of image {id}: {detail}")]
    Config { id: String, detail: String },
}

pub struct ImageManager {
    store: Arc<ImageStore>,
    puller: Arc<Puller>,
    containers_dir: PathBuf,
}

/// Disk use of a directory tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

impl ImageManager {
    pub fn open(cfg: &Config) -> Result<ImageManager, ImageError> {
        let store = ImageStore::open(&cfg.root)?;
        let registries = RegistriesConf::load(&cfg.registries_config)?;
        let containers_dir = cfg.root.join("containers");
        std::fs::create_dir_all(&containers_dir).map_err(|source| ImageStoreError::Io {
            path: containers_dir.display().to_string(),
            source,
        })?;
        Ok(ImageManager {
            puller: Arc::new(Puller::new(store.clone(), registries, cfg.image.clone())),
            store,
            containers_dir,
        })
    }

    /// Pulls in a task of its own: a client that goes away mid-pull does not
    /// cut a download or an unpack in half.
    pub async fn pull(&self, image: &str, creds: Credentials) -> Result<ImageRecord, ImageError> {
        if image.trim().is_empty() {
            return Err(ImageError::Empty(image.to_string()));
        }
        let puller = self.puller.clone();
        let image = image.to_string();
        let name = image.clone();
        tokio::spawn(async move { puller.pull(&image, creds).await })
            .await
            .map_err(|e| {
                ImageError::Pull(PullError::Internal {
                    image: name,
                    detail: format!("pull task: {e}"),
                })
            })?
            .map_err(ImageError::Pull)
    }

    /// Looks an image up by reference (tag or digest), by id or by
    /// unambiguous id prefix. `None` when there is no such image.
    pub fn find(&self, query: &str) -> Option<ImageRecord> {
        let name = ImageRef::parse(query).ok().map(|r| {
            // `name:tag@digest` is found by its digest, as containerd does.
            match &r.digest {
                Some(d) => r.with_digest(d),
                None => r.tagged().unwrap_or_else(|| r.name()),
            }
        });
        self.store.find(name.as_deref(), query)
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        self.store.list()
    }

    /// Removes the image and every tag of it; absent images are fine.
    pub fn remove(&self, query: &str) -> Result<Option<ImageRecord>, ImageError> {
        match self.find(query) {
            Some(img) => {
                self.store.remove(&img.id)?;
                Ok(Some(img))
            }
            None => Ok(None),
        }
    }

    /// The image's config as stored (JSON).
    pub fn config_json(&self, img: &ImageRecord) -> Result<serde_json::Value, ImageError> {
        let path = self.store.blob_path(&img.id);
        let bytes = std::fs::read(&path).map_err(|e| ImageError::Config {
            id: img.id.clone(),
            detail: format!("{}: {e}", path.display()),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Config {
            id: img.id.clone(),
            detail: e.to_string(),
        })
    }

    pub fn image_fs_dir(&self) -> &Path {
        self.store.layers_root()
    }

    pub fn container_fs_dir(&self) -> &Path {
        &self.containers_dir
    }

    /// Usage of the image filesystem (layers and content) and of the
    /// containers directory. Walks the trees, so run it off the async threads.
    pub fn usage(&self) -> (Usage, Usage) {
        let mut images = dir_usage(self.store.layers_root());
        let content = dir_usage(self.store.content_root());
        images.bytes += content.bytes;
        images.inodes += content.inodes;
        (images, dir_usage(&self.containers_dir))
    }
}

fn dir_usage(root: &Path) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut u = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            u.inodes += 1;
            u.bytes += m.blocks() * 512;
            // Image volumes are mounted under the containers' directories:
            // their content is the image filesystem's, not counted twice.
            if m.is_dir() && !crate::linux::imagevol::is_mount_root(&e.path()) {
                stack.push(e.path());
            }
        }
    }
    u
}
