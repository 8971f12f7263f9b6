//! Writer for the kubelet CRI container log format.
//!
//! The per-container monitor copies the container's stdout/stderr pipes into
//! the log file kubelet asked for (`ContainerConfig.log_path`). Every record
//! is one line:
//!
//! ```text
//! <timestamp> <stream> <tag> <content>\n
//! ```
//!
//! * `timestamp`: RFC3339Nano in UTC, always 9 fractional digits
//!   (`2026-11-22T05:56:36.123456789Z`), taken when the data arrived;
//! * `stream`: `stdout` or `stderr`;
//! * `tag`: `F` when the record ends a line of the original output, `P` when
//!   the original line continues in the next record of the same stream;
//! * `content`: the bytes of the line without its `\n` (a `\r` before the
//!   `\n` is kept as content, so kubelet reproduces the original bytes).
//!
//! Lines longer than [`MAX_LINE`] bytes are split into `P` records of exactly
//! `MAX_LINE` bytes followed by an `F` record with the rest (which may be
//! exactly `MAX_LINE` bytes, never more), like containerd does with its
//! `max_container_log_line_size`.
//!
//! Data arrives in arbitrary chunks, so each stream keeps its own pending
//! partial line (at most `MAX_LINE` bytes) until its newline arrives, the
//! line grows past `MAX_LINE`, or the stream reaches EOF ([`CriLog::finish`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};

/// Longest content of one record, in bytes (containerd's default
/// `max_container_log_line_size`).
pub const MAX_LINE: usize = 16 * 1024;

/// Permission bits of a newly created log file (before the umask).
const LOG_FILE_MODE: u32 = 0o640;

/// Which pipe of the container the data was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Record tag: the record ends a line (`F`) or the line continues (`P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Full,
    Partial,
}

impl Tag {
    fn as_str(self) -> &'static str {
        match self {
            Tag::Full => "F",
            Tag::Partial => "P",
        }
    }
}

/// A CRI log file being written, with one pending partial line per stream.
pub struct CriLog {
    path: PathBuf,
    file: File,
    /// Pending partial line per stream (indexed by [`Stream::index`]);
    /// never longer than [`MAX_LINE`] between calls.
    pending: [Vec<u8>; 2],
    /// Reused buffer in which each record is built before its single write.
    record: Vec<u8>,
}

impl std::fmt::Debug for CriLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriLog")
            .field("path", &self.path)
            .field("pending_stdout", &self.pending[0].len())
            .field("pending_stderr", &self.pending[1].len())
            .finish()
    }
}

impl CriLog {
    /// Opens (append, create, mode 0640) the log file; the parent dir must exist.
    pub fn open(path: &Path) -> io::Result<CriLog> {
        let file = open_log_file(path)?;
        Ok(CriLog {
            path: path.to_path_buf(),
            file,
            pending: [Vec::new(), Vec::new()],
            record: Vec::new(),
        })
    }

    /// Appends `data` read from `stream`, writing every completed line (and MAX_LINE chunks of overlong lines).
    ///
    /// All records of this call carry the same timestamp (now). On a write
    /// error the remaining records are still attempted (the stream state
    /// stays consistent and the container output keeps being drained) and
    /// the first error is returned.
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        self.write_at(stream, data, Utc::now())
    }

    /// The stream reached EOF: write its pending partial line, if any.
    ///
    /// The last line of a stream without a trailing newline is written with
    /// tag `P`, as containerd does: in `pkg/cri/io/logger.go`
    /// (`redirectLogs`), when `readLine` returns EOF with content left it
    /// calls `writeLineBuffer(partial, buf)` ("readLine only returns error
    /// when the message doesn't end with a newline, in that case it should
    /// be treated as a partial line"). The tag thus tells the truth: the
    /// original output had no newline there.
    pub fn finish(&mut self, stream: Stream) -> io::Result<()> {
        self.finish_at(stream, Utc::now())
    }

    /// Reopens the path (kubelet renamed the file for rotation): later records go to a new file at the same path.
    ///
    /// Pending partial lines are kept and end up in the new file. If the
    /// path cannot be opened, the old file stays in use and the error is
    /// returned.
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = open_log_file(&self.path)?;
        Ok(())
    }

    fn write_at(&mut self, stream: Stream, data: &[u8], now: DateTime<Utc>) -> io::Result<()> {
        let ts = format_timestamp(now);
        let mut first_err = None;
        let mut rest = data;
        loop {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.add_segment(stream, &ts, &rest[..i], true, &mut first_err);
                    rest = &rest[i + 1..];
                }
                None => {
                    self.add_segment(stream, &ts, rest, false, &mut first_err);
                    break;
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn finish_at(&mut self, stream: Stream, now: DateTime<Utc>) -> io::Result<()> {
        let idx = stream.index();
        if self.pending[idx].is_empty() {
            return Ok(());
        }
        let ts = format_timestamp(now);
        let pending = std::mem::take(&mut self.pending[idx]);
        let res = self.emit(stream, &ts, Tag::Partial, &pending, &[]);
        // Keep the allocation for a possible later use of the stream.
        self.pending[idx] = pending;
        self.pending[idx].clear();
        res
    }

    /// Adds `seg` (containing no newline) to the pending line of `stream`,
    /// writing `P` records while the line is longer than `MAX_LINE`; if
    /// `ends_line`, the rest is written as an `F` record.
    fn add_segment(
        &mut self,
        stream: Stream,
        ts: &str,
        mut seg: &[u8],
        ends_line: bool,
        first_err: &mut Option<io::Error>,
    ) {
        let idx = stream.index();
        let mut pending = std::mem::take(&mut self.pending[idx]);
        // Invariant: pending.len() <= MAX_LINE. A record is cut only once
        // more than MAX_LINE bytes are known, so a line of exactly MAX_LINE
        // bytes stays one F record.
        while pending.len() + seg.len() > MAX_LINE {
            let take = MAX_LINE - pending.len();
            let res = self.emit(stream, ts, Tag::Partial, &pending, &seg[..take]);
            note_err(first_err, res);
            pending.clear();
            seg = &seg[take..];
        }
        if ends_line {
            let res = self.emit(stream, ts, Tag::Full, &pending, seg);
            note_err(first_err, res);
            pending.clear();
        } else {
            pending.extend_from_slice(seg);
        }
        self.pending[idx] = pending;
    }

    /// Writes one record whose content is `a` followed by `b`, with a
    /// single `write_all` so that records are never interleaved.
    fn emit(&mut self, stream: Stream, ts: &str, tag: Tag, a: &[u8], b: &[u8]) -> io::Result<()> {
        let rec = &mut self.record;
        rec.clear();
        rec.extend_from_slice(ts.as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(stream.as_str().as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(tag.as_str().as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(a);
        rec.extend_from_slice(b);
        rec.push(b'\n');
        let res = self.file.write_all(rec);
        // Do not keep a huge buffer around after an unusual record.
        if rec.capacity() > 4 * MAX_LINE {
            *rec = Vec::new();
        }
        res
    }
}

fn note_err(first_err: &mut Option<io::Error>, res: io::Result<()>) {
    if let Err(e) = res {
        first_err.get_or_insert(e);
    }
}

fn open_log_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_FILE_MODE)
        .open(path)
}

/// RFC3339Nano in UTC with always 9 fractional digits, e.g.
/// `2026-11-22T05:56:36.123456789Z`.
fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::os::unix::fs::PermissionsExt;

    const TS: &str = "2026-11-22T05:56:36.123456789Z";

    fn fixed_time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 5, 56, 36).unwrap()
            + chrono::Duration::nanoseconds(123_456_789)
    }

    fn setup() -> (tempfile::TempDir, PathBuf, CriLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let log = CriLog::open(&path).unwrap();
        (dir, path, log)
    }

    /// Parses the file into (stream, tag, content) records, checking that
    /// every timestamp is the fixed one.
    fn records(path: &Path) -> Vec<(String, String, Vec<u8>)> {
        let data = std::fs::read(path).unwrap();
        assert!(data.is_empty() || data.ends_with(b"\n"));
        let mut out = Vec::new();
        for line in data.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue; // after the final newline
            }
            let mut parts = line.splitn(4, |&b| b == b' ');
            let ts = std::str::from_utf8(parts.next().unwrap()).unwrap();
            assert_eq!(ts, TS);
            let stream = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
            let tag = String::from_utf8(parts.next().unwrap().to_vec()).unwrap();
            let content = parts.next().expect("record has a content field").to_vec();
            out.push((stream, tag, content));
        }
        out
    }

    fn rec(stream: &str, tag: &str, content: &[u8]) -> (String, String, Vec<u8>) {
        (stream.to_string(), tag.to_string(), content.to_vec())
    }

    #[test]
    fn complete_lines() {
        let (_d, path, mut log) = setup();
        log.write_at(Stream::Stdout, b"hello world\nsecond line\n", fixed_time())
            .unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            raw,
            format!("{TS} stdout F hello world\n{TS} stdout F second line\n")
        );
    }

    #[test]
    fn chunks_split_mid_line() {
        let (_d, path, mut log) = setup();
        let t = fixed_time();
        log.write_at(Stream::Stdout, b"hel", t).unwrap();
        assert!(records(&path).is_empty());
        log.write_at(Stream::Stdout, b"lo\nwor", t).unwrap();
        log.write_at(Stream::Stdout, b"ld", t).unwrap();
        log.write_at(Stream::Stdout, b"\n", t).unwrap();
        assert_eq!(
            records(&path),
            vec![rec("stdout", "F", b"hello"), rec("stdout", "F", b"world")]
        );
    }

    #[test]
    fn streams_keep_separate_pending() {
        let (_d, path, mut log) = setup();
        let t = fixed_time();
        log.write_at(Stream::Stdout, b"out-a", t).unwrap();
        log.write_at(Stream::Stderr, b"err-a", t).unwrap();
        log.write_at(Stream::Stdout, b"-b\n", t).unwrap();
        log.write_at(Stream::Stderr, b"-b\nerr2\n", t).unwrap();
        assert_eq!(
            records(&path),
            vec![
                rec("stdout", "F", b"out-a-b"),
                rec("stderr", "F", b"err-a-b"),
                rec("stderr", "F", b"err2"),
            ]
        );
    }

    #[test]
    fn empty_lines() {
        let (_d, path, mut log) = setup();
        log.write_at(Stream::Stdout, b"\n\n", fixed_time()).unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        assert_eq!(raw, format!("{TS} stdout F \n{TS} stdout F \n"));
    }

    #[test]
    fn carriage_return_is_content() {
        let (_d, path, mut log) = setup();
        log.write_at(Stream::Stdout, b"dos\r\n", fixed_time())
            .unwrap();
        assert_eq!(records(&path), vec![rec("stdout", "F", b"dos\r")]);
    }

    #[test]
    fn line_of_exactly_max_line() {
        let (_d, path, mut log) = setup();
        let mut data = vec![b'a'; MAX_LINE];
        data.push(b'\n');
        log.write_at(Stream::Stdout, &data, fixed_time()).unwrap();
        assert_eq!(records(&path), vec![rec("stdout", "F", &data[..MAX_LINE])]);
    }

    #[test]
    fn line_of_exactly_max_line_in_chunks() {
        // The pending line reaches MAX_LINE before its newline is known: it
        // must wait rather than be cut as P + empty F.
        let (_d, path, mut log) = setup();
        let t = fixed_time();
        log.write_at(Stream::Stdout, &vec![b'a'; MAX_LINE - 1], t)
            .unwrap();
        log.write_at(Stream::Stdout, b"a", t).unwrap();
        assert!(records(&path).is_empty());
        log.write_at(Stream::Stdout, b"\n", t).unwrap();
        assert_eq!(
            records(&path),
            vec![rec("stdout", "F", &vec![b'a'; MAX_LINE])]
        );
    }

    #[test]
    fn line_of_max_line_plus_one() {
        let (_d, path, mut log) = setup();
        let mut data = vec![b'a'; MAX_LINE];
        data.push(b'b');
        data.push(b'\n');
        log.write_at(Stream::Stdout, &data, fixed_time()).unwrap();
        assert_eq!(
            records(&path),
            vec![
                rec("stdout", "P", &vec![b'a'; MAX_LINE]),
                rec("stdout", "F", b"b"),
            ]
        );
    }

    #[test]
    fn long_line_split_in_small_chunks() {
        let (_d, path, mut log) = setup();
        let t = fixed_time();
        // 2 * MAX_LINE + 5 bytes of content, fed 1000 bytes at a time.
        let content: Vec<u8> = (0..2 * MAX_LINE + 5)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let mut data = content.clone();
        data.extend_from_slice(b"\nnext\n");
        for chunk in data.chunks(1000) {
            log.write_at(Stream::Stderr, chunk, t).unwrap();
        }
        assert_eq!(
            records(&path),
            vec![
                rec("stderr", "P", &content[..MAX_LINE]),
                rec("stderr", "P", &content[MAX_LINE..2 * MAX_LINE]),
                rec("stderr", "F", &content[2 * MAX_LINE..]),
                rec("stderr", "F", b"next"),
            ]
        );
    }

    #[test]
    fn line_of_twice_max_line() {
        let (_d, path, mut log) = setup();
        let mut data = vec![b'x'; 2 * MAX_LINE];
        data.push(b'\n');
        log.write_at(Stream::Stdout, &data, fixed_time()).unwrap();
        assert_eq!(
            records(&path),
            vec![
                rec("stdout", "P", &vec![b'x'; MAX_LINE]),
                rec("stdout", "F", &vec![b'x'; MAX_LINE]),
            ]
        );
    }

    #[test]
    fn finish_writes_partial() {
        let (_d, path, mut log) = setup();
        let t = fixed_time();
        log.write_at(Stream::Stdout, b"done\nno newline", t)
            .unwrap();
        log.write_at(Stream::Stderr, b"err tail", t).unwrap();
        log.finish_at(Stream::Stdout, t).unwrap();
        assert_eq!(
            records(&path),
            vec![
                rec("stdout", "F", b"done"),
                rec("stdout", "P", b"no newline"),
            ]
        );
        // Finishing again (nothing pending) writes nothing.
        log.finish_at(Stream::Stdout, t).unwrap();
        log.finish_at(Stream::Stderr, t).unwrap();
        assert_eq!(
            records(&path),
            vec![
                rec("stdout", "F", b"done"),
                rec("stdout", "P", b"no newline"),
                rec("stderr", "P", b"err tail"),
            ]
        );
    }

    #[test]
    fn finish_with_nothing_pending_writes_nothing() {
        let (_d, path, mut log) = setup();
        log.write_at(Stream::Stdout, b"line\n", fixed_time())
            .unwrap();
        log.finish(Stream::Stdout).unwrap();
        log.finish(Stream::Stderr).unwrap();
        assert_eq!(records(&path), vec![rec("stdout", "F", b"line")]);
    }

    #[test]
    fn finish_after_split_of_exact_max_line() {
        let (_d, path, mut log) = setup();
        let t = fixed_time();
        log.write_at(Stream::Stdout, &vec![b'z'; MAX_LINE], t)
            .unwrap();
        log.finish_at(Stream::Stdout, t).unwrap();
        assert_eq!(
            records(&path),
            vec![rec("stdout", "P", &vec![b'z'; MAX_LINE])]
        );
    }

    #[test]
    fn reopen_after_rename() {
        let (dir, path, mut log) = setup();
        let t = fixed_time();
        log.write_at(Stream::Stdout, b"old record\npending ", t)
            .unwrap();
        let rotated = dir.path().join("0.log.20261122-055636");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen().unwrap();
        log.write_at(Stream::Stdout, b"part\nnew record\n", t)
            .unwrap();
        assert_eq!(records(&rotated), vec![rec("stdout", "F", b"old record")]);
        assert_eq!(
            records(&path),
            vec![
                rec("stdout", "F", b"pending part"),
                rec("stdout", "F", b"new record"),
            ]
        );
    }

    #[test]
    fn open_appends_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, format!("{TS} stdout F before\n")).unwrap();
        let mut log = CriLog::open(&path).unwrap();
        log.write_at(Stream::Stdout, b"after\n", fixed_time())
            .unwrap();
        assert_eq!(
            records(&path),
            vec![rec("stdout", "F", b"before"), rec("stdout", "F", b"after")]
        );

        let fresh = dir.path().join("1.log");
        CriLog::open(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        // The umask can only remove bits.
        assert_eq!(mode & !LOG_FILE_MODE, 0, "mode {mode:o}");
    }

    #[test]
    fn open_fails_without_parent_dir() {
        let dir = tempfile::tempdir().unwrap();
        let err = CriLog::open(&dir.path().join("missing/0.log")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn timestamp_format_parses() {
        assert_eq!(format_timestamp(fixed_time()), TS);
        // Whole seconds still get 9 fractional digits.
        let whole = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(format_timestamp(whole), "2026-01-02T03:04:05.000000000Z");

        // A real record written with the real clock.
        let (_d, path, mut log) = setup();
        log.write(Stream::Stderr, b"now\n").unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        let (ts, rest) = raw.split_once(' ').unwrap();
        assert_eq!(rest, "stderr F now\n");
        assert_eq!(ts.len(), TS.len());
        assert!(ts.ends_with('Z'));
        let parsed = DateTime::parse_from_rfc3339(ts).unwrap();
        assert_eq!(parsed.offset().local_minus_utc(), 0);
        let age = Utc::now().signed_duration_since(parsed.with_timezone(&Utc));
        assert!(age >= chrono::Duration::zero() && age < chrono::Duration::seconds(60));
        assert_eq!(DateTime::parse_from_rfc3339(TS).unwrap(), fixed_time());
    }
}
