//! `DataDir`: the directory that holds a site's volumes (`<root>/volumes/<name>/…`), name and
//! geometry validation, and the lock that makes one process its owner at a time.

use crate::error::{Error, IoContext, Result};
use crate::size::format_size;
use crate::volume::{Volume, VolumeInfo, BLOCK_SIZE};
use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const VOLUMES: &str = "volumes";
const LOCK_FILE: &str = "lock";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const MIN_GRANULARITY: u64 = 4096;
pub const MAX_GRANULARITY: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// Exclusive ownership of a data directory, released on drop (or when the process dies).
pub struct DirLock {
    _file: File,
}

impl DataDir {
    /// Open `root`, creating it if missing, and check that it is writable.
    pub fn open(root: &Path) -> Result<DataDir> {
        let bad = |why: String| Error::DataDir {
            dir: root.to_path_buf(),
            why,
        };
        std::fs::create_dir_all(root.join(VOLUMES)).map_err(|e| {
            bad(format!(
                "cannot create it ({e}); pass --data with a writable directory"
            ))
        })?;
        let probe = root.join(format!(".probe-{}", std::process::id()));
        File::create(&probe)
            .and_then(|mut f| f.write_all(b"ok"))
            .map_err(|e| {
                bad(format!(
                    "not writable ({e}); fix its permissions or pass another --data"
                ))
            })?;
        let _ = std::fs::remove_file(&probe);
        let root = root.canonicalize().map_err(|e| bad(e.to_string()))?;
        Ok(DataDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn control_socket(&self) -> PathBuf {
        self.root.join(CONTROL_SOCKET)
    }

    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.root.join(VOLUMES).join(name)
    }

    /// Take the directory's lock without waiting. `Ok(None)` when another process holds it.
    pub fn try_lock(&self) -> Result<Option<DirLock>> {
        let path = self.root.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(Error::io(format!("cannot lock {}", path.display()), err));
        }
        let _ = file.set_len(0);
        let _ = (&file).write_all(format!("{}\n", std::process::id()).as_bytes());
        Ok(Some(DirLock { _file: file }))
    }

    /// The error for "someone else holds the lock", naming the holder's pid when known.
    pub fn busy(&self, hint: &str) -> Error {
        Error::DataDirBusy {
            dir: self.root.clone(),
            holder: self
                .lock_holder()
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default(),
            hint: hint.to_string(),
        }
    }

    /// The pid written by the current lock holder, for error messages.
    pub fn lock_holder(&self) -> Option<u32> {
        std::fs::read_to_string(self.root.join(LOCK_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn validate_name(name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if ok {
            Ok(())
        } else {
            Err(Error::BadName(name.to_string()))
        }
    }

    pub fn validate_geometry(size: u64, granularity: u64) -> Result<()> {
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
            return Err(Error::BadSize {
                input: size.to_string(),
                why: "a volume size must be a positive multiple of 4096 (4K), e.g. 1G".into(),
            });
        }
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(Error::BadSize {
                input: granularity.to_string(),
                why: format!(
                    "granularity must be a power of two between {} and {}, e.g. 64K",
                    format_size(MIN_GRANULARITY),
                    format_size(MAX_GRANULARITY)
                ),
            });
        }
        Ok(())
    }

    pub fn exists(&self, name: &str) -> bool {
        self.volume_dir(name).is_dir()
    }

    pub fn create_volume(&self, name: &str, size: u64, granularity: u64) -> Result<()> {
        Self::validate_name(name)?;
        Self::validate_geometry(size, granularity)?;
        if self.exists(name) {
            return Err(Error::VolumeExists {
                name: name.to_string(),
                dir: self.root.clone(),
            });
        }
        Volume::create(&self.volume_dir(name), name, size, granularity)
    }

    pub fn open_volume(&self, name: &str) -> Result<Volume> {
        Self::validate_name(name)?;
        if !self.exists(name) {
            return Err(Error::UnknownVolume {
                name: name.to_string(),
                dir: self.root.clone(),
            });
        }
        Volume::open(&self.volume_dir(name), name)
    }

    /// Open a volume whose interrupted group commit to `(epoch, target)` must be finished.
    pub fn open_volume_committing(&self, name: &str, commit: (u64, u64)) -> Result<Volume> {
        Self::validate_name(name)?;
        Volume::open_with(&self.volume_dir(name), name, Some(commit))
    }

    /// A hidden directory next to the volumes to build volume `name` in before it is moved into
    /// place (`move_into_place`): never listed, never opened as a volume, so a crash midway
    /// leaves no half-made volume. A stale one is removed by the next build of the same name.
    pub fn staging_dir(&self, name: &str, what: &str) -> PathBuf {
        self.root.join(VOLUMES).join(format!(".{what}-{name}"))
    }

    /// Rename a volume built under `staged` to `name` (which must not exist), durably.
    pub fn move_into_place(&self, staged: &Path, name: &str) -> Result<()> {
        let to = self.volume_dir(name);
        std::fs::rename(staged, &to)
            .ctx(|| format!("cannot move {} to {}", staged.display(), to.display()))?;
        let parent = self.root.join(VOLUMES);
        File::open(&parent)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("cannot fsync {}", parent.display()))
    }

    /// Names of the volumes present, sorted.
    pub fn volume_names(&self) -> Result<Vec<String>> {
        let dir = self.root.join(VOLUMES);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).ctx(|| format!("cannot list {}", dir.display()))? {
            let entry = entry.ctx(|| format!("cannot list {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && Self::validate_name(&name).is_ok() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn delete_volume(&self, name: &str) -> Result<()> {
        Self::validate_name(name)?;
        let dir = self.volume_dir(name);
        if !dir.is_dir() {
            return Err(Error::UnknownVolume {
                name: name.to_string(),
                dir: self.root.clone(),
            });
        }
        // Rename first so a crash mid-delete never leaves a half-deleted volume that looks whole.
        let doomed = self.root.join(VOLUMES).join(format!(".deleting-{name}"));
        let _ = std::fs::remove_dir_all(&doomed);
        std::fs::rename(&dir, &doomed).ctx(|| format!("cannot delete {}", dir.display()))?;
        std::fs::remove_dir_all(&doomed).ctx(|| format!("cannot remove {}", doomed.display()))
    }

    /// Open every volume, read its info, close it cleanly (offline listing).
    pub fn list_offline(&self) -> Result<Vec<VolumeInfo>> {
        self.volume_names()?
            .iter()
            .map(|n| {
                let v = self.open_volume(n)?;
                let info = v.info();
                v.close()?;
                Ok(info)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names_and_geometry() {
        for bad in ["", ".x", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(
                DataDir::validate_name(bad).unwrap_err().code(),
                "ERR_BAD_NAME",
                "{bad}"
            );
        }
        DataDir::validate_name("db-1.data_2").unwrap();
        assert_eq!(
            DataDir::validate_geometry(4095, 65536).unwrap_err().code(),
            "ERR_BAD_SIZE"
        );
        assert_eq!(
            DataDir::validate_geometry(4096, 3000).unwrap_err().code(),
            "ERR_BAD_SIZE"
        );
        DataDir::validate_geometry(4096, 4096).unwrap();
    }

    #[test]
    fn create_list_delete_and_lock() {
        let t = tempfile::tempdir().unwrap();
        let dd = DataDir::open(&t.path().join("d")).unwrap();
        dd.create_volume("a", 1 << 20, 65536).unwrap();
        assert_eq!(
            dd.create_volume("a", 1 << 20, 65536).unwrap_err().code(),
            "ERR_VOLUME_EXISTS"
        );
        assert_eq!(dd.list_offline().unwrap()[0].name, "a");
        let l = dd.try_lock().unwrap().unwrap();
        assert!(dd.try_lock().unwrap().is_none(), "second lock must fail");
        assert_eq!(dd.lock_holder(), Some(std::process::id()));
        drop(l);
        assert!(dd.try_lock().unwrap().is_some());
        dd.delete_volume("a").unwrap();
        assert_eq!(
            dd.delete_volume("a").unwrap_err().code(),
            "ERR_UNKNOWN_VOLUME"
        );
        assert!(dd.volume_names().unwrap().is_empty());
    }

    #[test]
    fn unwritable_dir_is_a_clear_error() {
        let e = DataDir::open(Path::new("/proc/ferry-test")).unwrap_err();
        assert_eq!(e.code(), "ERR_DATA_DIR");
        assert!(e.to_string().contains("/proc/ferry-test"));
    }
}
