//! The archive's byte stream: gzip or plain tar (told by the first bytes, `1f 8b`), what
//! a stream that is not a tar looks like, a GNU volume label the tar crate cannot read,
//! and a meter that bounds what is read and remembers the last header block.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;

use crate::error::{Error, IoContext, Result};

/// Size of a tar block.
pub(super) const BLOCK: u64 = 512;

/// Size of the decompressed chunks [`Ahead`] hands over, and how many it may hold ready.
const AHEAD_CHUNK: usize = 256 * 1024;
const AHEAD_CHUNKS: usize = 4;

/// The archive opened for reading.
pub(super) struct Stream {
    /// The tar bytes, decompressed, counted by `meter`.
    pub(super) reader: Metered,
    pub(super) meter: Rc<Meter>,
    /// `tar` or `tar.gz`, for messages.
    pub(super) format: &'static str,
    /// What the first bytes look like when they are another format, for messages.
    pub(super) foreign: Option<&'static str>,
}

/// Reads the archive from its start; skips a leading GNU volume label.
pub(super) fn open(file: File, name: &str) -> Result<Stream> {
    let mut file = BufReader::new(file);
    let magic = file.seek(SeekFrom::Start(0)).and_then(|_| file.fill_buf());
    let gzip = magic.io("read", name)?.starts_with(&[0x1f, 0x8b]);
    let mut source: Box<dyn Read> = match gzip {
        true => Box::new(Ahead::spawn(flate2::read::MultiGzDecoder::new(file))?),
        false => Box::new(file),
    };
    // GNU tar's `--label` writes a first header of type `V` whose size field is left
    // empty, which the tar crate cannot read as a number. GNU tar extracts nothing for a
    // label, so a first block that is such a header is skipped.
    let mut first = Vec::with_capacity(BLOCK as usize);
    if let Err(e) = source.by_ref().take(BLOCK).read_to_end(&mut first) {
        let (path, reason) = (name.to_string(), format!("not readable: {e}"));
        return Err(Error::BadArchive { path, reason });
    }
    let foreign = foreign_format(&first);
    if !is_volume_label(&first) {
        source = Box::new(io::Cursor::new(first).chain(source));
    }
    let meter = Rc::new(Meter::default());
    Ok(Stream {
        reader: Metered {
            inner: source,
            meter: meter.clone(),
        },
        meter,
        format: if gzip { "tar.gz" } else { "tar" },
        foreign,
    })
}

/// What a stream that is not a tar looks like, from its magic bytes (as `file(1)`
/// tells them): other compressors GNU tar would run, and other archive formats.
fn foreign_format(first: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(&[u8], &str)] = &[
        (b"BZh", "bzip2 data"),
        (b"\xfd7zXZ\x00", "xz data"),
        (b"\x28\xb5\x2f\xfd", "zstd data"),
        (b"LZIP", "lzip data"),
        (b"\x04\x22\x4d\x18", "lz4 data"),
        (b"\x1f\x9d", "compress (.Z) data"),
        (b"\x1f\x8b", "gzip data inside gzip"),
        (b"PK\x03\x04", "a zip archive"),
        (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| first.starts_with(magic))
        .map(|(_, what)| *what)
}

/// The header in a block whose checksum holds.
fn header(block: &[u8]) -> Option<&tar::Header> {
    if block.len() != BLOCK as usize {
        return None;
    }
    let header = tar::Header::from_byte_slice(block);
    let mut summed = header.clone();
    summed.set_cksum();
    (header.cksum().ok() == summed.cksum().ok()).then_some(header)
}

/// Whether a block is a GNU volume label without data: type `V`, a right checksum,
/// and a size field that is empty or zero.
fn is_volume_label(block: &[u8]) -> bool {
    header(block).is_some_and(|header| {
        header.entry_type().as_byte() == b'V'
            && header
                .as_old()
                .size
                .iter()
                .all(|b| matches!(b, 0 | b'0' | b' '))
    })
}

/// Shared count of bytes read from the decompressed stream, with a movable limit, and
/// the last bytes read (so a header the tar reader fails on can be named).
#[derive(Debug, Default)]
pub(super) struct Meter {
    read: Cell<u64>,
    limit: Cell<u64>,
    /// Whether the stream ended.
    pub(super) eof: Cell<bool>,
    /// The last block's worth of bytes read.
    tail: RefCell<Vec<u8>>,
}

impl Meter {
    /// Notes `data`, just read.
    fn record(&self, data: &[u8]) {
        let mut tail = self.tail.borrow_mut();
        tail.extend_from_slice(&data[data.len().saturating_sub(BLOCK as usize)..]);
        let excess = tail.len().saturating_sub(BLOCK as usize);
        tail.drain(..excess);
        self.read.set(self.read.get() + data.len() as u64);
    }

    /// The name in the block just read whole, when it is a tar header (its checksum
    /// holds): the entry the tar reader was reading when it failed.
    pub(super) fn last_header_name(&self) -> Option<String> {
        if self.read.get() % BLOCK != 0 {
            return None;
        }
        let tail = self.tail.borrow();
        let header = header(&tail)?;
        Some(String::from_utf8_lossy(&header.path_bytes()).into_owned())
    }

    /// Allows `more` bytes from now on.
    pub(super) fn allow(&self, more: u64) {
        self.limit.set(self.read.get().saturating_add(more));
    }

    pub(super) fn exhausted(&self) -> bool {
        self.read.get() >= self.limit.get()
    }
}

/// The archive stream, counted by a [`Meter`] and cut off at its limit.
pub(super) struct Metered {
    inner: Box<dyn Read>,
    meter: Rc<Meter>,
}

impl Read for Metered {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.meter.limit.get().saturating_sub(self.meter.read.get());
        if room == 0 {
            return Err(io::Error::other("size limit reached"));
        }
        let want = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.meter.eof.set(true);
        }
        self.meter.record(&buf[..n]);
        Ok(n)
    }
}

/// A reader that decompresses on a thread of its own, up to [`AHEAD_CHUNKS`] chunks
/// ahead of its consumer, so that inflating overlaps with creating and writing the
/// files (as `tar xzf` runs `gzip -d` in a process of its own). Memory stays at a few
/// chunks whatever the archive. Dropping it stops the thread and waits for it.
struct Ahead {
    chunks: Option<Receiver<io::Result<Vec<u8>>>>,
    current: io::Cursor<Vec<u8>>,
    ended: bool,
    thread: Option<JoinHandle<()>>,
}

impl Ahead {
    fn spawn<R: Read + Send + 'static>(mut source: R) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel(AHEAD_CHUNKS);
        let thread = std::thread::Builder::new()
            .name("unpack-inflate".into())
            .spawn(move || loop {
                let mut chunk = vec![0u8; AHEAD_CHUNK];
                let mut filled = 0;
                let outcome = loop {
                    match source.read(&mut chunk[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == chunk.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                chunk.truncate(filled);
                let last = filled == 0 || outcome.is_err();
                // The bytes before an error first, then the error; an empty chunk is
                // the end. A send fails when the reader is gone: stop.
                if filled > 0 && tx.send(Ok(chunk)).is_err() {
                    return;
                }
                if let Err(e) = outcome {
                    let _ = tx.send(Err(e));
                }
                if last {
                    if filled == 0 {
                        let _ = tx.send(Ok(Vec::new()));
                    }
                    return;
                }
            })
            .map_err(|e| {
                Error::Internal(format!("could not start the decompressing thread: {e}"))
            })?;
        Ok(Ahead {
            chunks: Some(rx),
            current: io::Cursor::new(Vec::new()),
            ended: false,
            thread: Some(thread),
        })
    }
}

impl Read for Ahead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.ended {
                return Ok(n);
            }
            let next = self.chunks.as_ref().map(|rx| rx.recv());
            match next {
                Some(Ok(Ok(chunk))) if chunk.is_empty() => self.ended = true,
                Some(Ok(Ok(chunk))) => self.current = io::Cursor::new(chunk),
                Some(Ok(Err(e))) => return Err(e),
                // The thread ended without saying so: it panicked.
                Some(Err(_)) | None => {
                    return Err(io::Error::other("the decompressing thread stopped"));
                }
            }
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail, and it returns.
        drop(self.chunks.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives `good` bytes in small reads, then fails.
    struct FailsAfter {
        good: io::Cursor<Vec<u8>>,
    }

    impl Read for FailsAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let cap = buf.len().min(1000);
            match self.good.read(&mut buf[..cap])? {
                0 => Err(io::Error::other("disk on fire")),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn ahead_hands_over_every_byte_then_the_end() {
        let bytes: Vec<u8> = (0..3 * AHEAD_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let mut ahead = Ahead::spawn(io::Cursor::new(bytes.clone())).expect("spawn");
        let mut read = Vec::new();
        ahead.read_to_end(&mut read).expect("read");
        assert_eq!(read, bytes);
        assert_eq!(ahead.read(&mut [0u8; 8]).expect("after the end"), 0);
    }

    #[test]
    fn ahead_hands_over_the_bytes_before_an_error_then_the_error() {
        let good = vec![7u8; AHEAD_CHUNK + 5000];
        let source = FailsAfter {
            good: io::Cursor::new(good.clone()),
        };
        let mut ahead = Ahead::spawn(source).expect("spawn");
        let mut read = vec![0u8; good.len()];
        ahead.read_exact(&mut read).expect("the good bytes");
        assert_eq!(read, good);
        let err = ahead.read(&mut [0u8; 8]).unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }

    #[test]
    fn dropping_ahead_stops_its_thread_on_an_endless_source() {
        // `io::repeat` never ends: the thread must stop because the reader is gone.
        let mut ahead = Ahead::spawn(io::repeat(1)).expect("spawn");
        let mut some = [0u8; 10];
        ahead.read_exact(&mut some).expect("read");
        drop(ahead); // joins the thread; hangs if it does not stop
    }
}
