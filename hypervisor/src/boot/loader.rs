//! Loads the kernel (ELF vmlinux), the initramfs and the command line into
//! guest memory and writes boot_params, the e820 map, the boot GDT and the
//! identity page tables the 64-bit boot protocol needs.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::*;

/// Errors preparing guest memory for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a loadable x86_64 ELF vmlinux.
    #[error("cannot load kernel {path} (expected an uncompressed x86_64 ELF vmlinux): {source}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit in guest memory above the kernel.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig { path: PathBuf, size: u64 },
    /// The kernel command line is too long or malformed.
    #[error("invalid kernel command line {cmdline:?}: {reason}")]
    Cmdline { cmdline: String, reason: String },
    /// A value does not fit its field of the boot protocol's zero page.
    #[error("boot_params.{field} cannot hold {value:#x}")]
    BootParamsField { field: &'static str, value: u64 },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What to boot.
pub struct BootInputs<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    /// Guest physical address of the ACPI RSDP.
    pub rsdp: GuestAddress,
}

/// Where the kernel starts.
#[derive(Debug, Clone, Copy)]
pub struct LoadedImage {
    pub entry: GuestAddress,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Loads everything the kernel needs into `mem`.
/// The kernel and the initramfs (megabytes each) are copied in parallel:
/// they land in disjoint ranges, checked once both are in.
pub fn load(mem: &GuestMemoryMmap, inputs: &BootInputs) -> Result<LoadedImage, BootError> {
    let (loaded, initrd) = std::thread::scope(|scope| {
        let initrd = inputs
            .initrd
            .map(|path| (path, scope.spawn(move || load_initrd(mem, path))));
        let kernel = load_kernel(mem, inputs.kernel);
        let initrd = initrd.map(|(path, handle)| {
            handle.join().unwrap_or_else(|_| {
                Err(BootError::ReadInitrd {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("initramfs loader panicked"),
                })
            })
        });
        (kernel, initrd.transpose())
    });
    let loaded = loaded?;
    let initrd = initrd?;
    if let (Some((start, size)), Some(path)) = (initrd, inputs.initrd) {
        check_above_kernel(start, size, loaded.kernel_end, path)?;
    }

    let cmdline = build_cmdline(inputs.cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(
        |e| BootError::Cmdline {
            cmdline: inputs.cmdline.to_string(),
            reason: e.to_string(),
        },
    )?;

    write_boot_params(mem, inputs.cmdline.len() + 1, initrd, inputs.rsdp)?;
    write_gdt_and_page_tables(mem)?;
    Ok(LoadedImage {
        entry: loaded.kernel_load,
    })
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<linux_loader::loader::KernelLoaderResult, BootError> {
    let mut kernel = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|source| {
        BootError::LoadKernel {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The initramfs must not overlap the kernel image (which ends at `kernel_end`).
fn check_above_kernel(
    start: GuestAddress,
    size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(), BootError> {
    if start.raw_value() < kernel_end {
        return Err(BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(())
}

fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let err = |reason: String| BootError::Cmdline {
        cmdline: text.to_string(),
        reason,
    };
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| err(e.to_string()))?;
    cmdline.insert_str(text).map_err(|e| err(e.to_string()))?;
    Ok(cmdline)
}

/// End of the RAM region that starts at 0 (the kernel, initrd and boot data
/// all live there).
fn low_ram_end(mem: &GuestMemoryMmap) -> GuestAddress {
    mem.iter()
        .find(|r| r.start_addr() == GuestAddress(0))
        .map(|r| r.start_addr().unchecked_add(r.len()))
        .unwrap_or(GuestAddress(0))
}

/// Puts the initramfs at the top of low RAM, page aligned (whether it clears
/// the kernel is checked by the caller, see [`check_above_kernel`]).
fn load_initrd(mem: &GuestMemoryMmap, path: &Path) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_big = || BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
    };
    let start = low_ram_end(mem)
        .raw_value()
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START)
        .ok_or_else(too_big)?;
    let size_usize = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size_usize)
        .map_err(|source| BootError::GuestMemory {
            what: "initramfs",
            source,
        })?;
    Ok((GuestAddress(start), size))
}

fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, type_| boot_e820_entry {
        addr,
        size: end - addr,
        type_,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(ACPI_START, ACPI_END, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(entry(start, end, E820_RAM));
        }
    }
    map
}

/// `value` as the type of a zero-page field, or the error naming it.
fn field<T, V>(name: &'static str, value: V) -> Result<T, BootError>
where
    V: Copy + TryInto<T> + TryInto<u64>,
{
    value.try_into().map_err(|_| BootError::BootParamsField {
        field: name,
        value: value.try_into().unwrap_or(u64::MAX),
    })
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = field("hdr.cmd_line_ptr", CMDLINE_START)?;
    params.hdr.cmdline_size = field("hdr.cmdline_size", cmdline_size)?;
    if let Some((addr, size)) = initrd {
        // Low RAM ends below 4 GiB, so both fit the 32-bit fields.
        params.hdr.ramdisk_image = field("hdr.ramdisk_image", addr.raw_value())?;
        params.hdr.ramdisk_size = field("hdr.ramdisk_size", size)?;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();
    let map = e820_map(mem);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = field("e820_entries", map.len())?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::GuestMemory {
            what: "boot_params",
            source,
        })
}

/// A GDT descriptor from its flags, base and limit (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub(crate) const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

pub(crate) fn write_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let gm = |what| move |source| BootError::GuestMemory { what, source };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(gm("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(gm("IDT"))?;
    // Identity-map the first GiB with 2 MiB pages: enough for the kernel's
    // own startup code, which builds its real page tables at once.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(gm("PML4"))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(gm("PDPT"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(gm("page directory"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_flat_segments() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn e820_covers_ram_and_reserves_acpi() {
        let mem = crate::memory::create(128).unwrap();
        // boot_e820_entry is packed: copy fields out before comparing.
        let map: Vec<(u64, u64, u32)> = e820_map(&mem)
            .iter()
            .map(|e| (e.addr, e.size, e.type_))
            .collect();
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1], (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED));
        assert_eq!(map[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn missing_kernel_is_named() {
        let mem = crate::memory::create(64).unwrap();
        let inputs = BootInputs {
            kernel: Path::new("/nonexistent/vmlinux"),
            initrd: None,
            cmdline: "console=ttyS0",
            rsdp: GuestAddress(ACPI_START),
        };
        let err = load(&mem, &inputs).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn non_elf_kernel_is_rejected() {
        let path = std::env::temp_dir().join(format!("husk-notelf-{}", std::process::id()));
        std::fs::write(&path, b"MZ this is not an ELF file at all, just bytes").unwrap();
        let mem = crate::memory::create(64).unwrap();
        let inputs = BootInputs {
            kernel: &path,
            initrd: None,
            cmdline: "console=ttyS0",
            rsdp: GuestAddress(ACPI_START),
        };
        let err = load(&mem, &inputs).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            build_cmdline(&long),
            Err(BootError::Cmdline { .. })
        ));
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let path = std::env::temp_dir().join(format!("husk-initrd-{}", std::process::id()));
        std::fs::write(&path, vec![0x5a; 10_000]).unwrap();
        let mem = crate::memory::create(64).unwrap();
        let (addr, size) = load_initrd(&mem, &path).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr.raw_value() % 4096, 0);
        assert!(addr.raw_value() + size <= 64 << 20);
        assert_eq!(mem.read_obj::<u8>(addr).unwrap(), 0x5a);
        // Does not fit above a kernel that ends near the top of memory.
        assert!(check_above_kernel(addr, size, (64 << 20) - 4096, &path).is_err());
        assert!(check_above_kernel(addr, size, 0x200_0000, &path).is_ok());
        std::fs::remove_file(&path).unwrap();
    }
}
