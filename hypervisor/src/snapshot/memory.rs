//! Guest memory in a snapshot: written once as a sparse file (pages the
//! guest never wrote stay holes), mapped `MAP_PRIVATE` by every restore so
//! restored VMs share each page they have not written through the host's
//! page cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::SnapshotError;

const PAGE: usize = 4096;

/// Where one guest RAM region lies in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes every region of `mem` to `path`, one after the other; pages that
/// are all zeros are left as holes. The guest must not run meanwhile.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<Vec<MemoryRegion>, SnapshotError> {
    let file = File::create(path).map_err(io(path))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(|_| {
            SnapshotError::Layout("a guest memory region is larger than the address space".into())
        })?;
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem`; the VM's vCPUs are parked and its device workers stopped,
        // so nothing writes it while this slice is read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        write_sparse(&file, bytes, offset).map_err(io(path))?;
        regions.push(MemoryRegion {
            guest_addr: region.start_addr().raw_value(),
            len: region.len(),
            file_offset: offset,
        });
        offset += region.len();
    }
    file.set_len(offset).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok(regions)
}

/// Writes the runs of non-zero pages of `bytes` at `base` in `file`.
fn write_sparse(file: &File, bytes: &[u8], base: u64) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    let pages = bytes.len().div_ceil(PAGE);
    for page in 0..=pages {
        let data =
            (page < pages).then(|| &bytes[page * PAGE..((page + 1) * PAGE).min(bytes.len())]);
        let nonzero = data.is_some_and(|d| d.iter().any(|&b| b != 0));
        match (nonzero, run_start) {
            (true, None) => run_start = Some(page * PAGE),
            (false, Some(start)) => {
                let end = (page * PAGE).min(bytes.len());
                file.write_all_at(&bytes[start..end], base + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Maps the memory file at `path` as guest memory laid out as `expected`
/// (the ranges this VM's size gives); the snapshot's regions must be
/// exactly those and the file must hold them all.
pub fn map(
    path: &Path,
    saved: &[MemoryRegion],
    expected: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, SnapshotError> {
    let matches = saved.len() == expected.len()
        && saved
            .iter()
            .zip(expected)
            .all(|(s, (addr, len))| s.guest_addr == addr.raw_value() && s.len == *len as u64);
    if !matches {
        return Err(SnapshotError::Layout(format!(
            "memory regions {saved:?} in the snapshot, {expected:?} for this VM"
        )));
    }
    let file = File::open(path).map_err(io(path))?;
    let file_len = file.metadata().map_err(io(path))?.len();
    let mut regions = Vec::with_capacity(saved.len());
    for region in saved {
        let end = region.file_offset.checked_add(region.len);
        if end.is_none_or(|end| end > file_len) {
            return Err(SnapshotError::Layout(format!(
                "the memory file {} is {file_len} bytes, too short for region {region:?}",
                path.display()
            )));
        }
        let len = usize::try_from(region.len)
            .map_err(|_| SnapshotError::Layout(format!("region {region:?} is too large")))?;
        let fd = file.try_clone().map_err(io(path))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, region.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            // Private: the guest's writes stay its own; unwritten pages
            // are the page cache's, shared with every other restore.
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Layout(format!("cannot map {}: {e}", path.display())))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr))
            .ok_or_else(|| SnapshotError::Layout(format!("region {region:?} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotError::Layout(format!("guest memory regions: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_round_trips_through_a_sparse_file() {
        let ranges = [
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 64 << 10),
        ];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        mem.write_slice(b"first page", GuestAddress(10)).unwrap();
        mem.write_slice(b"later", GuestAddress(200 * 4096 + 4090))
            .unwrap();
        mem.write_slice(b"second region", GuestAddress((4 << 20) + 5))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let saved = save(&mem, &path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), (1 << 20) + (64 << 10));
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 << 10,
            "holes stay holes: {} blocks",
            meta.blocks()
        );

        let restored = map(&path, &saved, &ranges).unwrap();
        let mut buf = [0u8; 13];
        restored
            .read_slice(&mut buf[..10], GuestAddress(10))
            .unwrap();
        assert_eq!(&buf[..10], b"first page");
        restored
            .read_slice(&mut buf[..5], GuestAddress(200 * 4096 + 4090))
            .unwrap();
        assert_eq!(&buf[..5], b"later");
        restored
            .read_slice(&mut buf, GuestAddress((4 << 20) + 5))
            .unwrap();
        assert_eq!(&buf, b"second region");
        // Private: a restored guest's writes do not reach the file.
        restored.write_slice(b"mine", GuestAddress(10)).unwrap();
        let again = map(&path, &saved, &ranges).unwrap();
        again.read_slice(&mut buf[..4], GuestAddress(10)).unwrap();
        assert_eq!(&buf[..4], b"firs");
    }

    #[test]
    fn a_layout_or_file_that_does_not_fit_is_refused() {
        let ranges = [(GuestAddress(0), 1 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let saved = save(&mem, &path).unwrap();
        let other = [(GuestAddress(0), 2 << 20)];
        assert!(map(&path, &saved, &other)
            .unwrap_err()
            .to_string()
            .contains("regions"));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(4096).unwrap();
        assert!(map(&path, &saved, &ranges)
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }
}
