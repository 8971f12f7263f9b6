//! Pulling an image: resolve the reference through registries.conf (mirrors
//! first), fetch and verify the manifest (choosing this platform from an
//! index), download layers concurrently into the content store (each blob
//! checked against digest and size), unpack them in order, each verified
//! against its diff_id, and only then record the image in the index.
//!
//! The registry protocol (auth challenges, tokens, HTTP) is oci-client's; what
//! it lacks (mirrors, digest-verified streaming into our store, platform
//! variants, layer pipelining) is here.

mod auth;
mod layer;
mod manifest;

pub use auth::Credentials;
pub use manifest::host_arch;

use crate::config::ImageConfig;
use crate::image::reference::{parse_digest, ImageRef};
use crate::image::registries::{Endpoint, RegistriesConf, Resolution};
use crate::image::store::{hex_of, ImageRecord, ImageStore, ImageStoreError, LayerRecord};
use crate::image::unpack::UnpackError;
use auth::{registry_auth, Auth, ExchangeError};
use futures::StreamExt;
use layer::{unpack_verified, write_hashed, LayerFailure, RemoveOnDrop};
use manifest::{
    choose_platform, layer_compression, parse_manifest, sha256_hex, verify_manifest, Compression,
    ImageConfigJson, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST,
};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAX_CONFIG_BYTES: u64 = 8 << 20;
const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pull {image}: registry {prefix} is blocked by the registries config")]
    Blocked { image: String, prefix: String },
    #[error("pull {image}: not found: {detail}")]
    NotFound { image: String, detail: String },
    #[error("pull {image}: authentication failed: {detail}")]
    Unauthorized { image: String, detail: String },
    #[error("pull {image}: registry unavailable: {detail}")]
    Unavailable { image: String, detail: String },
    #[error("pull {image}: {detail}")]
    Registry { image: String, detail: String },
    #[error("pull {image}: {what} {digest}: content does not match its digest/size: {detail}")]
    Integrity {
        image: String,
        what: &'static str,
        digest: String,
        detail: String,
    },
    #[error("pull {image}: unsupported image: {detail}")]
    Unsupported { image: String, detail: String },
    #[error("pull {image}: layer {digest} rejected: {source}")]
    BadLayer {
        image: String,
        digest: String,
        source: UnpackError,
    },
    #[error("pull {image}: bad credentials in the request: {detail}")]
    BadAuth { image: String, detail: String },
    #[error("pull {image}: {source}")]
    Store {
        image: String,
        source: ImageStoreError,
    },
    #[error("pull {image}: {detail}")]
    Internal { image: String, detail: String },
}

pub struct Puller {
    store: Arc<ImageStore>,
    registries: RegistriesConf,
    cfg: ImageConfig,
    /// One download per blob and one unpack per layer, whatever the number of
    /// pulls that need it at once.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    downloads: Arc<tokio::sync::Semaphore>,
}

struct PullCtx {
    image: String,
    client: Client,
    reference: Reference,
}

impl Puller {
    pub fn new(store: Arc<ImageStore>, registries: RegistriesConf, cfg: ImageConfig) -> Puller {
        let downloads = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_downloads));
        Puller {
            store,
            registries,
            cfg,
            locks: Mutex::new(HashMap::new()),
            downloads,
        }
    }

    /// Pulls `image` and returns its record.
    pub async fn pull(
        self: &Arc<Self>,
        image: &str,
        creds: Credentials,
    ) -> Result<ImageRecord, PullError> {
        let wanted = ImageRef::parse(image).map_err(|e| PullError::Unsupported {
            image: image.to_string(),
            detail: e.to_string(),
        })?;
        let name = wanted.to_string();
        let auth = registry_auth(&creds).map_err(|detail| PullError::BadAuth {
            image: name.clone(),
            detail,
        })?;
        let endpoints = match self.registries.resolve(&wanted) {
            Resolution::Blocked { prefix } => {
                return Err(PullError::Blocked {
                    image: name,
                    prefix,
                })
            }
            Resolution::Endpoints(e) => e,
        };
        let mut failures: Vec<(Endpoint, PullError)> = Vec::new();
        for ep in endpoints {
            let res = match &auth {
                Auth::Registry(a) => self.pull_from(&wanted, &ep, a).await,
                Auth::Identity(token) => match self.identity_auth(&name, &ep, token).await {
                    Ok(a) => self.pull_from(&wanted, &ep, &a).await,
                    Err(e) => Err(e),
                },
            };
            match res {
                Ok(rec) => return Ok(rec),
                // Content that fails verification or is unsafe is the image's
                // fault, not the endpoint's: trying elsewhere would hide it.
                Err(
                    e @ (PullError::Integrity { .. }
                    | PullError::BadLayer { .. }
                    | PullError::Store { .. }),
                ) => return Err(e),
                Err(e) => {
                    tracing::warn!(image = %name, endpoint = %ep.reference, error = %e, "pull from endpoint failed");
                    failures.push((ep, e));
                }
            }
        }
        let Some((_, last)) = failures.pop() else {
            return Err(PullError::Internal {
                image: name,
                detail: "no registry endpoint to pull from".into(),
            });
        };
        if failures.is_empty() {
            return Err(last);
        }
        // Report the registry's own answer, mention the mirrors tried before.
        let tried: Vec<String> = failures
            .iter()
            .map(|(ep, e)| format!("mirror {}: {e}", ep.reference.domain))
            .collect();
        let mut last = last;
        if let Some(d) = last.registry_detail_mut() {
            d.push_str(&format!(" (also tried {})", tried.join("; ")));
        }
        Err(last)
    }

    /// PEM CA certificates trusted for `host`: the global ones plus
    /// `<certs_dir>/<host>/*.crt|*.pem`.
    fn ca_certs(&self, host: &str) -> Result<Vec<Vec<u8>>, String> {
        let mut files: Vec<PathBuf> = self.cfg.ca_files.clone();
        if let Ok(rd) = std::fs::read_dir(self.cfg.certs_dir.join(host)) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "crt" || x == "pem") {
                    files.push(p);
                }
            }
        }
        files
            .iter()
            .map(|f| std::fs::read(f).map_err(|e| format!("read CA file {}: {e}", f.display())))
            .collect()
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.registry_timeout_secs.max(1))
    }

    fn client_for(&self, ep: &Endpoint) -> Result<Client, String> {
        let host = &ep.reference.domain;
        let certs = self
            .ca_certs(host)?
            .into_iter()
            .map(|data| Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            })
            .collect();
        let config = ClientConfig {
            protocol: if ep.insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: certs,
            platform_resolver: None,
            read_timeout: Some(self.timeout()),
            connect_timeout: Some(self.timeout()),
            user_agent: USER_AGENT,
            ..Default::default()
        };
        Client::try_from(config).map_err(|e| format!("registry client for {host}: {e}"))
    }

    /// The access token an identity token buys at `ep`'s token realm.
    async fn identity_auth(
        &self,
        image: &str,
        ep: &Endpoint,
        refresh_token: &str,
    ) -> Result<RegistryAuth, PullError> {
        let r = &ep.reference;
        let unavailable = |detail: String| PullError::Unavailable {
            image: image.to_string(),
            detail,
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(self.timeout())
            .read_timeout(self.timeout());
        let mut certs = Vec::new();
        for pem in self.ca_certs(&r.domain).map_err(unavailable)? {
            certs.push(
                reqwest::Certificate::from_pem(&pem)
                    .map_err(|e| unavailable(format!("CA certificate for {}: {e}", r.domain)))?,
            );
        }
        if !certs.is_empty() {
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| unavailable(format!("HTTP client: {e}")))?;
        let scheme = if ep.insecure { "http" } else { "https" };
        let base = format!("{scheme}://{}", r.domain);
        match auth::exchange_identity_token(&http, &base, &r.path, refresh_token).await {
            Ok(token) => Ok(RegistryAuth::Bearer(token)),
            Err(ExchangeError::Unreachable(detail)) => Err(unavailable(detail)),
            Err(ExchangeError::Refused(detail)) => Err(PullError::Unauthorized {
                image: image.to_string(),
                detail,
            }),
        }
    }

    async fn pull_from(
        self: &Arc<Self>,
        wanted: &ImageRef,
        ep: &Endpoint,
        auth: &RegistryAuth,
    ) -> Result<ImageRecord, PullError> {
        let image = wanted.to_string();
        let client = self.client_for(ep).map_err(|detail| PullError::Internal {
            image: image.clone(),
            detail,
        })?;
        let r = &ep.reference;
        let reference = match (&r.digest, &r.tag) {
            (Some(d), _) => Reference::with_digest(r.domain.clone(), r.path.clone(), d.clone()),
            (None, Some(t)) => Reference::with_tag(r.domain.clone(), r.path.clone(), t.clone()),
            (None, None) => unreachable_tag(&image)?,
        };
        let ctx = Arc::new(PullCtx {
            image: image.clone(),
            client,
            reference,
        });
        // The top-level manifest: its digest is the image's repo digest.
        let (top_bytes, _) = ctx
            .client
            .pull_manifest_raw(
                &ctx.reference,
                auth,
                &[
                    MT_OCI_MANIFEST,
                    MT_DOCKER_MANIFEST,
                    MT_OCI_INDEX,
                    MT_DOCKER_LIST,
                ],
            )
            .await
            .map_err(|e| classify(&image, "manifest", e))?;
        let top_digest = verify_manifest(&image, &top_bytes, r.digest.as_deref())?;
        let mut manifests = vec![top_digest.clone()];
        let mut stored_manifests = vec![(top_digest.clone(), top_bytes.to_vec())];
        let mut manifest = parse_manifest(&image, &top_bytes)?;
        if manifest.manifests.is_some() {
            let chosen =
                choose_platform(manifest.manifests.as_deref().unwrap_or(&[])).ok_or_else(|| {
                    PullError::Unsupported {
                        image: image.clone(),
                        detail: format!(
                            "the image index has no manifest for linux/{}",
                            host_arch().0
                        ),
                    }
                })?;
            let by_digest = Reference::with_digest(
                ctx.reference.registry().to_string(),
                ctx.reference.repository().to_string(),
                chosen.clone(),
            );
            let (bytes, _) = ctx
                .client
                .pull_manifest_raw(&by_digest, auth, &[MT_OCI_MANIFEST, MT_DOCKER_MANIFEST])
                .await
                .map_err(|e| classify(&image, "manifest", e))?;
            let d = verify_manifest(&image, &bytes, Some(&chosen))?;
            manifest = parse_manifest(&image, &bytes)?;
            if manifest.manifests.is_some() {
                return Err(PullError::Unsupported {
                    image,
                    detail: format!("manifest {d} is a nested index"),
                });
            }
            manifests.push(d.clone());
            stored_manifests.push((d, bytes.to_vec()));
        }
        let (config_desc, layer_descs) = match (manifest.config, manifest.layers) {
            (Some(c), Some(l)) => (c, l),
            _ => {
                return Err(PullError::Unsupported {
                    image,
                    detail: "manifest has no config or no layers".into(),
                })
            }
        };
        parse_digest(&config_desc.digest).map_err(|detail| PullError::Unsupported {
            image: image.clone(),
            detail,
        })?;
        if config_desc.size > MAX_CONFIG_BYTES {
            return Err(PullError::Unsupported {
                image,
                detail: format!("config blob of {} bytes is too large", config_desc.size),
            });
        }
        let mut compressions = Vec::new();
        for l in &layer_descs {
            parse_digest(&l.digest).map_err(|detail| PullError::Unsupported {
                image: image.clone(),
                detail: format!("layer: {detail}"),
            })?;
            compressions.push(layer_compression(&l.media_type).ok_or_else(|| {
                PullError::Unsupported {
                    image: image.clone(),
                    detail: format!(
                        "layer {} has unsupported media type {:?}",
                        l.digest, l.media_type
                    ),
                }
            })?);
        }

        // Lease everything this pull may create or rely on before looking at
        // what exists, so a concurrent RemoveImage cannot collect it midway.
        let mut keys: Vec<String> = manifests.clone();
        keys.push(config_desc.digest.clone());
        keys.extend(layer_descs.iter().map(|l| l.digest.clone()));
        let _lease_blobs = self.store.lease(keys);

        self.fetch_blob(
            &ctx,
            &config_desc.digest,
            &config_desc.media_type,
            config_desc.size,
            "config",
        )
        .await?;
        let config_bytes =
            std::fs::read(self.store.blob_path(&config_desc.digest)).map_err(|e| {
                PullError::Internal {
                    image: image.clone(),
                    detail: format!("read config {}: {e}", config_desc.digest),
                }
            })?;
        let config: ImageConfigJson =
            serde_json::from_slice(&config_bytes).map_err(|e| PullError::Unsupported {
                image: image.clone(),
                detail: format!("config {} is not valid JSON: {e}", config_desc.digest),
            })?;
        let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != layer_descs.len() {
            return Err(PullError::Unsupported {
                image,
                detail: format!(
                    "config lists {} diff_ids for {} layers",
                    diff_ids.len(),
                    layer_descs.len()
                ),
            });
        }
        let mut layers = Vec::new();
        let mut chain = String::new();
        for (d, diff_id) in layer_descs.iter().zip(&diff_ids) {
            parse_digest(diff_id).map_err(|detail| PullError::Unsupported {
                image: image.clone(),
                detail: format!("diff_id: {detail}"),
            })?;
            chain = if chain.is_empty() {
                diff_id.clone()
            } else {
                format!(
                    "sha256:{}",
                    sha256_hex(format!("{chain} {diff_id}").as_bytes())
                )
            };
            layers.push(LayerRecord {
                digest: d.digest.clone(),
                media_type: d.media_type.clone(),
                size: d.size,
                diff_id: diff_id.clone(),
                chain_id: chain.clone(),
            });
        }
        let _lease_layers = self
            .store
            .lease(layers.iter().map(|l| l.chain_id.clone()).collect());

        // Downloads run ahead (bounded); unpacking follows in layer order
        // because each layer is checked against the ones below it.
        let mut handles = Vec::new();
        for l in &layers {
            let need = !self.store.has_layer(&l.chain_id);
            let this = self.clone();
            let ctx = ctx.clone();
            let l = l.clone();
            handles.push(tokio::spawn(async move {
                if need {
                    this.fetch_blob(&ctx, &l.digest, &l.media_type, l.size, "layer")
                        .await
                } else {
                    Ok(())
                }
            }));
        }
        let abort_all = |hs: &[tokio::task::JoinHandle<Result<(), PullError>>]| {
            for h in hs {
                h.abort();
            }
        };
        for i in 0..layers.len() {
            let res = match (&mut handles[i]).await {
                Ok(r) => r,
                Err(e) => Err(PullError::Internal {
                    image: image.clone(),
                    detail: format!("download task: {e}"),
                }),
            };
            if let Err(e) = res {
                abort_all(&handles);
                return Err(e);
            }
            if let Err(e) = self.ensure_layer(&image, &layers, i, compressions[i]).await {
                abort_all(&handles);
                return Err(e);
            }
        }

        for (d, bytes) in &stored_manifests {
            self.store_bytes(&image, d, bytes)?;
        }
        let rec = ImageRecord {
            id: config_desc.digest.clone(),
            repo_tags: vec![],
            repo_digests: vec![],
            size: layers.iter().map(|l| l.size).sum(),
            manifests,
            layers,
            user: config.config.and_then(|c| c.user).unwrap_or_default(),
            created: chrono::Utc::now().timestamp(),
        };
        // Names are the ones asked for, even when a mirror served the bytes.
        self.store
            .add_image(rec, wanted.tagged(), wanted.with_digest(&top_digest))
            .map_err(|source| PullError::Store { image, source })
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Forget locks nobody holds any more, so the map stays small.
        m.retain(|_, v| Arc::strong_count(v) > 1);
        m.entry(key.to_string()).or_default().clone()
    }

    fn store_bytes(&self, image: &str, digest: &str, bytes: &[u8]) -> Result<(), PullError> {
        if self.store.has_blob(digest) {
            return Ok(());
        }
        let tmp = self.store.ingest_path();
        let res = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .map_err(|e| PullError::Internal {
                image: image.to_string(),
                detail: format!("write {digest}: {e}"),
            })
            .and_then(|_| {
                self.store
                    .commit_blob(&tmp, digest)
                    .map_err(|source| PullError::Store {
                        image: image.to_string(),
                        source,
                    })
            });
        if res.is_err() {
            self.store.discard(&tmp);
        }
        res
    }

    /// Downloads a blob into the content store unless it is there already.
    async fn fetch_blob(
        &self,
        ctx: &Arc<PullCtx>,
        digest: &str,
        media_type: &str,
        size: u64,
        what: &'static str,
    ) -> Result<(), PullError> {
        let lock = self.lock_for(digest);
        let _held = lock.lock().await;
        if self.store.has_blob(digest) {
            return Ok(());
        }
        let _slot = self
            .downloads
            .acquire()
            .await
            .map_err(|e| PullError::Internal {
                image: ctx.image.clone(),
                detail: e.to_string(),
            })?;
        let desc = OciDescriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        let tmp = self.store.ingest_path();
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let stream = ctx
            .client
            .pull_blob_stream(&ctx.reference, &desc)
            .await
            .map_err(|e| classify(&ctx.image, what, e))?;
        // Hash and write on a blocking thread; the async side only moves bytes.
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(64);
        let writer = {
            let tmp = tmp.clone();
            tokio::task::spawn_blocking(move || write_hashed(&tmp, rx))
        };
        let mut stream = stream.stream;
        let mut received: u64 = 0;
        let mut net_err = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => {
                    received += b.len() as u64;
                    if received > size {
                        break;
                    }
                    if tx.send(b).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    net_err = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| PullError::Internal {
            image: ctx.image.clone(),
            detail: format!("blob writer: {e}"),
        })?;
        if let Some(e) = net_err {
            let detail = e.to_string();
            // oci-client reports its own digest check through the stream too.
            if detail.contains("digest") {
                return Err(PullError::Integrity {
                    image: ctx.image.clone(),
                    what,
                    digest: digest.to_string(),
                    detail,
                });
            }
            return Err(PullError::Unavailable {
                image: ctx.image.clone(),
                detail: format!("download {what} {digest}: {detail}"),
            });
        }
        let (n, actual) = written.map_err(|e| PullError::Internal {
            image: ctx.image.clone(),
            detail: format!("write {what} {digest}: {e}"),
        })?;
        if received > size || n != size {
            return Err(PullError::Integrity {
                image: ctx.image.clone(),
                what,
                digest: digest.to_string(),
                detail: format!("expected {size} bytes, got {}", received.max(n)),
            });
        }
        if actual != hex_of(digest) {
            return Err(PullError::Integrity {
                image: ctx.image.clone(),
                what,
                digest: digest.to_string(),
                detail: format!("content hashes to sha256:{actual}"),
            });
        }
        self.store
            .commit_blob(&tmp, digest)
            .map_err(|source| PullError::Store {
                image: ctx.image.clone(),
                source,
            })?;
        guard.disarm();
        tracing::debug!(image = %ctx.image, digest, size, "blob downloaded");
        Ok(())
    }

    /// Unpacks layer `i` (its blob is present) unless its chain is unpacked.
    async fn ensure_layer(
        &self,
        image: &str,
        layers: &[LayerRecord],
        i: usize,
        compression: Compression,
    ) -> Result<(), PullError> {
        let l = &layers[i];
        let lock = self.lock_for(&l.chain_id);
        let _held = lock.lock().await;
        if self.store.has_layer(&l.chain_id) {
            return Ok(());
        }
        let staged = self
            .store
            .staging_dir()
            .map_err(|source| PullError::Store {
                image: image.to_string(),
                source,
            })?;
        let guard = RemoveOnDrop(Some(staged.clone()));
        let lowers: Vec<PathBuf> = layers[..i]
            .iter()
            .rev()
            .map(|x| self.store.layer_dir(&x.chain_id))
            .collect();
        let blob = self.store.blob_path(&l.digest);
        let diff_id = l.diff_id.clone();
        let dest = staged.clone();
        let res = tokio::task::spawn_blocking(move || {
            unpack_verified(&blob, compression, &dest, &lowers, &diff_id)
        })
        .await
        .map_err(|e| PullError::Internal {
            image: image.to_string(),
            detail: format!("unpack task: {e}"),
        })?;
        match res {
            Ok(stats) => {
                tracing::debug!(image, layer = %l.digest, entries = stats.entries, bytes = stats.bytes, "layer unpacked");
            }
            Err(LayerFailure::Unpack(source)) => {
                return Err(PullError::BadLayer {
                    image: image.to_string(),
                    digest: l.digest.clone(),
                    source,
                })
            }
            Err(LayerFailure::DiffId(actual)) => {
                return Err(PullError::Integrity {
                    image: image.to_string(),
                    what: "layer",
                    digest: l.digest.clone(),
                    detail: format!(
                        "uncompressed content hashes to sha256:{actual}, config says {}",
                        l.diff_id
                    ),
                })
            }
            Err(LayerFailure::Io(e)) => {
                return Err(PullError::Integrity {
                    image: image.to_string(),
                    what: "layer",
                    digest: l.digest.clone(),
                    detail: format!("cannot decompress: {e}"),
                })
            }
        }
        self.store
            .commit_layer(&staged, &l.chain_id)
            .map_err(|source| PullError::Store {
                image: image.to_string(),
                source,
            })?;
        guard.disarm();
        Ok(())
    }
}

fn unreachable_tag(image: &str) -> Result<Reference, PullError> {
    Err(PullError::Internal {
        image: image.to_string(),
        detail: "reference has neither tag nor digest".into(),
    })
}

fn classify(image: &str, what: &str, e: OciDistributionError) -> PullError {
    let image = image.to_string();
    let detail = format!("{what}: {e}");
    match &e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            PullError::Unauthorized { image, detail }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            PullError::NotFound { image, detail }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            use oci_client::errors::OciErrorCode as C;
            let codes: Vec<&C> = envelope.errors.iter().map(|x| &x.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, C::Unauthorized | C::Denied))
            {
                PullError::Unauthorized { image, detail }
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    C::ManifestUnknown | C::NameUnknown | C::NotFound | C::BlobUnknown
                )
            }) {
                PullError::NotFound { image, detail }
            } else {
                PullError::Registry { image, detail }
            }
        }
        OciDistributionError::ServerError { code, .. } => match code {
            401 | 403 => PullError::Unauthorized { image, detail },
            404 => PullError::NotFound { image, detail },
            _ => PullError::Unavailable { image, detail },
        },
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => {
            PullError::Unavailable { image, detail }
        }
        OciDistributionError::DigestError(_) => PullError::Integrity {
            image,
            what: "blob",
            digest: String::new(),
            detail,
        },
        _ => PullError::Registry { image, detail },
    }
}

impl PullError {
    /// The free-text part of errors that come from a registry's answer.
    fn registry_detail_mut(&mut self) -> Option<&mut String> {
        match self {
            PullError::NotFound { detail, .. }
            | PullError::Unauthorized { detail, .. }
            | PullError::Unavailable { detail, .. }
            | PullError::Registry { detail, .. } => Some(detail),
            _ => None,
        }
    }
}
