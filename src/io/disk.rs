//! Opening aggregate members: block devices or plain files, with O_DIRECT, and the checks that
//! keep an operator from formatting a disk that is in use.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a member cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: is neither a block device nor a regular file")]
    NotADisk { path: PathBuf },
    #[error("{path}: is mounted at {mountpoint}")]
    Mounted { path: PathBuf, mountpoint: String },
    #[error("{path}: is held by {holders} (device mapper, md or another stacking driver)")]
    Held { path: PathBuf, holders: String },
    #[error("{path}: {size} bytes is too small: a member needs at least {need} bytes")]
    TooSmall { path: PathBuf, size: u64, need: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// An open member.
#[derive(Debug)]
pub struct MemberFile {
    /// The path as configured.
    pub path: PathBuf,
    /// Open read-write.
    pub file: File,
    /// Size in bytes.
    pub size_bytes: u64,
    /// True when opened with O_DIRECT (false only for files on filesystems that refuse it).
    pub direct: bool,
    /// Logical block size: the alignment O_DIRECT needs.
    pub logical_block_bytes: u64,
    /// True for a block device, false for a regular file.
    pub is_block_device: bool,
}

/// Open a member read-write with O_DIRECT; a regular file on a filesystem that refuses O_DIRECT
/// (tmpfs) is opened buffered, and `direct` says so.
pub fn open_member(path: &Path) -> Result<MemberFile, DiskError> {
    let meta = std::fs::metadata(path).map_err(|source| DiskError::Open {
        path: path.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    if !ft.is_block_device() && !ft.is_file() {
        return Err(DiskError::NotADisk {
            path: path.to_owned(),
        });
    }
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    let (mut file, direct) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && ft.is_file() => (
            open(false).map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?,
            false,
        ),
        Err(source) => {
            return Err(DiskError::Open {
                path: path.to_owned(),
                source,
            })
        }
    };
    let size_bytes = file
        .seek(SeekFrom::End(0))
        .map_err(|source| DiskError::Io {
            path: path.to_owned(),
            source,
        })?;
    let logical_block_bytes = if ft.is_block_device() {
        let rdev = meta.rdev();
        let sys = format!(
            "/sys/dev/block/{}:{}/queue/logical_block_size",
            libc::major(rdev),
            libc::minor(rdev)
        );
        std::fs::read_to_string(&sys)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512)
    } else {
        512
    };
    Ok(MemberFile {
        path: path.to_owned(),
        file,
        size_bytes,
        direct,
        logical_block_bytes,
        is_block_device: ft.is_block_device(),
    })
}

/// Refuse a block device that is mounted or held by a stacking driver. Regular files pass.
pub fn check_not_in_use(path: &Path) -> Result<(), DiskError> {
    let meta = std::fs::metadata(path).map_err(|source| DiskError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    let (maj, min) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| DiskError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    if let Some(mp) = mounted_at(&mountinfo, maj, min) {
        return Err(DiskError::Mounted {
            path: path.to_owned(),
            mountpoint: mp,
        });
    }
    let holders_dir = format!("/sys/dev/block/{maj}:{min}/holders");
    if let Ok(rd) = std::fs::read_dir(&holders_dir) {
        let holders: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !holders.is_empty() {
            return Err(DiskError::Held {
                path: path.to_owned(),
                holders: holders.join(", "),
            });
        }
    }
    // Partitions of a whole disk that are mounted count too.
    let parts_dir = format!("/sys/dev/block/{maj}:{min}");
    if let Ok(rd) = std::fs::read_dir(&parts_dir) {
        for e in rd.filter_map(|e| e.ok()) {
            let dev = e.path().join("dev");
            if let Ok(s) = std::fs::read_to_string(&dev) {
                if let Some((a, b)) = s.trim().split_once(':') {
                    if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                        if let Some(mp) = mounted_at(&mountinfo, a, b) {
                            return Err(DiskError::Mounted {
                                path: path.to_owned(),
                                mountpoint: format!(
                                    "{mp} (partition {})",
                                    e.file_name().to_string_lossy()
                                ),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The mount point of device `maj:min` in a mountinfo text, if it is mounted.
fn mounted_at(mountinfo: &str, maj: u32, min: u32) -> Option<String> {
    let want = format!("{maj}:{min}");
    mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 4 && f[2] == want).then(|| f[4].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing() {
        let mi = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                  30 22 7:3 / /mnt/x rw shared:2 - ext4 /dev/loop3 rw\n";
        assert_eq!(mounted_at(mi, 7, 3).as_deref(), Some("/mnt/x"));
        assert_eq!(mounted_at(mi, 254, 0).as_deref(), Some("/"));
        assert_eq!(mounted_at(mi, 7, 4), None);
    }

    #[test]
    fn regular_file_member() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = dir.path().join("m0");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let m = open_member(&p).unwrap();
        assert_eq!(m.size_bytes, 1 << 20);
        assert!(!m.is_block_device);
        check_not_in_use(&p).unwrap();
        let e = open_member(dir.path()).unwrap_err();
        assert!(e.to_string().contains("neither a block device"), "{e}");
        let e = open_member(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
}
