//! The guest physical address map (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT, IDT                      (boot only)
//! 0x0000_7000  boot_params ("zero page")
//! 0x0000_9000  identity page tables           (boot only; PML4, PDPT, PD)
//! 0x0002_0000  kernel command line
//! 0x000e_0000  ACPI tables (RSDP first)       reserved, not RAM in e820
//! 0x000f_f000  VM generation ID (16 bytes)    reserved, inside the ACPI area
//! 0x0010_0000  RAM (kernel loads at 16 MiB), initrd at the top of low RAM
//! 0xc000_0000  MMIO gap: virtio-mmio devices from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

/// GDT used to enter 64-bit mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// Stack pointer handed to the kernel at entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The Linux boot_params structure.
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line and its maximum size (COMMAND_LINE_SIZE on x86).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of conventional memory below the EBDA: e820 RAM stops here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, which the e820 map leaves out of RAM.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// The 16-byte VM generation ID the DSDT's VGEN device points the guest at
/// (8-byte aligned, as the spec asks); the tables end below it.
pub const VMGENID_START: u64 = 0xff000;
pub const VMGENID_LEN: usize = 16;
/// First byte of RAM above the legacy hole.
pub const HIMEM_START: u64 = 0x100000;

/// The 32-bit MMIO gap: no RAM between these addresses.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_MMIO_MAX_DEVICES: u64 = 64;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// TSS area KVM needs on Intel hosts without unrestricted guest (3 pages).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// GSIs handed to devices. 0-15 stay clear of legacy lines we describe
/// (COM1 uses 4); virtio devices get 5..=22; the IOAPIC's last pin (23) is
/// the generic event device's, which tells the guest its generation ID
/// changed.
pub const SERIAL_GSI: u32 = 4;
pub const FIRST_DEVICE_GSI: u32 = 5;
pub const LAST_DEVICE_GSI: u32 = 22;
pub const GED_GSI: u32 = 23;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_LEN: u16 = 8;
/// i8042 controller: the guest resets the machine by writing 0xfe to 0x64.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// Reduced-hardware ACPI sleep control/status and reset registers.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_PORTS_LEN: u16 = 3;
/// Value the guest writes to the ACPI reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;
