//! Importing an existing disk into a new Ferry volume (`ferry volume import`): size the volume
//! from the source, create it, and copy the source's data through the volume's normal write path
//! (so changed-block tracking sees it). Holes and zero runs are skipped: a new volume reads as
//! zeroes already. Reading the source is `import.rs`'s job; this module only decides where the
//! chunks go.

use crate::control::Progress;
use crate::data_dir::DataDir;
use crate::error::{Error, Result};
use crate::import::{copy_from_client, copy_from_file, ImportChunk, ImportOptions};
use crate::nbd::client::{connect, NbdClient};
use crate::nbd::proto;
use crate::registry::Registry;
use crate::size::format_size;
use crate::volume::{Volume, VolumeInfo, BLOCK_SIZE, DEFAULT_GRANULARITY};
use std::path::Path;
use std::sync::Arc;

enum Source {
    Nbd(NbdClient),
    File(std::path::PathBuf),
}

fn is_uri(s: &str) -> bool {
    s.starts_with("nbd://")
        || s.starts_with("nbd+unix://")
        || s.starts_with("nbds://")
        || s.starts_with("nbds+unix://")
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.block_on(f),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f),
    }
}

fn open_source(name: &str, source: &str) -> Result<(Source, u64)> {
    if is_uri(source) {
        let client = block_on(connect(source, &[proto::META_BASE_ALLOCATION]))?;
        let size = client.size();
        return Ok((Source::Nbd(client), size));
    }
    let path = Path::new(source);
    let meta = std::fs::metadata(path).map_err(|e| Error::Import {
        name: name.to_string(),
        source_desc: source.to_string(),
        why: format!("{e}; give an existing raw image file or an nbd:// / nbd+unix:// URI"),
    })?;
    if meta.is_dir() {
        return Err(Error::Import {
            name: name.to_string(),
            source_desc: source.to_string(),
            why: "is a directory; give a raw image file or an nbd:// URI".into(),
        });
    }
    let size = if meta.len() == 0 {
        std::fs::File::open(path)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .unwrap_or(0)
    } else {
        meta.len()
    };
    Ok((Source::File(path.to_path_buf()), size))
}

/// The volume size: `--size` if given (at least the source's), else the source's size rounded up
/// to the 4 KiB block size.
fn volume_size(name: &str, source: &str, source_size: u64, size: Option<u64>) -> Result<u64> {
    let err = |why: String| Error::Import {
        name: name.to_string(),
        source_desc: source.to_string(),
        why,
    };
    if source_size == 0 {
        return Err(err("the source is empty (0 bytes)".into()));
    }
    match size {
        Some(s) if s < source_size => Err(err(format!(
            "--size {} is smaller than the source ({} bytes); omit --size or give at least {}",
            format_size(s),
            source_size,
            format_size(source_size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE)
        ))),
        Some(s) => Ok(s),
        None => Ok(source_size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE),
    }
}

fn copy(
    src: Source,
    vol: &Volume,
    source_desc: &str,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<()> {
    let opts = ImportOptions::default();
    let mut sink = |c: ImportChunk| -> Result<()> {
        match c {
            ImportChunk::Data { offset, bytes } => vol.write_at(offset, &bytes, false),
            // A new volume is one hole: zero runs need no I/O.
            ImportChunk::Zero { .. } => Ok(()),
        }
    };
    let mut report = |p: crate::import::ImportProgress| {
        progress(Progress {
            done: p.done,
            total: p.total,
        })
    };
    let r = match src {
        Source::Nbd(client) => block_on(async {
            let copied = copy_from_client(&client, &opts, &mut sink, &mut report).await;
            let closed = client.disconnect().await;
            copied.and(closed)
        }),
        Source::File(path) => copy_from_file(&path, &opts, &mut sink, &mut report).map(|_| ()),
    };
    r.map_err(|e| match e {
        Error::Import { .. } => e,
        other => Error::Import {
            name: vol.name().to_string(),
            source_desc: source_desc.to_string(),
            why: other.to_string(),
        },
    })?;
    vol.flush()
}

/// Size, create, copy; on failure `discard` removes the half-made volume so nothing half-imported
/// stays behind.
fn run_import(
    name: &str,
    source: &str,
    size: Option<u64>,
    progress: &(dyn Fn(Progress) + Sync),
    create: impl FnOnce(u64) -> Result<Arc<Volume>>,
    discard: impl FnOnce(),
) -> Result<Arc<Volume>> {
    let (src, source_size) = open_source(name, source)?;
    let vol = create(volume_size(name, source, source_size, size)?)?;
    match copy(src, &vol, source, progress) {
        Ok(()) => Ok(vol),
        Err(e) => {
            drop(vol);
            discard();
            Err(e)
        }
    }
}

/// Offline import (the caller holds the data directory's lock).
pub fn import(
    dir: &DataDir,
    name: &str,
    source: &str,
    size: Option<u64>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<VolumeInfo> {
    DataDir::validate_name(name)?;
    if dir.exists(name) {
        return Err(Error::VolumeExists {
            name: name.to_string(),
            dir: dir.root().to_path_buf(),
        });
    }
    let create = |vsize| {
        dir.create_volume(name, vsize, DEFAULT_GRANULARITY)?;
        Ok(Arc::new(dir.open_volume(name)?))
    };
    let vol = run_import(name, source, size, progress, create, || {
        let _ = dir.delete_volume(name);
    })?;
    vol.close()?;
    Ok(vol.info())
}

/// Import into a running service: the new volume is registered (and servable) once created.
pub fn import_registered(
    reg: &Registry,
    name: &str,
    source: &str,
    size: Option<u64>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<VolumeInfo> {
    DataDir::validate_name(name)?;
    if reg.get(name).is_some() || reg.data_dir().exists(name) {
        return Err(Error::VolumeExists {
            name: name.to_string(),
            dir: reg.data_dir().root().to_path_buf(),
        });
    }
    let create = |vsize| {
        reg.create(name, vsize, DEFAULT_GRANULARITY)?;
        reg.require(name)
    };
    let vol = run_import(name, source, size, progress, create, || {
        let _ = reg.delete(name);
    })?;
    Ok(vol.info())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_source() {
        assert_eq!(volume_size("v", "s", 5000, None).unwrap(), 8192);
        assert_eq!(volume_size("v", "s", 8192, Some(1 << 20)).unwrap(), 1 << 20);
        let e = volume_size("v", "s", 8192, Some(4096)).unwrap_err();
        assert_eq!(e.code(), "ERR_IMPORT");
        assert!(e.to_string().contains("smaller than the source"), "{e}");
    }

    #[test]
    fn imports_a_sparse_file_offline() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 70000], 3 << 20).unwrap();
        let dd = DataDir::open(&t.path().join("d")).unwrap();
        let _l = dd.try_lock().unwrap().unwrap();
        let info = import(&dd, "v", src.to_str().unwrap(), None, &|_| {}).unwrap();
        assert_eq!(info.size, 8 << 20);
        let v = dd.open_volume("v").unwrap();
        let mut buf = vec![0u8; 70000];
        v.read_at(3 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x5a));
        // Only the data was written: the dirty map covers it and nothing else.
        let dirty: u64 = v.dirty_extents().iter().map(|e| e.length).sum();
        assert_eq!(dirty, 2 * 65536);
        let e = import(&dd, "v", src.to_str().unwrap(), None, &|_| {}).unwrap_err();
        assert_eq!(e.code(), "ERR_VOLUME_EXISTS");
        let e = import(&dd, "w", "/nonexistent.raw", None, &|_| {}).unwrap_err();
        assert_eq!(e.code(), "ERR_IMPORT");
        assert!(!dd.exists("w"));
    }
}
