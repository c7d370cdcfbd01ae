//! Reading a disk that is being imported, as a stream of data and zero chunks in offset order:
//! from an NBD export (walking its `base:allocation` map) or from a raw file or block device
//! (walking SEEK_DATA/SEEK_HOLE). Holes, zero extents and all-zero blocks inside data become
//! `Zero` chunks so the caller can punch or skip them instead of writing zeroes.
//!
//! Owns only the reading side. It must never know about volumes: the caller decides where the
//! chunks go (`import_volume.rs` writes them into a Ferry volume).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::nbd::client::{connect, NbdClient, PendingRead};
use crate::nbd::proto;

/// One piece of the source, in offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportChunk {
    Data {
        offset: u64,
        bytes: Vec<u8>,
    },
    /// `length` bytes at `offset` read as zeroes (a hole, a zero extent, or zero-filled data).
    Zero {
        offset: u64,
        length: u64,
    },
}

/// Where an import stands; `done` counts source bytes handled (data + zero), in offset order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportProgress {
    pub done: u64,
    pub total: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    /// Largest data chunk (and NBD read); capped further by the server's maximum block size.
    pub chunk_size: usize,
    /// Granularity of zero detection inside data, at absolute offsets that are multiples of it.
    pub zero_block: usize,
    /// NBD reads kept in flight while the sink works on earlier chunks.
    pub read_ahead: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            chunk_size: 4 << 20,
            zero_block: 4096,
            read_ahead: 4,
        }
    }
}

impl ImportOptions {
    fn check(&self) -> Result<()> {
        if self.chunk_size == 0 || self.zero_block == 0 || self.read_ahead == 0 {
            return Err(Error::InvalidArgument(format!(
                "import options {self:?}: chunk_size, zero_block and read_ahead must be > 0"
            )));
        }
        Ok(())
    }
}

/// Receives chunks; an error stops the import and is returned as is.
pub type ChunkSink<'a> = &'a mut (dyn FnMut(ImportChunk) -> Result<()> + Send);
/// Hears progress after every chunk.
pub type ProgressSink<'a> = &'a mut (dyn FnMut(ImportProgress) + Send);

/// Bytes of the allocation map asked for at once (bounds the extents held in memory).
const MAP_WINDOW: u64 = 256 << 20;

/// Connect to `uri`, stream the export through `sink`, disconnect.
pub async fn copy_from_nbd(
    uri: &str,
    opts: &ImportOptions,
    sink: ChunkSink<'_>,
    progress: ProgressSink<'_>,
) -> Result<ImportProgress> {
    opts.check()?;
    let client = connect(uri, &[proto::META_BASE_ALLOCATION]).await?;
    let copied = copy_from_client(&client, opts, sink, progress).await;
    let closed = client.disconnect().await;
    let p = copied?;
    closed?;
    Ok(p)
}

/// Stream an open client's export through `sink`. Uses `base:allocation` when it was granted;
/// otherwise reads everything and relies on zero detection.
pub async fn copy_from_client(
    client: &NbdClient,
    opts: &ImportOptions,
    sink: ChunkSink<'_>,
    progress: ProgressSink<'_>,
) -> Result<ImportProgress> {
    opts.check()?;
    let size = client.size();
    let min = client.block_size().0 as u64;
    let piece = ((opts.chunk_size as u64).min(client.max_request() as u64) / min * min).max(min);
    let mut out = Emitter::new(size, opts, sink, progress);
    let mut plan = Plan {
        client,
        piece,
        pos: 0,
        todo: VecDeque::new(),
    };
    enum Step<'c> {
        Zero(u64, u64),
        Read(u64, PendingRead<'c>),
    }
    let mut queue: VecDeque<Step> = VecDeque::new();
    let mut reads = 0;
    loop {
        // Zero runs cost nothing to queue but are capped too, so a long zero stretch cannot pile
        // up ahead of a slow read.
        while reads < opts.read_ahead && queue.len() < opts.read_ahead * 16 {
            match plan.next().await? {
                None => break,
                Some(Segment {
                    offset,
                    length,
                    zero: true,
                }) => queue.push_back(Step::Zero(offset, length)),
                Some(Segment {
                    offset,
                    length,
                    zero: false,
                }) => {
                    queue.push_back(Step::Read(
                        offset,
                        client.start_read(offset, length as u32).await?,
                    ));
                    reads += 1;
                }
            }
        }
        match queue.pop_front() {
            None => break,
            Some(Step::Zero(offset, length)) => out.zero(offset, length)?,
            Some(Step::Read(offset, r)) => {
                reads -= 1;
                let bytes = r.wait().await?;
                out.data(offset, bytes)?;
            }
        }
    }
    out.finish()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    length: u64,
    zero: bool,
}

/// Turns the allocation map into aligned read pieces and zero runs, one window at a time.
struct Plan<'c> {
    client: &'c NbdClient,
    piece: u64,
    pos: u64,
    todo: VecDeque<Segment>,
}

impl Plan<'_> {
    async fn next(&mut self) -> Result<Option<Segment>> {
        if self.todo.is_empty() && self.pos < self.client.size() {
            self.refill().await?;
        }
        let Some(mut s) = self.todo.pop_front() else {
            return Ok(None);
        };
        if !s.zero && s.length > self.piece {
            self.todo.push_front(Segment {
                offset: s.offset + self.piece,
                length: s.length - self.piece,
                zero: false,
            });
            s.length = self.piece;
        }
        Ok(Some(s))
    }

    async fn refill(&mut self) -> Result<()> {
        let c = self.client;
        let len = (c.size() - self.pos).min(MAP_WINDOW);
        let mut segs: Vec<Segment> = Vec::new();
        if c.meta_context_id(proto::META_BASE_ALLOCATION).is_some() {
            let min = c.block_size().0 as u64;
            for e in c
                .block_status(self.pos, len, proto::META_BASE_ALLOCATION)
                .await?
            {
                let (lo, hi) = (e.offset, e.offset + e.length);
                // Only what the server promises reads as zero is skipped; a hole without
                // STATE_ZERO has undefined contents, so it is read (and zero-detected).
                if e.flags & proto::STATE_ZERO != 0 {
                    // Shrink to the server's alignment so the data around it stays readable.
                    let (a, b) = (lo.div_ceil(min) * min, hi / min * min);
                    if a < b {
                        push(
                            &mut segs,
                            Segment {
                                offset: lo,
                                length: a - lo,
                                zero: false,
                            },
                        );
                        push(
                            &mut segs,
                            Segment {
                                offset: a,
                                length: b - a,
                                zero: true,
                            },
                        );
                        push(
                            &mut segs,
                            Segment {
                                offset: b,
                                length: hi - b,
                                zero: false,
                            },
                        );
                        continue;
                    }
                }
                push(
                    &mut segs,
                    Segment {
                        offset: lo,
                        length: hi - lo,
                        zero: false,
                    },
                );
            }
        } else {
            segs.push(Segment {
                offset: self.pos,
                length: len,
                zero: false,
            });
        }
        let covered: u64 = segs.iter().map(|s| s.length).sum();
        if covered != len {
            return Err(Error::Protocol {
                peer: c.peer().to_string(),
                why: format!(
                    "allocation map covers {covered} of {len} bytes at offset {}",
                    self.pos
                ),
            });
        }
        self.pos += len;
        self.todo.extend(segs);
        Ok(())
    }
}

/// Append, merging with the previous segment of the same kind.
fn push(segs: &mut Vec<Segment>, s: Segment) {
    if s.length == 0 {
        return;
    }
    match segs.last_mut() {
        Some(l) if l.zero == s.zero && l.offset + l.length == s.offset => l.length += s.length,
        _ => segs.push(s),
    }
}

/// Stream a raw file or block device through `sink`, skipping its holes (SEEK_DATA/SEEK_HOLE,
/// where the file system supports them). Blocking: call it from a blocking thread.
pub fn copy_from_file(
    path: &Path,
    opts: &ImportOptions,
    sink: ChunkSink<'_>,
    progress: ProgressSink<'_>,
) -> Result<ImportProgress> {
    opts.check()?;
    let f = File::open(path).ctx(|| format!("opening import source {}", path.display()))?;
    let meta = f
        .metadata()
        .ctx(|| format!("reading the size of {}", path.display()))?;
    let size = if meta.file_type().is_block_device() {
        seek(&f, 0, libc::SEEK_END).ctx(|| format!("reading the size of {}", path.display()))?
    } else {
        meta.len()
    };
    let mut out = Emitter::new(size, opts, sink, progress);
    let chunk = opts.chunk_size as u64;
    let mut pos = 0;
    while pos < size {
        let data = match seek(&f, pos, libc::SEEK_DATA) {
            Ok(d) => d.min(size),
            // No data after pos: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => size,
            // No hole support here (some file systems, devices): everything is data.
            Err(e) if unsupported(&e) => pos,
            Err(e) => {
                return Err(Error::io(
                    format!("SEEK_DATA at {pos} in {}", path.display()),
                    e,
                ))
            }
        };
        if data > pos {
            out.zero(pos, data - pos)?;
            pos = data;
            continue;
        }
        let hole = match seek(&f, pos, libc::SEEK_HOLE) {
            Ok(h) => h.min(size),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) || unsupported(&e) => size,
            Err(e) => {
                return Err(Error::io(
                    format!("SEEK_HOLE at {pos} in {}", path.display()),
                    e,
                ))
            }
        };
        // If the file changed under us and the map no longer moves forward, read a chunk anyway.
        let end = if hole > pos {
            hole
        } else {
            (pos + chunk).min(size)
        };
        while pos < end {
            let n = (end - pos).min(chunk);
            let mut buf = vec![0u8; n as usize];
            f.read_exact_at(&mut buf, pos)
                .ctx(|| format!("reading {n} bytes at {pos} from {}", path.display()))?;
            out.data(pos, buf)?;
            pos += n;
        }
    }
    out.finish()
}

fn seek(f: &File, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor we own; it only moves the file position.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
    )
}

/// Cuts data into zero and non-zero runs, hands them to the sink, keeps the progress.
struct Emitter<'a> {
    sink: ChunkSink<'a>,
    progress: ProgressSink<'a>,
    zero_block: u64,
    p: ImportProgress,
}

impl<'a> Emitter<'a> {
    fn new(
        total: u64,
        opts: &ImportOptions,
        sink: ChunkSink<'a>,
        progress: ProgressSink<'a>,
    ) -> Self {
        Emitter {
            sink,
            progress,
            zero_block: opts.zero_block as u64,
            p: ImportProgress {
                total,
                ..Default::default()
            },
        }
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        (self.sink)(ImportChunk::Zero { offset, length })?;
        self.p.zero_bytes += length;
        self.p.done = offset + length;
        (self.progress)(self.p);
        Ok(())
    }

    fn data(&mut self, offset: u64, bytes: Vec<u8>) -> Result<()> {
        let end = offset + bytes.len() as u64;
        // Runs of (start, end, all-zero), cut at absolute multiples of zero_block.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / self.zero_block + 1) * self.zero_block).min(end);
            let z = is_zero(&bytes[(at - offset) as usize..(next - offset) as usize]);
            match runs.last_mut() {
                Some(r) if r.2 == z => r.1 = next,
                _ => runs.push((at, next, z)),
            }
            at = next;
        }
        if let [(_, _, false)] = runs[..] {
            self.p.data_bytes += bytes.len() as u64;
            (self.sink)(ImportChunk::Data { offset, bytes })?;
        } else {
            for (lo, hi, z) in runs {
                if z {
                    (self.sink)(ImportChunk::Zero {
                        offset: lo,
                        length: hi - lo,
                    })?;
                    self.p.zero_bytes += hi - lo;
                } else {
                    let b = bytes[(lo - offset) as usize..(hi - offset) as usize].to_vec();
                    (self.sink)(ImportChunk::Data {
                        offset: lo,
                        bytes: b,
                    })?;
                    self.p.data_bytes += hi - lo;
                }
            }
        }
        self.p.done = end;
        (self.progress)(self.p);
        Ok(())
    }

    fn finish(self) -> Result<ImportProgress> {
        if self.p.done != self.p.total {
            return Err(Error::InvalidArgument(format!(
                "import stopped at {} of {} bytes (the source changed size?)",
                self.p.done, self.p.total
            )));
        }
        Ok(self.p)
    }
}

/// Whether every byte is zero; word-sized compares, which the compiler vectorises.
pub fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(bytes: Vec<u8>, offset: u64, zero_block: usize) -> Vec<ImportChunk> {
        let mut got = Vec::new();
        let mut sink = |c: ImportChunk| {
            got.push(c);
            Ok(())
        };
        let mut prog = |_p: ImportProgress| {};
        let opts = ImportOptions {
            zero_block,
            ..Default::default()
        };
        let total = offset + bytes.len() as u64;
        let mut e = Emitter::new(total, &opts, &mut sink, &mut prog);
        e.p.done = offset;
        e.data(offset, bytes).unwrap();
        got
    }

    #[test]
    fn zero_detection_cuts_at_absolute_block_boundaries() {
        // Data at [4096, 4096+8192+100): first block zero, second has one byte set, tail zero.
        let mut b = vec![0u8; 8192 + 100];
        b[4096 + 7] = 1;
        let got = collect(b.clone(), 4096, 4096);
        assert_eq!(
            got,
            vec![
                ImportChunk::Zero {
                    offset: 4096,
                    length: 4096
                },
                ImportChunk::Data {
                    offset: 8192,
                    bytes: b[4096..8192].to_vec()
                },
                ImportChunk::Zero {
                    offset: 12288,
                    length: 100
                },
            ]
        );
        // Unaligned start: the first partial block is judged on its own.
        let mut b = vec![0u8; 5000];
        b[0] = 9;
        let got = collect(b.clone(), 100, 4096);
        assert_eq!(
            got,
            vec![
                ImportChunk::Data {
                    offset: 100,
                    bytes: b[..3996].to_vec()
                },
                ImportChunk::Zero {
                    offset: 4096,
                    length: 1004
                },
            ]
        );
    }

    #[test]
    fn all_data_passes_the_buffer_through() {
        let b: Vec<u8> = (0..20000u32).map(|i| (i % 251 + 1) as u8).collect();
        assert_eq!(
            collect(b.clone(), 0, 4096),
            vec![ImportChunk::Data {
                offset: 0,
                bytes: b
            }]
        );
    }

    #[test]
    fn is_zero_checks_every_byte() {
        for len in [0, 1, 15, 16, 17, 4096, 4099] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b));
            for i in 0..len {
                b[i] = 1;
                assert!(!is_zero(&b), "len {len} byte {i}");
                b[i] = 0;
            }
        }
    }

    #[test]
    fn file_import_skips_holes_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let f = File::create(&path).unwrap();
        let size = 64u64 << 20;
        f.set_len(size).unwrap();
        let a: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253 + 1) as u8).collect();
        f.write_all_at(&a, 8 << 20).unwrap();
        f.write_all_at(&a[..4096], 40 << 20).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 50 << 20).unwrap(); // allocated, but zero
        f.sync_all().unwrap();
        drop(f);

        let mut image = vec![0u8; size as usize];
        let mut covered = 0u64;
        let mut data = 0u64;
        let mut sink = |c: ImportChunk| {
            match c {
                ImportChunk::Data { offset, bytes } => {
                    assert!(!is_zero(&bytes), "zero data at {offset}");
                    covered += bytes.len() as u64;
                    data += bytes.len() as u64;
                    image[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
                }
                ImportChunk::Zero { length, .. } => covered += length,
            }
            Ok(())
        };
        let mut last = ImportProgress::default();
        let mut prog = |p: ImportProgress| last = p;
        let p = copy_from_file(&path, &ImportOptions::default(), &mut sink, &mut prog).unwrap();
        assert_eq!(covered, size);
        assert_eq!(data, (1 << 20) + 4096);
        assert_eq!(p, last);
        assert_eq!(p.done, size);
        assert_eq!(p.data_bytes + p.zero_bytes, size);
        assert_eq!(&image[8 << 20..9 << 20], &a[..]);
        assert_eq!(&image[40 << 20..(40 << 20) + 4096], &a[..4096]);
    }
}
