//! Applies one OCI image layer (an uncompressed tar stream) to an empty
//! directory, producing the directory form overlayfs expects for a layer.
//!
//! The archive is untrusted input, so this module is a security boundary.
//! Every filesystem call is made relative to a directory file descriptor that
//! was itself opened with `O_NOFOLLOW`, and entry names are reduced to single
//! path components before they reach the kernel. A symlink planted by the
//! archive (or present in a lower layer) therefore can never redirect a write
//! outside `dest`: we simply never resolve through one.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{
    self as fs, AtFlags, Dir, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Timespec,
    Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;
use tar::{EntryType, Header};

/// Marks a layer directory whose lower-layer contents are hidden.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";
/// Overlayfs reads its metadata from these namespaces (`user.overlay.` when
/// mounted with `userxattr`); an image must not be able to forge it.
const OVERLAY_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];
/// Longer paths cannot be opened by the container anyway, and the bound keeps
/// the directory-fd stack (one fd per component) and tree removal finite.
const MAX_PATH_LEN: usize = 4096;
const COPY_BUF_LEN: usize = 256 * 1024;
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Why a layer could not be applied. Every variant that concerns an archive
/// entry carries the entry path exactly as written in the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// `dest` could not be opened as a directory, or it is not empty.
    #[error("layer destination {}: {source}", dest.display())]
    Destination { dest: PathBuf, source: io::Error },
    /// A lower layer directory could not be opened.
    #[error("lower layer {}: {source}", lower.display())]
    Lower { lower: PathBuf, source: io::Error },
    /// The tar stream itself is malformed or could not be read. `after` is
    /// the last entry that was read successfully (empty before the first).
    #[error("layer archive: reading {}: {source}", after_entry(after))]
    Archive { after: String, source: io::Error },
    /// The entry is unsafe or invalid (absolute path, `..`, a parent that is
    /// a symlink or not a directory, bad header field, ...) and was refused.
    #[error("layer entry {entry:?}: {reason}")]
    Rejected { entry: String, reason: String },
    /// A hardlink's target is unsafe, or does not exist in this layer.
    #[error("layer entry {entry:?}: hardlink target {target:?}: {reason}")]
    LinkTarget {
        entry: String,
        target: String,
        reason: String,
    },
    /// A filesystem operation (`op`) on the entry failed.
    #[error("layer entry {entry:?}: {op}: {source}")]
    Io {
        entry: String,
        op: String,
        source: io::Error,
    },
}

fn after_entry(after: &str) -> String {
    if after.is_empty() {
        "the first entry".to_owned()
    } else {
        format!("the entry after {after:?}")
    }
}

/// What [`unpack_layer`] did.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    /// Archive entries processed, including skipped ones.
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Device nodes that were not created (see [`unpack_layer`]).
    pub skipped_devices: u64,
}

/// Applies the uncompressed layer tarball `tar` to the empty directory `dest`,
/// in overlayfs layer form: AUFS-style whiteouts become 0/0 character devices
/// and `trusted.overlay.opaque` xattrs.
///
/// `lowers` are the already-unpacked directories of the layers below this one,
/// top-most first. They are only read, to refuse entries that would have to be
/// written through a symlink of the merged image.
///
/// Device nodes other than whiteouts are skipped (and counted), because a
/// container must never get host devices from an image. Hardlink entries only
/// create the link; the shared inode keeps the metadata of its first entry.
/// The reader is drained to EOF after the end-of-archive marker, so a digest
/// computed by a wrapping reader covers the whole blob.
pub fn unpack_layer<R: Read>(
    tar: R,
    dest: &Path,
    lowers: &[PathBuf],
) -> Result<UnpackStats, UnpackError> {
    let mut unpacker = Unpacker::new(dest, lowers)?;
    let mut archive = tar::Archive::new(tar);
    let mut last = String::new();
    let mut entries = archive.entries().map_err(|source| UnpackError::Archive {
        after: String::new(),
        source,
    })?;
    loop {
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(entry)) => entry,
            Some(Err(source)) => {
                return Err(UnpackError::Archive {
                    after: last,
                    source,
                })
            }
        };
        last = lossy(&entry.path_bytes());
        unpacker.stats.entries += 1;
        unpacker.apply(&mut entry, &last)?;
    }
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|source| {
        UnpackError::Archive {
            after: last,
            source,
        }
    })?;
    unpacker.finish()
}

/// An entry path reduced to its normal components, joined with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryPath {
    path: Vec<u8>,
    /// End offset in `path` of each component.
    ends: Vec<usize>,
}

impl EntryPath {
    fn depth(&self) -> usize {
        self.ends.len()
    }

    fn comp(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] + 1 };
        &self.path[start..self.ends[i]]
    }

    /// The path made of the first `n` components.
    fn head(&self, n: usize) -> &[u8] {
        if n == 0 {
            &[]
        } else {
            &self.path[..self.ends[n - 1]]
        }
    }

    fn last(&self) -> Option<&[u8]> {
        self.depth().checked_sub(1).map(|i| self.comp(i))
    }

    /// The same path with the last component replaced (depth must be >= 1).
    fn sibling(&self, name: &[u8]) -> EntryPath {
        let mut path = self.head(self.depth() - 1).to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        let mut ends = self.ends.clone();
        if let Some(end) = ends.last_mut() {
            *end = path.len();
        }
        EntryPath { path, ends }
    }
}

/// Strips `.` and empty components; refuses anything that could leave the
/// layer rather than trying to clamp it, since no honest image needs that.
fn normalize(raw: &[u8]) -> Result<EntryPath, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path is not allowed in a layer");
    }
    if raw.len() > MAX_PATH_LEN {
        return Err("path is too long");
    }
    let mut out = EntryPath {
        path: Vec::with_capacity(raw.len()),
        ends: Vec::new(),
    };
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err("path escapes the layer (contains ..)"),
            _ => {}
        }
        if !out.path.is_empty() {
            out.path.push(b'/');
        }
        out.path.extend_from_slice(comp);
        out.ends.push(out.path.len());
    }
    Ok(out)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn rejected(entry: &str, reason: impl Into<String>) -> UnpackError {
    UnpackError::Rejected {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

fn io_err(entry: &str, op: impl Into<String>, source: impl Into<io::Error>) -> UnpackError {
    UnpackError::Io {
        entry: entry.to_owned(),
        op: op.into(),
        source: source.into(),
    }
}

/// Metadata of an entry, taken from its header and PAX records.
struct Meta {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn times(&self) -> Timestamps {
        Timestamps {
            last_access: self.mtime,
            last_modification: self.mtime,
        }
    }
}

fn owner(header: &Header, entry: &str) -> Result<(Uid, Gid), UnpackError> {
    // u32::MAX is the "leave unchanged" sentinel of chown, not a real id.
    let id = |v: io::Result<u64>, what: &str| -> Result<u32, UnpackError> {
        let v = v.map_err(|e| rejected(entry, format!("invalid {what} in header: {e}")))?;
        u32::try_from(v)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| rejected(entry, format!("{what} {v} is out of range")))
    };
    let uid = id(header.uid(), "uid")?;
    let gid = id(header.gid(), "gid")?;
    Ok((Uid::from_raw(uid), Gid::from_raw(gid)))
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta, UnpackError> {
    let header = entry.header();
    let (uid, gid) = owner(header, name)?;
    let mode = header
        .mode()
        .map_err(|e| rejected(name, format!("invalid mode in header: {e}")))?;
    let secs = header
        .mtime()
        .map_err(|e| rejected(name, format!("invalid mtime in header: {e}")))?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(secs).map_err(|_| rejected(name, "mtime is out of range"))?,
        tv_nsec: 0,
    };
    let mut xattrs = Vec::new();
    let exts = entry
        .pax_extensions()
        .map_err(|e| io_err(name, "read PAX header", e))?;
    for ext in exts.into_iter().flatten() {
        let ext = ext.map_err(|e| io_err(name, "parse PAX header", e))?;
        let key = ext.key_bytes();
        if let Some(xattr) = key.strip_prefix(b"SCHILY.xattr.") {
            if OVERLAY_XATTR_PREFIXES.iter().any(|p| xattr.starts_with(p)) {
                tracing::warn!(
                    entry = name,
                    xattr = %lossy(xattr),
                    "ignoring overlayfs xattr from image layer"
                );
                continue;
            }
            xattrs.push((xattr.to_vec(), ext.value_bytes().to_vec()));
        } else if key == b"mtime" {
            // PAX carries sub-second precision that the header field lacks.
            if let Some(t) = parse_pax_time(ext.value_bytes()) {
                mtime = t;
            }
        }
    }
    Ok(Meta {
        uid,
        gid,
        mode: Mode::from_raw_mode(mode & 0o7777),
        mtime,
        xattrs,
    })
}

/// Parses a PAX time such as `1700000000.123456789` or `-1.5`.
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(value).ok()?;
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    let secs: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut nsec: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += i64::from(d - b'0') * 10_i64.pow(8 - i as u32);
    }
    Some(match (negative, nsec) {
        (false, _) => Timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
        (true, 0) => Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        },
        (true, _) => Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nsec,
        },
    })
}

fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

enum NonDir {
    Symlink,
    Whiteout,
    Other,
}

fn non_dir_kind(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<NonDir> {
    let st = fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(if is_whiteout(&st) {
        NonDir::Whiteout
    } else if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        NonDir::Symlink
    } else {
        NonDir::Other
    })
}

/// Result of creating a node where an earlier entry may already have put one.
enum Made<T> {
    New {
        value: T,
        /// A whiteout of this same layer was replaced.
        over_whiteout: bool,
        /// A directory (and everything below it) was removed first.
        removed_dir: bool,
    },
    /// A directory entry met an existing directory, which tar keeps.
    KeptDir,
}

/// Runs `create` (an `O_EXCL`-style creation of `name`); if something is
/// already there, removes it the way tar does and tries once more.
fn create_at<T>(
    parent: BorrowedFd<'_>,
    name: &[u8],
    new_is_dir: bool,
    mut create: impl FnMut() -> rustix::io::Result<T>,
) -> io::Result<Made<T>> {
    match create() {
        Ok(value) => {
            return Ok(Made::New {
                value,
                over_whiteout: false,
                removed_dir: false,
            })
        }
        Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let st = fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let removed_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
    if removed_dir {
        if new_is_dir {
            return Ok(Made::KeptDir);
        }
        remove_tree(parent, name)?;
    } else {
        fs::unlinkat(parent, name, AtFlags::empty())?;
    }
    Ok(Made::New {
        value: create()?,
        over_whiteout: is_whiteout(&st),
        removed_dir,
    })
}

/// Removes the directory `name` and its contents without following symlinks.
/// Iterative, so a deep tree cannot exhaust the thread's stack.
fn remove_tree(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    struct Level {
        fd: OwnedFd,
        name: Vec<u8>,
        subdirs: Vec<Vec<u8>>,
    }
    let mut levels: Vec<Level> = Vec::new();
    let mut next = Some(name.to_vec());
    loop {
        if let Some(name) = next.take() {
            let at = levels.last().map_or(parent, |l| l.fd.as_fd());
            let fd = fs::openat(at, &name[..], DIR_FLAGS, Mode::empty())?;
            let subdirs = remove_non_dirs(fd.as_fd())?;
            levels.push(Level { fd, name, subdirs });
        }
        let Some(top) = levels.last_mut() else {
            return Ok(());
        };
        if let Some(sub) = top.subdirs.pop() {
            next = Some(sub);
            continue;
        }
        let Some(done) = levels.pop() else {
            return Ok(());
        };
        let at = levels.last().map_or(parent, |l| l.fd.as_fd());
        fs::unlinkat(at, &done.name[..], AtFlags::REMOVEDIR)?;
        if levels.is_empty() {
            return Ok(());
        }
    }
}

/// Unlinks every non-directory in `dir`; returns the subdirectory names.
fn remove_non_dirs(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut stream = Dir::read_from(dir)?;
    while let Some(ent) = stream.read() {
        let name = ent?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    let mut subdirs = Vec::new();
    for name in names {
        match fs::unlinkat(dir, &name[..], AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::ISDIR) => subdirs.push(name),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(subdirs)
}

fn set_xattr_result(
    r: rustix::io::Result<()>,
    xattr: &[u8],
    entry: &str,
) -> Result<(), UnpackError> {
    match r {
        Ok(()) => Ok(()),
        // The filesystem or the node type cannot hold this attribute (e.g.
        // `user.*` on a symlink); losing it beats failing the whole pull.
        Err(e @ (Errno::OPNOTSUPP | Errno::PERM)) => {
            tracing::warn!(entry, xattr = %lossy(xattr), error = %e, "cannot set xattr from image layer; skipping it");
            Ok(())
        }
        Err(e) => Err(io_err(entry, format!("set xattr {:?}", lossy(xattr)), e)),
    }
}

/// Owner, then mode (chown clears set-id bits), then xattrs (writes and chown
/// clear `security.capability`), then times.
fn set_fd_meta(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    entry: &str,
    with_times: bool,
) -> Result<(), UnpackError> {
    fs::fchown(fd, Some(meta.uid), Some(meta.gid)).map_err(|e| io_err(entry, "chown", e))?;
    fs::fchmod(fd, meta.mode).map_err(|e| io_err(entry, "chmod", e))?;
    for (name, value) in &meta.xattrs {
        let r = fs::fsetxattr(fd, &name[..], value, XattrFlags::empty());
        set_xattr_result(r, name, entry)?;
    }
    if with_times {
        fs::futimens(fd, &meta.times()).map_err(|e| io_err(entry, "set times", e))?;
    }
    Ok(())
}

fn set_opaque(dir: BorrowedFd<'_>, entry: &str) -> Result<(), UnpackError> {
    fs::fsetxattr(dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
        .map_err(|e| io_err(entry, "set trusted.overlay.opaque", e))
}

/// Creates a parent directory the archive did not list, as docker does.
fn make_implicit_dir(parent: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    let mode = Mode::from_raw_mode(0o755);
    fs::mkdirat(parent, name, mode)?;
    let fd = fs::openat(parent, name, DIR_FLAGS, Mode::empty())?;
    // Explicit, so neither the umask nor a set-gid parent leaks in.
    fs::fchown(&fd, Some(Uid::ROOT), Some(Gid::ROOT))?;
    fs::fchmod(&fd, mode)?;
    Ok(fd)
}

enum WalkError {
    Missing(usize),
    Symlink(usize),
    NotDir(usize),
    Io(usize, io::Error),
}

/// Opens the directory made of the first `depth` components of `p`, which
/// must already exist in this layer, reusing the prefix already in `cache`.
fn walk_existing<'c>(
    root: &'c OwnedFd,
    cache: &'c mut Vec<(Vec<u8>, OwnedFd)>,
    p: &EntryPath,
    depth: usize,
) -> Result<BorrowedFd<'c>, WalkError> {
    let mut k = 0;
    while k < depth && k < cache.len() && cache[k].0 == p.comp(k) {
        k += 1;
    }
    cache.truncate(k);
    for i in k..depth {
        let parent = cache.last().map_or(root.as_fd(), |(_, fd)| fd.as_fd());
        let fd = match fs::openat(parent, p.comp(i), DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(WalkError::Missing(i)),
            Err(Errno::NOTDIR | Errno::LOOP) => {
                return Err(match non_dir_kind(parent, p.comp(i)) {
                    Ok(NonDir::Symlink) => WalkError::Symlink(i),
                    Ok(_) => WalkError::NotDir(i),
                    Err(e) => WalkError::Io(i, e),
                })
            }
            Err(e) => return Err(WalkError::Io(i, e.into())),
        };
        cache.push((p.comp(i).to_vec(), fd));
    }
    Ok(cache.last().map_or(root.as_fd(), |(_, fd)| fd.as_fd()))
}

/// What the lower layers (merged, top-most first) have at one path.
#[derive(Clone)]
enum LowerEntry {
    Absent,
    Symlink(usize),
    Other,
    /// The layers whose directory at this path is merged into the view.
    Dir(Rc<[usize]>),
}

enum Probe {
    Absent,
    Whiteout,
    Symlink,
    Other,
    Dir { opaque: bool },
}

struct Lowers {
    layers: Vec<(PathBuf, OwnedFd)>,
    /// Keyed by path; only ever filled from the parent's merged layer list,
    /// which does not depend on this layer, so entries never go stale.
    cache: HashMap<Vec<u8>, LowerEntry>,
}

impl Lowers {
    fn open(paths: &[PathBuf]) -> Result<Self, UnpackError> {
        let mut layers = Vec::with_capacity(paths.len());
        for path in paths {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let fd = fs::open(path, flags, Mode::empty()).map_err(|e| UnpackError::Lower {
                lower: path.clone(),
                source: e.into(),
            })?;
            layers.push((path.clone(), fd));
        }
        Ok(Lowers {
            layers,
            cache: HashMap::new(),
        })
    }

    /// `parents` are the layers merged at the parent of `path`.
    fn lookup(&mut self, path: &[u8], parents: &[usize]) -> Result<LowerEntry, (usize, io::Error)> {
        if let Some(found) = self.cache.get(path) {
            return Ok(found.clone());
        }
        let mut dirs = Vec::new();
        let mut found = LowerEntry::Absent;
        for &layer in parents {
            match probe(self.layers[layer].1.as_fd(), path).map_err(|e| (layer, e))? {
                Probe::Absent => continue,
                Probe::Dir { opaque } => {
                    dirs.push(layer);
                    if opaque {
                        break;
                    }
                }
                // Overlayfs stops merging at the first non-directory.
                Probe::Whiteout => break,
                Probe::Symlink if dirs.is_empty() => {
                    found = LowerEntry::Symlink(layer);
                    break;
                }
                Probe::Other if dirs.is_empty() => {
                    found = LowerEntry::Other;
                    break;
                }
                Probe::Symlink | Probe::Other => break,
            }
        }
        if !dirs.is_empty() {
            found = LowerEntry::Dir(dirs.into());
        }
        self.cache.insert(path.to_vec(), found.clone());
        Ok(found)
    }
}

/// Inspects `path` in one lower layer, resolving strictly beneath its root
/// and through no symlink at all.
fn probe(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<Probe> {
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    // openat2 asks for a retry with EAGAIN when a concurrent rename races it.
    for _ in 0..16 {
        match fs::openat2(root, path, DIR_FLAGS, Mode::empty(), how) {
            Ok(fd) => {
                let mut value = [0u8; 2];
                let opaque = matches!(
                    fs::fgetxattr(&fd, OPAQUE_XATTR, &mut value[..]),
                    Ok(1) if value[0] == b'y'
                );
                return Ok(Probe::Dir { opaque });
            }
            Err(Errno::NOENT) => return Ok(Probe::Absent),
            // Parents were verified as directories, so this is the last one.
            Err(Errno::LOOP) => return Ok(Probe::Symlink),
            Err(Errno::NOTDIR) => {
                let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = fs::openat2(root, path, flags, Mode::empty(), how)?;
                let st = fs::fstat(&fd)?;
                return Ok(if is_whiteout(&st) {
                    Probe::Whiteout
                } else if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                    Probe::Symlink
                } else {
                    Probe::Other
                });
            }
            Err(Errno::AGAIN) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Errno::AGAIN.into())
}

/// A directory of `dest` that this layer created or listed.
#[derive(Default)]
struct DirState {
    /// Listed by its own entry (or re-created after a whiteout), so it
    /// replaces whatever non-directory a lower layer has at its path.
    explicit: bool,
    opaque: bool,
    /// Applied at the end: creating children would change it.
    mtime: Option<Timespec>,
}

/// One open directory on the path to the current entry.
struct Frame {
    name: Vec<u8>,
    fd: OwnedFd,
    /// Lower layers whose directory shows through at this path.
    lowers: Rc<[usize]>,
}

fn top<'a>(root: &'a OwnedFd, stack: &'a [Frame]) -> BorrowedFd<'a> {
    stack.last().map_or(root.as_fd(), |f| f.fd.as_fd())
}

fn forget_dirs(dirs: &mut HashMap<Vec<u8>, DirState>, removed: &[u8]) {
    dirs.retain(|k, _| {
        !(k.starts_with(removed) && (k.len() == removed.len() || k[removed.len()] == b'/'))
    });
}

struct Unpacker {
    root: OwnedFd,
    root_lowers: Rc<[usize]>,
    no_lowers: Rc<[usize]>,
    /// Open directories from `root` down to the current entry's parent;
    /// archives list entries depth-first, so most entries reuse it as is.
    stack: Vec<Frame>,
    /// Same idea for hardlink targets and the final mtime pass.
    link_cache: Vec<(Vec<u8>, OwnedFd)>,
    dirs: HashMap<Vec<u8>, DirState>,
    lowers: Lowers,
    buf: Vec<u8>,
    stats: UnpackStats,
}

impl Unpacker {
    fn new(dest: &Path, lowers: &[PathBuf]) -> Result<Self, UnpackError> {
        let dest_err = |source: io::Error| UnpackError::Destination {
            dest: dest.to_owned(),
            source,
        };
        let root = fs::open(
            dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| dest_err(e.into()))?;
        let mut listing = Dir::read_from(&root).map_err(|e| dest_err(e.into()))?;
        while let Some(ent) = listing.read() {
            let ent = ent.map_err(|e| dest_err(e.into()))?;
            let name = ent.file_name().to_bytes();
            if name != b"." && name != b".." {
                // Replacement logic assumes everything present came from
                // this archive.
                return Err(dest_err(io::Error::new(
                    io::ErrorKind::DirectoryNotEmpty,
                    "directory is not empty",
                )));
            }
        }
        let lowers = Lowers::open(lowers)?;
        let root_lowers: Rc<[usize]> = (0..lowers.layers.len()).collect();
        let mut dirs = HashMap::new();
        dirs.insert(Vec::new(), DirState::default());
        Ok(Unpacker {
            root,
            root_lowers,
            no_lowers: Rc::new([]),
            stack: Vec::new(),
            link_cache: Vec::new(),
            dirs,
            lowers,
            buf: vec![0; COPY_BUF_LEN],
            stats: UnpackStats::default(),
        })
    }

    fn apply<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let path = normalize(&entry.path_bytes()).map_err(|reason| rejected(name, reason))?;
        if path.depth() > 1 && path.comp(0).starts_with(AUFS_META_PREFIX) {
            // AUFS bookkeeping such as the `.wh..wh.plnk` hardlink pool;
            // docker drops it too.
            tracing::debug!(entry = name, "skipping AUFS metadata entry");
            return Ok(());
        }
        if let Some(base) = path.last() {
            if let Some(target) = base.strip_prefix(WHITEOUT_PREFIX) {
                let target = target.to_vec();
                return self.apply_whiteout(&path, &target, entry.header(), name);
            }
        } else if kind != EntryType::Directory {
            return Err(rejected(name, "the layer root can only be a directory"));
        }
        match kind {
            EntryType::Directory => {
                let meta = read_meta(entry, name)?;
                self.make_dir(&path, &meta, name)
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.make_file(&path, entry, name)
            }
            EntryType::Symlink => self.make_symlink(&path, entry, name),
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| rejected(name, "hardlink has no target"))?
                    .into_owned();
                self.make_hardlink(&path, &target, name)
            }
            EntryType::Fifo => {
                let meta = read_meta(entry, name)?;
                self.make_fifo(&path, &meta, name)
            }
            EntryType::Char | EntryType::Block => {
                let header = entry.header();
                let dev = (header.device_major(), header.device_minor());
                if kind == EntryType::Char && matches!(dev, (Ok(Some(0)), Ok(Some(0)))) {
                    // Already in overlayfs whiteout form.
                    let (uid, gid) = owner(header, name)?;
                    return self.make_whiteout(&path, uid, gid, name);
                }
                tracing::warn!(entry = name, "skipping device node in image layer");
                self.stats.skipped_devices += 1;
                Ok(())
            }
            other => {
                tracing::warn!(entry = name, kind = ?other, "skipping unsupported tar entry type");
                Ok(())
            }
        }
    }

    /// Makes the stack hold exactly the first `depth` components of `p`,
    /// creating missing directories and refusing to pass through symlinks.
    fn enter(&mut self, p: &EntryPath, depth: usize, name: &str) -> Result<(), UnpackError> {
        let mut k = 0;
        while k < depth && k < self.stack.len() && self.stack[k].name == p.comp(k) {
            k += 1;
        }
        self.stack.truncate(k);
        for i in k..depth {
            self.enter_component(p, i, name)?;
        }
        Ok(())
    }

    fn enter_component(&mut self, p: &EntryPath, i: usize, name: &str) -> Result<(), UnpackError> {
        let comp = p.comp(i);
        let prefix = p.head(i + 1);
        let parent = top(&self.root, &self.stack);
        let create_err =
            |e: Errno| io_err(name, format!("create directory {:?}", lossy(prefix)), e);
        let (fd, fresh) = match fs::openat(parent, comp, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => (fd, None),
            Err(Errno::NOENT) => {
                let fd = make_implicit_dir(parent, comp).map_err(create_err)?;
                (fd, Some(DirState::default()))
            }
            Err(Errno::NOTDIR | Errno::LOOP) => match non_dir_kind(parent, comp) {
                Ok(NonDir::Symlink) => {
                    return Err(rejected(
                        name,
                        format!(
                            "parent {:?} is a symlink in this layer; refusing to write through it",
                            lossy(prefix)
                        ),
                    ))
                }
                Ok(NonDir::Whiteout) => {
                    // Deleted earlier in this layer, now re-created: nothing
                    // from the lower layers may show through.
                    fs::unlinkat(parent, comp, AtFlags::empty()).map_err(create_err)?;
                    let fd = make_implicit_dir(parent, comp).map_err(create_err)?;
                    set_opaque(fd.as_fd(), name)?;
                    let state = DirState {
                        explicit: true,
                        opaque: true,
                        mtime: None,
                    };
                    (fd, Some(state))
                }
                Ok(NonDir::Other) => {
                    return Err(rejected(
                        name,
                        format!("parent {:?} is not a directory", lossy(prefix)),
                    ))
                }
                Err(e) => return Err(io_err(name, format!("inspect {:?}", lossy(prefix)), e)),
            },
            Err(e) => {
                return Err(io_err(
                    name,
                    format!("open directory {:?}", lossy(prefix)),
                    e,
                ))
            }
        };
        let (explicit, opaque) = match fresh {
            Some(state) => {
                let flags = (state.explicit, state.opaque);
                self.dirs.insert(prefix.to_vec(), state);
                flags
            }
            None => self
                .dirs
                .get(prefix)
                .map_or((false, false), |s| (s.explicit, s.opaque)),
        };
        let lowers = self.lowers_at(p, i, explicit, opaque, name)?;
        self.stack.push(Frame {
            name: comp.to_vec(),
            fd,
            lowers,
        });
        Ok(())
    }

    /// The lower layers showing through at component `i` of `p`, whose
    /// parent is the stack top. Refuses a path docker would have resolved
    /// through a lower-layer symlink.
    fn lowers_at(
        &mut self,
        p: &EntryPath,
        i: usize,
        explicit: bool,
        opaque: bool,
        name: &str,
    ) -> Result<Rc<[usize]>, UnpackError> {
        let parents = self.stack.last().map_or(&self.root_lowers, |f| &f.lowers);
        if parents.is_empty() {
            return Ok(self.no_lowers.clone());
        }
        let parents = parents.clone();
        let prefix = p.head(i + 1);
        let found = self.lowers.lookup(prefix, &parents).map_err(|(layer, e)| {
            let op = format!(
                "inspect {:?} in lower layer {}",
                lossy(prefix),
                self.lowers.layers[layer].0.display()
            );
            io_err(name, op, e)
        })?;
        match found {
            LowerEntry::Symlink(layer) if !explicit => Err(rejected(
                name,
                format!(
                    "parent {:?} is a symlink in lower layer {}; refusing to write through it",
                    lossy(prefix),
                    self.lowers.layers[layer].0.display()
                ),
            )),
            LowerEntry::Dir(layers) if !opaque => Ok(layers),
            _ => Ok(self.no_lowers.clone()),
        }
    }

    fn make_dir(&mut self, p: &EntryPath, meta: &Meta, name: &str) -> Result<(), UnpackError> {
        let Some(base) = p.last() else {
            set_fd_meta(self.root.as_fd(), meta, name, false)?;
            if let Some(state) = self.dirs.get_mut(&p.path) {
                state.mtime = Some(meta.mtime);
            }
            return Ok(());
        };
        self.enter(p, p.depth() - 1, name)?;
        let parent = top(&self.root, &self.stack);
        let dir_mode = Mode::from_raw_mode(0o700);
        let made = create_at(parent, base, true, || fs::mkdirat(parent, base, dir_mode))
            .map_err(|e| io_err(name, "create directory", e))?;
        let over_whiteout = match made {
            Made::New {
                over_whiteout,
                removed_dir,
                ..
            } => {
                if removed_dir {
                    forget_dirs(&mut self.dirs, &p.path);
                    self.link_cache.clear();
                }
                over_whiteout
            }
            Made::KeptDir => false,
        };
        let fd = fs::openat(parent, base, DIR_FLAGS, Mode::empty())
            .map_err(|e| io_err(name, "open directory", e))?;
        set_fd_meta(fd.as_fd(), meta, name, false)?;
        if over_whiteout {
            set_opaque(fd.as_fd(), name)?;
        }
        let state = self.dirs.entry(p.path.clone()).or_default();
        state.explicit = true;
        state.opaque |= over_whiteout;
        state.mtime = Some(meta.mtime);
        let opaque = state.opaque;
        // Its children most likely come next; keep it open for them.
        let lowers = self.lowers_at(p, p.depth() - 1, true, opaque, name)?;
        self.stack.push(Frame {
            name: base.to_vec(),
            fd,
            lowers,
        });
        Ok(())
    }

    fn make_file<R: Read>(
        &mut self,
        p: &EntryPath,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let meta = read_meta(entry, name)?;
        let base = p.last().unwrap_or_default();
        self.enter(p, p.depth() - 1, name)?;
        let parent = top(&self.root, &self.stack);
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        // Private until the final owner and mode are set.
        let mode = Mode::from_raw_mode(0o600);
        let made = create_at(parent, base, false, || {
            fs::openat(parent, base, flags, mode)
        })
        .map_err(|e| io_err(name, "create file", e))?;
        let Made::New {
            value: fd,
            removed_dir,
            ..
        } = made
        else {
            return Err(io_err(name, "create file", Errno::ISDIR));
        };
        if removed_dir {
            forget_dirs(&mut self.dirs, &p.path);
            self.link_cache.clear();
        }
        let mut file = File::from(fd);
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(name, "read file data from the archive", e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| io_err(name, "write file data", e))?;
            written += n as u64;
        }
        // The entry reader just stops at EOF, so a truncated stream would
        // otherwise leave a silently short file.
        if written != entry.size() {
            let short = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("archive ended after {written} of {} bytes", entry.size()),
            );
            return Err(io_err(name, "read file data from the archive", short));
        }
        self.stats.bytes += written;
        set_fd_meta(file.as_fd(), &meta, name, true)
    }

    fn make_symlink<R: Read>(
        &mut self,
        p: &EntryPath,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let meta = read_meta(entry, name)?;
        let target = entry
            .link_name_bytes()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| rejected(name, "symlink has no target"))?
            .into_owned();
        let base = p.last().unwrap_or_default();
        self.enter(p, p.depth() - 1, name)?;
        let parent = top(&self.root, &self.stack);
        let made = create_at(parent, base, false, || {
            fs::symlinkat(&target[..], parent, base)
        })
        .map_err(|e| io_err(name, "create symlink", e))?;
        if let Made::New {
            removed_dir: true, ..
        } = made
        {
            forget_dirs(&mut self.dirs, &p.path);
            self.link_cache.clear();
        }
        let nofollow = AtFlags::SYMLINK_NOFOLLOW;
        fs::chownat(parent, base, Some(meta.uid), Some(meta.gid), nofollow)
            .map_err(|e| io_err(name, "chown", e))?;
        if !meta.xattrs.is_empty() {
            // No fd can be opened on a symlink for fsetxattr, so go through
            // the parent's fd in procfs: lsetxattr does not follow the last
            // component, and the parent is a directory we hold open.
            let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
            path.extend_from_slice(base);
            for (xattr, value) in &meta.xattrs {
                let r = fs::lsetxattr(&path[..], &xattr[..], value, XattrFlags::empty());
                set_xattr_result(r, xattr, name)?;
            }
        }
        fs::utimensat(parent, base, &meta.times(), nofollow)
            .map_err(|e| io_err(name, "set times", e))
    }

    fn make_hardlink(
        &mut self,
        p: &EntryPath,
        raw_target: &[u8],
        name: &str,
    ) -> Result<(), UnpackError> {
        let bad = |reason: &str| UnpackError::LinkTarget {
            entry: name.to_owned(),
            target: lossy(raw_target),
            reason: reason.to_owned(),
        };
        let t = normalize(raw_target).map_err(bad)?;
        let Some(t_base) = t.last() else {
            return Err(bad("is the layer root"));
        };
        if t == *p {
            return Ok(());
        }
        let base = p.last().unwrap_or_default();
        self.enter(p, p.depth() - 1, name)?;
        let t_depth = t.depth() - 1;
        let on_stack =
            t_depth <= self.stack.len() && (0..t_depth).all(|i| self.stack[i].name == t.comp(i));
        let t_dir = if on_stack {
            top(&self.root, &self.stack[..t_depth])
        } else {
            walk_existing(&self.root, &mut self.link_cache, &t, t_depth).map_err(|e| match e {
                WalkError::Missing(i) => bad(&format!(
                    "{:?} does not exist in this layer",
                    lossy(t.head(i + 1))
                )),
                WalkError::Symlink(i) => bad(&format!(
                    "passes through symlink {:?}; refusing to follow it",
                    lossy(t.head(i + 1))
                )),
                WalkError::NotDir(i) => {
                    bad(&format!("{:?} is not a directory", lossy(t.head(i + 1))))
                }
                WalkError::Io(i, e) => io_err(
                    name,
                    format!("open directory {:?}", lossy(t.head(i + 1))),
                    e,
                ),
            })?
        };
        let parent = top(&self.root, &self.stack);
        // No AT_SYMLINK_FOLLOW: a symlink target is linked as the symlink.
        let made = create_at(parent, base, false, || {
            fs::linkat(t_dir, t_base, parent, base, AtFlags::empty())
        });
        match made {
            Ok(Made::New { removed_dir, .. }) => {
                if removed_dir {
                    forget_dirs(&mut self.dirs, &p.path);
                    self.link_cache.clear();
                }
                Ok(())
            }
            Ok(Made::KeptDir) => Err(io_err(name, "create hardlink", Errno::EXIST)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(bad("does not exist in this layer"))
            }
            Err(e) => Err(io_err(name, "create hardlink", e)),
        }
    }

    fn make_fifo(&mut self, p: &EntryPath, meta: &Meta, name: &str) -> Result<(), UnpackError> {
        let base = p.last().unwrap_or_default();
        self.enter(p, p.depth() - 1, name)?;
        let parent = top(&self.root, &self.stack);
        let mode = Mode::from_raw_mode(0o600);
        let made = create_at(parent, base, false, || {
            fs::mknodat(parent, base, FileType::Fifo, mode, 0)
        })
        .map_err(|e| io_err(name, "create fifo", e))?;
        if let Made::New {
            removed_dir: true, ..
        } = made
        {
            forget_dirs(&mut self.dirs, &p.path);
            self.link_cache.clear();
        }
        // O_NONBLOCK: opening a fifo for reading would otherwise wait for a
        // writer. With an fd, metadata goes through the same path as files.
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = fs::openat(parent, base, flags, Mode::empty())
            .map_err(|e| io_err(name, "open fifo", e))?;
        set_fd_meta(fd.as_fd(), meta, name, true)
    }

    fn apply_whiteout(
        &mut self,
        p: &EntryPath,
        target: &[u8],
        header: &Header,
        name: &str,
    ) -> Result<(), UnpackError> {
        if p.last() == Some(OPAQUE_WHITEOUT) {
            return self.make_opaque(p, name);
        }
        if p.last()
            .is_some_and(|base| base.starts_with(AUFS_META_PREFIX))
        {
            // Other AUFS metadata (e.g. `.wh..wh.plnk`) means nothing to overlayfs.
            tracing::debug!(entry = name, "skipping AUFS metadata entry");
            return Ok(());
        }
        match target {
            b"" | b"." => return Err(rejected(name, "whiteout does not name a file")),
            b".." => return Err(rejected(name, "path escapes the layer (contains ..)")),
            _ => {}
        }
        let (uid, gid) = owner(header, name)?;
        self.make_whiteout(&p.sibling(target), uid, gid, name)
    }

    fn make_whiteout(
        &mut self,
        p: &EntryPath,
        uid: Uid,
        gid: Gid,
        name: &str,
    ) -> Result<(), UnpackError> {
        let base = p.last().unwrap_or_default();
        self.enter(p, p.depth() - 1, name)?;
        let parent = top(&self.root, &self.stack);
        let made = create_at(parent, base, false, || {
            fs::mknodat(parent, base, FileType::CharacterDevice, Mode::empty(), 0)
        })
        .map_err(|e| io_err(name, "create whiteout", e))?;
        if let Made::New {
            removed_dir: true, ..
        } = made
        {
            forget_dirs(&mut self.dirs, &p.path);
            self.link_cache.clear();
        }
        fs::chownat(
            parent,
            base,
            Some(uid),
            Some(gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(name, "chown whiteout", e))
    }

    fn make_opaque(&mut self, p: &EntryPath, name: &str) -> Result<(), UnpackError> {
        let depth = p.depth() - 1;
        self.enter(p, depth, name)?;
        set_opaque(top(&self.root, &self.stack), name)?;
        self.dirs.entry(p.head(depth).to_vec()).or_default().opaque = true;
        let hidden = self.no_lowers.clone();
        match self.stack.last_mut() {
            Some(frame) => frame.lowers = hidden,
            None => self.root_lowers = hidden,
        }
        Ok(())
    }

    /// Sets directory mtimes, which every child created above has bumped.
    fn finish(mut self) -> Result<UnpackStats, UnpackError> {
        self.stack.clear();
        let mut pending: Vec<(Vec<u8>, Timespec)> = self
            .dirs
            .iter()
            .filter_map(|(path, state)| state.mtime.map(|t| (path.clone(), t)))
            .collect();
        // Sorted, consecutive directories share most of their open prefix.
        pending.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (path, mtime) in pending {
            let name = lossy(&path);
            let times = Timestamps {
                last_access: mtime,
                last_modification: mtime,
            };
            let p = normalize(&path).map_err(|reason| rejected(&name, reason))?;
            let dir =
                walk_existing(&self.root, &mut self.link_cache, &p, p.depth()).map_err(|e| {
                    let source = match e {
                        WalkError::Io(_, e) => e,
                        WalkError::Missing(_) => Errno::NOENT.into(),
                        WalkError::Symlink(_) | WalkError::NotDir(_) => Errno::NOTDIR.into(),
                    };
                    io_err(&name, "reopen directory to set its mtime", source)
                })?;
            fs::futimens(dir, &times).map_err(|e| io_err(&name, "set times", e))?;
        }
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    const MTIME: u64 = 1_600_000_000;

    /// Builds archives header by header, writing names verbatim so that the
    /// hostile paths the `tar` builder refuses can be expressed.
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }

        fn entry(
            &mut self,
            kind: EntryType,
            path: &str,
            link: Option<&str>,
            data: &[u8],
            edit: impl FnOnce(&mut Header),
        ) -> &mut Self {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(MTIME);
            h.set_size(data.len() as u64);
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                h.set_link_name_literal(link).unwrap();
            }
            edit(&mut h);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn dir(&mut self, path: &str) -> &mut Self {
            self.entry(EntryType::Directory, path, None, b"", |_| {})
        }

        fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.entry(EntryType::Regular, path, None, data, |_| {})
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.entry(EntryType::Symlink, path, Some(target), b"", |_| {})
        }

        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.entry(EntryType::Link, path, Some(target), b"", |_| {})
        }

        fn device(&mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
            self.entry(kind, path, None, b"", |h| {
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
            })
        }

        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
            self.0
                .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
            self
        }

        fn build(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn owned(uid: u64, gid: u64, mode: u32) -> impl FnOnce(&mut Header) {
        move |h| {
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_mode(mode);
        }
    }

    /// `dest` and, next to it, a sentinel directory `outside` that no archive
    /// may touch.
    struct Env {
        tmp: tempfile::TempDir,
        dest: PathBuf,
        outside: PathBuf,
    }

    impl Env {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let dest = tmp.path().join("dest");
            let outside = tmp.path().join("outside");
            std::fs::create_dir(&dest).unwrap();
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("secret"), b"s3cret").unwrap();
            Env { tmp, dest, outside }
        }

        fn unpack(&self, tar: Tar) -> Result<UnpackStats, UnpackError> {
            self.unpack_with(tar, &[])
        }

        fn unpack_with(&self, tar: Tar, lowers: &[PathBuf]) -> Result<UnpackStats, UnpackError> {
            unpack_layer(&tar.build()[..], &self.dest, lowers)
        }

        fn at(&self, path: &str) -> PathBuf {
            self.dest.join(path)
        }

        fn lower(&self, name: &str) -> PathBuf {
            let dir = self.tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            dir
        }

        fn assert_outside_untouched(&self) {
            let mut names: Vec<_> = std::fs::read_dir(&self.outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["secret"]);
            assert_eq!(
                std::fs::read(self.outside.join("secret")).unwrap(),
                b"s3cret"
            );
            let secret = std::fs::metadata(self.outside.join("secret")).unwrap();
            assert_eq!(secret.nlink(), 1);
            assert_eq!(secret.mode() & 0o7777, 0o644);
            assert_eq!(xattr(&self.outside, OPAQUE_XATTR), None);
        }
    }

    fn meta(path: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(path).unwrap()
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        let n = fs::lgetxattr(path, name, &mut buf[..]).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn mknod_whiteout(path: &Path) {
        fs::mknodat(fs::CWD, path, FileType::CharacterDevice, Mode::empty(), 0).unwrap();
    }

    #[test]
    fn tree_and_metadata_are_preserved() {
        let env = Env::new();
        let mut t = Tar::new();
        t.entry(EntryType::Directory, "./", None, b"", |h| {
            h.set_mode(0o751);
            h.set_mtime(1_500_000_000);
        })
        .entry(EntryType::Directory, "./etc/", None, b"", |h| {
            owned(0, 42, 0o750)(h);
            h.set_mtime(1_500_000_001);
        })
        .entry(
            EntryType::Regular,
            "etc/passwd",
            None,
            b"root:x:0:0\n",
            owned(1000, 1001, 0o640),
        )
        .entry(
            EntryType::Directory,
            "etc/sticky/",
            None,
            b"",
            owned(0, 0, 0o1777),
        )
        .entry(
            EntryType::Regular,
            "etc/sgid",
            None,
            b"x",
            owned(5, 6, 0o2711),
        )
        .entry(
            EntryType::Regular,
            "etc/open",
            None,
            b"",
            owned(0, 0, 0o777),
        )
        .entry(
            EntryType::Symlink,
            "etc/link",
            Some("/etc/passwd"),
            b"",
            |h| {
                owned(1000, 1001, 0o777)(h);
                h.set_mtime(1_400_000_000);
            },
        )
        .hardlink("etc/passwd.lnk", "./etc/passwd")
        .entry(
            EntryType::Regular,
            "usr/bin/sudo",
            None,
            b"#!",
            owned(0, 0, 0o4755),
        )
        .entry(EntryType::Fifo, "run/fifo", None, b"", owned(7, 8, 0o620))
        .pax(&[
            ("SCHILY.xattr.user.foo", b"bar"),
            ("mtime", b"1600000000.5"),
        ])
        .entry(EntryType::Regular, "etc/xattr", None, b"abc", |_| {});
        let stats = env.unpack(t).unwrap();
        assert_eq!(stats.entries, 11);
        assert_eq!(stats.bytes, 11 + 1 + 2 + 3);
        assert_eq!(stats.skipped_devices, 0);

        let root = meta(&env.dest);
        assert_eq!(root.mode() & 0o7777, 0o751);
        assert_eq!(root.mtime(), 1_500_000_000);

        let etc = meta(&env.at("etc"));
        assert!(etc.is_dir());
        assert_eq!((etc.uid(), etc.gid(), etc.mode() & 0o7777), (0, 42, 0o750));
        assert_eq!(
            etc.mtime(),
            1_500_000_001,
            "dir mtime must survive its children"
        );

        let passwd = meta(&env.at("etc/passwd"));
        assert_eq!(
            (passwd.uid(), passwd.gid(), passwd.mode() & 0o7777),
            (1000, 1001, 0o640)
        );
        assert_eq!(passwd.mtime(), MTIME as i64);
        assert_eq!(
            std::fs::read(env.at("etc/passwd")).unwrap(),
            b"root:x:0:0\n"
        );

        let link = meta(&env.at("etc/passwd.lnk"));
        assert_eq!((link.ino(), link.nlink()), (passwd.ino(), 2));

        assert_eq!(meta(&env.at("etc/sticky")).mode() & 0o7777, 0o1777);
        let sgid = meta(&env.at("etc/sgid"));
        assert_eq!(
            (sgid.uid(), sgid.gid(), sgid.mode() & 0o7777),
            (5, 6, 0o2711)
        );
        assert_eq!(
            meta(&env.at("etc/open")).mode() & 0o7777,
            0o777,
            "umask must not apply"
        );

        let symlink = meta(&env.at("etc/link"));
        assert!(symlink.file_type().is_symlink());
        assert_eq!((symlink.uid(), symlink.gid()), (1000, 1001));
        assert_eq!(symlink.mtime(), 1_400_000_000);
        assert_eq!(
            std::fs::read_link(env.at("etc/link")).unwrap(),
            Path::new("/etc/passwd")
        );

        let sudo = meta(&env.at("usr/bin/sudo"));
        assert_eq!((sudo.uid(), sudo.mode() & 0o7777), (0, 0o4755));
        for implicit in ["usr", "usr/bin", "run"] {
            let m = meta(&env.at(implicit));
            assert!(m.is_dir());
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o7777),
                (0, 0, 0o755),
                "{implicit}"
            );
        }

        let fifo = meta(&env.at("run/fifo"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!(
            (fifo.uid(), fifo.gid(), fifo.mode() & 0o7777),
            (7, 8, 0o620)
        );

        let x = meta(&env.at("etc/xattr"));
        assert_eq!((x.mtime(), x.mtime_nsec()), (1_600_000_000, 500_000_000));
        assert_eq!(
            xattr(&env.at("etc/xattr"), "user.foo").as_deref(),
            Some(&b"bar"[..])
        );
        env.assert_outside_untouched();
    }

    #[test]
    fn xattrs_on_symlinks_and_overlay_xattrs_dropped() {
        let env = Env::new();
        let mut t = Tar::new();
        t.pax(&[("SCHILY.xattr.trusted.berth", b"1")])
            .symlink("l", "/nowhere")
            .pax(&[
                ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/x"),
                ("SCHILY.xattr.user.overlay.opaque", b"y"),
                ("SCHILY.xattr.user.ok", b"yes"),
            ])
            .dir("d/")
            .pax(&[(
                "SCHILY.xattr.security.capability",
                b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            )])
            .entry(EntryType::Regular, "ping", None, b"elf", owned(0, 0, 0o755));
        env.unpack(t).unwrap();
        assert_eq!(
            xattr(&env.at("l"), "trusted.berth").as_deref(),
            Some(&b"1"[..])
        );
        let d = env.at("d");
        assert_eq!(xattr(&d, "trusted.overlay.opaque"), None);
        assert_eq!(xattr(&d, "trusted.overlay.redirect"), None);
        assert_eq!(xattr(&d, "user.overlay.opaque"), None);
        assert_eq!(xattr(&d, "user.ok").as_deref(), Some(&b"yes"[..]));
        assert!(xattr(&env.at("ping"), "security.capability").is_some());
    }

    #[test]
    fn whiteouts_become_overlay_form() {
        let env = Env::new();
        let mut t = Tar::new();
        t.dir("dir/")
            .entry(
                EntryType::Regular,
                "dir/.wh.gone",
                None,
                b"",
                owned(3, 4, 0o600),
            )
            .file(".wh.top", b"")
            .file("opq/.wh..wh..opq", b"")
            .dir("opq/keep/")
            .dir(".wh..wh.plnk/")
            .file(".wh..wh.plnk/123.4", b"pool")
            .device(EntryType::Char, "native", 0, 0);
        let stats = env.unpack(t).unwrap();
        assert_eq!(stats.skipped_devices, 0);
        for path in ["dir/gone", "top", "native"] {
            let m = meta(&env.at(path));
            assert!(m.file_type().is_char_device(), "{path}");
            assert_eq!(m.rdev(), 0, "{path}");
        }
        assert_eq!(
            (
                meta(&env.at("dir/gone")).uid(),
                meta(&env.at("dir/gone")).gid()
            ),
            (3, 4)
        );
        assert!(!env.at("dir/.wh.gone").exists());
        assert!(!env.at(".wh.top").exists());
        assert_eq!(
            xattr(&env.at("opq"), OPAQUE_XATTR).as_deref(),
            Some(&b"y"[..])
        );
        assert!(!env.at("opq/.wh..wh..opq").exists());
        assert!(env.at("opq/keep").is_dir());
        assert!(!env.at(".wh..wh.plnk").exists());
        assert_eq!(xattr(&env.at("dir"), OPAQUE_XATTR), None);
    }

    #[test]
    fn device_nodes_are_skipped_and_counted() {
        let env = Env::new();
        let mut t = Tar::new();
        t.dir("dev/")
            .device(EntryType::Char, "dev/null", 1, 3)
            .device(EntryType::Block, "dev/sda", 8, 0)
            .device(EntryType::Char, "dev/kmsg", 1, 11)
            .file("dev/ok", b"1");
        let stats = env.unpack(t).unwrap();
        assert_eq!(stats.skipped_devices, 3);
        assert_eq!(stats.entries, 5);
        let names: Vec<_> = std::fs::read_dir(env.at("dev"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ok"]);
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let env = Env::new();
        let outside_secret = env.outside.join("secret");
        let mut t = Tar::new();
        t.file("a", b"one")
            .file("a", b"two")
            .dir("d/")
            .dir("d/sub/")
            .file("d/sub/f", b"x")
            .file("d", b"now a file")
            .symlink("s", outside_secret.to_str().unwrap())
            .file("s", b"replaced the symlink")
            .entry(EntryType::Directory, "k/", None, b"", owned(0, 0, 0o700))
            .file("k/child", b"")
            .entry(EntryType::Directory, "k/", None, b"", owned(9, 9, 0o755))
            .file(".wh.w", b"")
            .dir("w/")
            .file(".wh.v", b"")
            .file("v/x", b"")
            .symlink("e", "/")
            .dir("e/")
            .file("e/f", b"");
        env.unpack(t).unwrap();
        assert_eq!(std::fs::read(env.at("a")).unwrap(), b"two");
        assert_eq!(std::fs::read(env.at("d")).unwrap(), b"now a file");
        assert_eq!(std::fs::read(env.at("s")).unwrap(), b"replaced the symlink");
        let k = meta(&env.at("k"));
        assert_eq!((k.uid(), k.mode() & 0o7777), (9, 0o755));
        assert!(env.at("k/child").exists());
        for recreated in ["w", "v"] {
            assert!(meta(&env.at(recreated)).is_dir());
            let opaque = xattr(&env.at(recreated), OPAQUE_XATTR);
            assert_eq!(opaque.as_deref(), Some(&b"y"[..]), "{recreated}");
        }
        assert!(meta(&env.at("e")).is_dir());
        assert!(env.at("e/f").is_file());
        env.assert_outside_untouched();
    }

    #[test]
    fn hardlinks_resolve_within_the_layer() {
        let env = Env::new();
        let mut t = Tar::new();
        t.file("a/f", b"data")
            .dir("b/c/")
            .hardlink("b/c/h", "a/f")
            .hardlink("a/h2", "a/f")
            .symlink("a/s", env.outside.join("secret").to_str().unwrap())
            .hardlink("b/s2", "a/s")
            .hardlink("a/f", "a/f");
        env.unpack(t).unwrap();
        let f = meta(&env.at("a/f"));
        assert_eq!(f.nlink(), 3);
        assert_eq!(meta(&env.at("b/c/h")).ino(), f.ino());
        assert_eq!(meta(&env.at("a/h2")).ino(), f.ino());
        assert!(meta(&env.at("b/s2")).file_type().is_symlink());
        assert_eq!(meta(&env.at("b/s2")).ino(), meta(&env.at("a/s")).ino());
        env.assert_outside_untouched();
    }

    #[test]
    fn large_files_stream_and_long_names_work() {
        let env = Env::new();
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
        let long_dir = "d".repeat(120);
        let long_path = format!("{long_dir}/{}", "f".repeat(150));
        let long_target = "t".repeat(200);
        let mut b = tar::Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &long_path, &data[..]).unwrap();
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o777);
        h.set_mtime(MTIME);
        h.set_size(0);
        b.append_link(&mut h, "sl", &long_target).unwrap();
        let stats = unpack_layer(&b.into_inner().unwrap()[..], &env.dest, &[]).unwrap();
        assert_eq!(stats.bytes, data.len() as u64);
        assert_eq!(std::fs::read(env.at(&long_path)).unwrap(), data);
        assert_eq!(
            std::fs::read_link(env.at("sl")).unwrap(),
            Path::new(&long_target)
        );
    }

    #[test]
    fn error_messages_name_the_entry() {
        let env = Env::new();
        let mut t = Tar::new();
        t.file("../etc/passwd", b"x");
        let err = env.unpack(t).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"layer entry "../etc/passwd": path escapes the layer (contains ..)"#
        );
        let env = Env::new();
        let mut t = Tar::new();
        t.hardlink("h", "missing");
        let err = env.unpack(t).unwrap_err().to_string();
        assert_eq!(
            err,
            r#"layer entry "h": hardlink target "missing": does not exist in this layer"#
        );
    }

    #[test]
    fn dest_must_be_an_empty_directory() {
        let env = Env::new();
        std::fs::write(env.at("leftover"), b"").unwrap();
        let err = env.unpack(Tar::new()).unwrap_err();
        assert!(matches!(err, UnpackError::Destination { .. }), "{err}");
        let err = unpack_layer(&Tar::new().build()[..], &env.outside.join("secret"), &[]);
        assert!(matches!(err, Err(UnpackError::Destination { .. })));
    }

    #[test]
    fn truncated_archive_fails() {
        let env = Env::new();
        let mut t = Tar::new();
        t.file("a", &[7u8; 5000]);
        let mut bytes = t.build();
        bytes.truncate(512 + 1000);
        let err = unpack_layer(&bytes[..], &env.dest, &[]).unwrap_err();
        assert!(err.to_string().contains(r#"layer entry "a""#), "{err}");
    }

    /// Each hostile archive must fail, name the offending entry, and leave
    /// the sentinel directory next to `dest` untouched.
    #[test]
    fn hostile_archives_are_rejected() {
        type Case = (&'static str, &'static str, fn(&Env, &mut Tar));
        let cases: &[Case] = &[
            ("absolute path", "/etc/x", |_, t| {
                t.file("/etc/x", b"x");
            }),
            (
                "absolute path into the sentinel",
                "<outside>/pwned",
                |env, t| {
                    t.file(&sub(env, "<outside>/pwned"), b"x");
                },
            ),
            ("dotdot", "../x", |_, t| {
                t.file("../x", b"x");
            }),
            ("nested dotdot", "a/../../x", |_, t| {
                t.file("a/../../x", b"x");
            }),
            ("dotdot directory", "../outside/d/", |_, t| {
                t.dir("../outside/d/");
            }),
            ("absolute symlink parent", "s/pwned", |env, t| {
                t.symlink("s", &sub(env, "<outside>")).file("s/pwned", b"x");
            }),
            ("relative symlink parent", "s/pwned", |_, t| {
                t.symlink("s", "../outside").file("s/pwned", b"x");
            }),
            ("symlink to root", "s/outside/pwned", |_, t| {
                t.symlink("s", "../../../../../../..")
                    .file("s/outside/pwned", b"x");
            }),
            ("nested symlink parent", "d/s/sub/", |env, t| {
                t.dir("d/")
                    .symlink("d/s", &sub(env, "<outside>"))
                    .dir("d/s/sub/");
            }),
            ("symlink parent of a hardlink", "s/h", |env, t| {
                t.file("f", b"x")
                    .symlink("s", &sub(env, "<outside>"))
                    .hardlink("s/h", "f");
            }),
            ("symlink parent of a symlink", "s/l", |env, t| {
                t.symlink("s", &sub(env, "<outside>")).symlink("s/l", "/");
            }),
            ("symlink parent of a fifo", "s/p", |env, t| {
                t.symlink("s", &sub(env, "<outside>")).entry(
                    EntryType::Fifo,
                    "s/p",
                    None,
                    b"",
                    |_| {},
                );
            }),
            ("whiteout through a symlink", "s/.wh.secret", |env, t| {
                t.symlink("s", &sub(env, "<outside>"))
                    .file("s/.wh.secret", b"");
            }),
            ("opaque through a symlink", "s/.wh..wh..opq", |env, t| {
                t.symlink("s", &sub(env, "<outside>"))
                    .file("s/.wh..wh..opq", b"");
            }),
            ("whiteout of dot", "a/.wh..", |_, t| {
                t.dir("a/").file("a/.wh..", b"");
            }),
            ("whiteout named dotdot", "a/.wh...", |_, t| {
                t.dir("a/").file("a/.wh...", b"");
            }),
            ("hardlink to an absolute path", "h", |_, t| {
                t.hardlink("h", "/etc/passwd");
            }),
            ("hardlink to the sentinel", "h", |env, t| {
                t.hardlink("h", &sub(env, "<outside>/secret"));
            }),
            ("hardlink with dotdot", "h", |_, t| {
                t.hardlink("h", "../outside/secret");
            }),
            ("hardlink through a symlink", "h", |env, t| {
                t.symlink("s", &sub(env, "<outside>"))
                    .hardlink("h", "s/secret");
            }),
            ("hardlink through a nested symlink", "x/h", |_, t| {
                t.dir("a/")
                    .symlink("a/s", "../../outside")
                    .dir("x/")
                    .hardlink("x/h", "a/s/secret");
            }),
            ("hardlink to a lower-layer file", "h", |_, t| {
                t.hardlink("h", "lowerfile");
            }),
            ("lower-layer symlink parent", "lib/pwned", |env, t| {
                let lower = env.tmp.path().join("lower");
                std::os::unix::fs::symlink(&env.outside, lower.join("lib")).unwrap();
                t.file("lib/pwned", b"x");
            }),
            (
                "lower-layer symlink deeper down",
                "usr/lib/pwned",
                |env, t| {
                    let lower = env.tmp.path().join("lower");
                    std::fs::create_dir(lower.join("usr")).unwrap();
                    std::os::unix::fs::symlink("../../outside", lower.join("usr/lib")).unwrap();
                    t.dir("usr/").file("usr/lib/pwned", b"x");
                },
            ),
        ];
        for (what, entry, build) in cases {
            let env = Env::new();
            let lower = env.lower("lower");
            std::fs::write(lower.join("lowerfile"), b"").unwrap();
            let mut t = Tar::new();
            build(&env, &mut t);
            let err = env.unpack_with(t, &[lower]).expect_err(what).to_string();
            let entry = sub(&env, entry);
            assert!(
                err.starts_with(&format!("layer entry {entry:?}")),
                "{what}: unexpected error: {err}"
            );
            env.assert_outside_untouched();
        }
    }

    /// Puts the sentinel's real path in place of `<outside>`.
    fn sub(env: &Env, text: &str) -> String {
        text.replace("<outside>", env.outside.to_str().unwrap())
    }

    #[test]
    fn lower_layers_decide_top_most_first() {
        let env = Env::new();
        let upper = env.lower("l1");
        let below = env.lower("l2");
        // A whiteout in l1 hides l2's symlink.
        mknod_whiteout(&upper.join("lib"));
        std::os::unix::fs::symlink(&env.outside, below.join("lib")).unwrap();
        // An opaque directory in l1 hides l2's contents.
        std::fs::create_dir(upper.join("a")).unwrap();
        fs::setxattr(upper.join("a"), OPAQUE_XATTR, b"y", XattrFlags::empty()).unwrap();
        std::fs::create_dir(below.join("a")).unwrap();
        std::os::unix::fs::symlink(&env.outside, below.join("a/s")).unwrap();
        // A regular file in l1 hides l2's directory.
        std::fs::write(upper.join("f"), b"").unwrap();
        std::fs::create_dir(below.join("f")).unwrap();
        std::os::unix::fs::symlink(&env.outside, below.join("f/s")).unwrap();
        // Symlinks replaced in this layer by an explicit directory, or hidden
        // by this layer's own opaque marker.
        std::os::unix::fs::symlink(&env.outside, upper.join("bin")).unwrap();
        std::fs::create_dir(upper.join("c")).unwrap();
        std::os::unix::fs::symlink(&env.outside, upper.join("c/s")).unwrap();
        // A merged (non-opaque) directory lets l2's symlink show through.
        std::fs::create_dir(upper.join("b")).unwrap();
        std::fs::create_dir(below.join("b")).unwrap();
        std::os::unix::fs::symlink(&env.outside, below.join("b/s")).unwrap();
        let lowers = [upper.clone(), below.clone()];

        let mut t = Tar::new();
        t.file("lib/ok", b"")
            .file("a/s/ok", b"")
            .file("f/s/ok", b"")
            .dir("bin/")
            .file("bin/ok", b"")
            .file("c/.wh..wh..opq", b"")
            .file("c/s/ok", b"");
        env.unpack_with(t, &lowers).unwrap();
        for ok in ["lib/ok", "a/s/ok", "f/s/ok", "bin/ok", "c/s/ok"] {
            assert!(env.at(ok).is_file(), "{ok}");
        }
        env.assert_outside_untouched();

        let env2 = Env::new();
        let mut t = Tar::new();
        t.file("b/s/pwned", b"");
        let err = env2.unpack_with(t, &lowers).unwrap_err().to_string();
        assert!(
            err.starts_with(r#"layer entry "b/s/pwned": parent "b/s" is a symlink in lower layer"#),
            "{err}"
        );
        env.assert_outside_untouched();
    }
}
