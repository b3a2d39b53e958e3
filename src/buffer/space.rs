//! Free space on data_dir's filesystem. A failed write ends the process (see [`Failure`]), so the
//! buffer must never reach one through a full disk: below `buffer.min_free_disk` it stops growing
//! and `when_full` applies as if `max_bytes` had been reached (at its current size, but never
//! below a few commits' working room), until the space returns. Below half
//! the reserve nothing more is written, whatever the policy: sled does not promise to reuse the
//! space of evicted records before its file grows (measured: 6 MB written in 130 ms under
//! `drop_oldest` on a 32 MB tmpfs).

use super::*;

/// What the disk allows the buffer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DiskRoom {
    Plenty,
    /// Below the reserve: the buffer may store at most this many bytes.
    HoldAt(u64),
    /// Below half the reserve: write nothing, evict nothing.
    Critical,
}

/// The least the buffer is held to while the disk is low: room for a few group commits, so that
/// records still pass through to a reachable Kafka (sled reuses the space of delivered ones)
/// even when the disk ran low while the buffer was empty.
const WORKING_ROOM: u64 = 4 * COMMIT_MAX_BYTES as u64;

pub(super) struct DiskSpace {
    dir: PathBuf,
    min_free: u64,
    /// The stored bytes the buffer is held to while the disk is low; `None` while there is room.
    cap: Mutex<Option<u64>>,
}

impl DiskSpace {
    pub(super) fn new(dir: &Path, config: &BufferConfig) -> DiskSpace {
        let mut min_free = config.min_free_disk.as_u64();
        // A reserve near the filesystem's size would hold the buffer from the start, for good.
        if let Ok((_, size)) = free_and_size(dir) {
            if min_free > size / 4 {
                tracing::warn!(
                    min_free_disk = min_free,
                    filesystem_bytes = size,
                    "buffer.min_free_disk is over a quarter of data_dir's filesystem; a quarter is used"
                );
                min_free = size / 4;
            }
        }
        DiskSpace {
            dir: dir.to_owned(),
            min_free,
            cap: Mutex::new(None),
        }
    }

    /// What the disk allows the buffer, which stores `stored` bytes now. When free space first
    /// falls below the reserve, the buffer is held to what it stores; deliveries then make room
    /// inside that, where sled reuses its freed pages. Asked before every commit (a `statvfs`,
    /// about a microsecond) and by housekeeping.
    pub(super) fn room(&self, stored: u64, metrics: &Metrics) -> DiskRoom {
        if self.min_free == 0 {
            return DiskRoom::Plenty;
        }
        let mut cap = self.cap.lock().unwrap_or_else(|p| p.into_inner());
        let free = match free_and_size(&self.dir) {
            Ok((free, _)) => free,
            // Without an answer, keep the last decision; the write itself still fails safely.
            Err(e) => {
                tracing::debug!(error = %e, "statvfs of data_dir failed");
                return cap.map_or(DiskRoom::Plenty, DiskRoom::HoldAt);
            }
        };
        metrics
            .buffer_disk_free_bytes
            .set(i64::try_from(free).unwrap_or(i64::MAX));
        // Room again only a quarter above the reserve, so a disk hovering at it does not flap.
        let recovered = free >= self.min_free + self.min_free / 4;
        *cap = match *cap {
            None if free < self.min_free => {
                tracing::error!(free_bytes = free, min_free_disk = self.min_free,
                    "data_dir's disk is nearly full; the buffer stops growing and buffer.when_full applies until space returns");
                Some(stored.max(WORKING_ROOM))
            }
            Some(_) if recovered => {
                tracing::info!(free_bytes = free, "data_dir's disk has room again");
                None
            }
            cap => cap,
        };
        match *cap {
            None => DiskRoom::Plenty,
            Some(_) if free < self.min_free / 2 => DiskRoom::Critical,
            Some(held) => DiskRoom::HoldAt(held),
        }
    }
}

/// Bytes an unprivileged process may still write on `dir`'s filesystem, and its size.
fn free_and_size(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs only writes into the zeroed struct we own; `path` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // u32 fields on 32-bit ARM
    let bytes = |blocks| u64::from(blocks).saturating_mul(u64::from(st.f_frsize));
    Ok((bytes(st.f_bavail), bytes(st.f_blocks)))
}
