//! Turning a verified layer blob into an unpacked layer directory, checking
//! the uncompressed stream against the config's diff_id on the way.

use super::manifest::Compression;
use crate::image::store::hex_of;
use crate::image::unpack::{unpack_layer, UnpackError, UnpackStats};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub(super) enum LayerFailure {
    Unpack(UnpackError),
    DiffId(String),
    Io(std::io::Error),
}

/// Hashes the uncompressed stream while the unpacker consumes it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

pub(super) fn unpack_verified(
    blob: &Path,
    compression: Compression,
    dest: &Path,
    lowers: &[PathBuf],
    diff_id: &str,
) -> Result<UnpackStats, LayerFailure> {
    let f = std::fs::File::open(blob).map_err(LayerFailure::Io)?;
    let f = std::io::BufReader::with_capacity(1 << 20, f);
    let inner: Box<dyn Read> = match compression {
        Compression::None => Box::new(f),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(f).map_err(LayerFailure::Io)?)
        }
    };
    let mut r = HashingReader {
        inner,
        hasher: Sha256::new(),
    };
    let stats = unpack_layer(&mut r, dest, lowers).map_err(LayerFailure::Unpack)?;
    // The diff_id covers the whole stream, including tar padding after the end marker.
    std::io::copy(&mut r, &mut std::io::sink()).map_err(LayerFailure::Io)?;
    let actual = hex::encode(r.hasher.finalize());
    if actual != hex_of(diff_id) {
        return Err(LayerFailure::DiffId(actual));
    }
    Ok(stats)
}

pub(super) fn write_hashed(
    path: &Path,
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
) -> std::io::Result<(u64, String)> {
    let f = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut h = Sha256::new();
    let mut n = 0u64;
    for chunk in rx {
        h.update(&chunk);
        w.write_all(&chunk)?;
        n += chunk.len() as u64;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok((n, hex::encode(h.finalize())))
}

pub(super) struct RemoveOnDrop(pub(super) Option<PathBuf>);

impl RemoveOnDrop {
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = crate::image::store::remove_tree(&p);
        }
    }
}
