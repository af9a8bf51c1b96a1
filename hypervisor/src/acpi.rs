//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT and a
//! DSDT that describes COM1, every virtio-mmio device, the VM generation ID
//! (with the generic event device that announces a new one) and the \_S5
//! sleep state (so a guest poweroff reaches the VMM through the sleep
//! control register). Built with the `acpi_tables` crate.
//!
//! Hardware-reduced ACPI drops the legacy PIC: an interrupt line is only
//! mapped for devices the DSDT describes, so every device with an interrupt
//! must appear here.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"HUSK  ";
const OEM_TABLE_ID: [u8; 8] = *b"HUSKVMM ";
const OEM_REVISION: u32 = 1;
/// SLP_TYPx value for S5 in \_S5; the guest writes it to the sleep control
/// register together with SLP_EN.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area of the memory map.
    #[error("ACPI tables need {0} bytes, more than the reserved area")]
    TooBig(u64),
    /// Writing to guest memory failed.
    #[error("cannot write ACPI tables into guest memory: {0}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT describes it: its window sits in the
/// 32-bit MMIO gap.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceAcpi {
    pub base: u32,
    pub len: u32,
    pub gsi: u32,
}

// The MADT's and the DSDT's fields for these are narrower than layout.rs's
// constants; the asserts check at compile time that the values fit, so the
// `as` cannot truncate.
#[allow(clippy::cast_possible_truncation)]
const LAPIC_ADDRESS: u32 = {
    assert!(LAPIC_START <= u32::MAX as u64);
    LAPIC_START as u32
};
#[allow(clippy::cast_possible_truncation)]
const IOAPIC_ADDRESS: u32 = {
    assert!(IOAPIC_START <= u32::MAX as u64);
    IOAPIC_START as u32
};
#[allow(clippy::cast_possible_truncation)]
const COM1_IO_LEN: u8 = {
    assert!(COM1_PORT_LEN <= u8::MAX as u16);
    COM1_PORT_LEN as u8
};

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT's AML body.
fn dsdt_body(devices: &[MmioDeviceAcpi]) -> Vec<u8> {
    let mut body = Vec::new();

    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_IO_LEN);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_fields = [
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &com1_crs),
    ];
    let com1 = aml::Device::new(
        "_SB_.COM1".into(),
        com1_fields.iter().map(|f| f as &dyn Aml).collect(),
    );
    com1.to_aml_bytes(&mut body);

    for (uid, dev) in (0u32..).zip(devices) {
        let name = format!("_SB_.V{uid:03X}");
        let mem = aml::Memory32Fixed::new(true, dev.base, dev.len);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let fields = [
            aml::Name::new("_HID".into(), &"LNRO0005"),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new("_CRS".into(), &crs),
        ];
        let device = aml::Device::new(
            name.as_str().into(),
            fields.iter().map(|f| f as &dyn Aml).collect(),
        );
        device.to_aml_bytes(&mut body);
    }

    vmgenid_aml(&mut body);

    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body
}

#[allow(clippy::cast_possible_truncation)]
const VMGENID_ADDRESS_LOW: u32 = {
    assert!(VMGENID_START <= u32::MAX as u64 && VMGENID_START % 8 == 0);
    VMGENID_START as u32
};
#[allow(clippy::cast_possible_truncation)]
const GED_GSI_BYTE: u8 = {
    assert!(GED_GSI <= u8::MAX as u32);
    GED_GSI as u8
};

/// `\_SB_.VGEN`, the VM generation ID device Linux's vmgenid driver binds
/// to (its ADDR names where the 16-byte ID is), and `\_SB_.GED_`, a generic
/// event device whose interrupt makes the guest re-read it: its `_EVT`
/// notifies VGEN (0x80), and the driver reseeds the guest's RNG when the ID
/// changed (see crate::vmgenid).
fn vmgenid_aml(body: &mut Vec<u8>) {
    let addr = aml::Package::new(vec![&VMGENID_ADDRESS_LOW, &aml::ZERO]);
    let vgen_fields = [
        aml::Name::new("_HID".into(), &"VMGENCTR"),
        aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
        aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
        aml::Name::new("ADDR".into(), &addr),
    ];
    aml::Device::new(
        "_SB_.VGEN".into(),
        vgen_fields.iter().map(|f| f as &dyn Aml).collect(),
    )
    .to_aml_bytes(body);

    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let vgen = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen, &0x80u8);
    let is_ged_gsi = aml::Equal::new(&aml::Arg(0), &GED_GSI_BYTE);
    let on_ged_gsi = aml::If::new(&is_ged_gsi, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&on_ged_gsi]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_crs = aml::Name::new("_CRS".into(), &ged_crs);
    aml::Device::new("_SB_.GED_".into(), vec![&ged_hid, &ged_crs, &evt]).to_aml_bytes(body);
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Writes all tables into the ACPI area and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDeviceAcpi],
) -> Result<GuestAddress, AcpiError> {
    let body = dsdt_body(devices);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    let dsdt = dsdt.as_slice().to_vec();

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDRESS, 0));
    let madt = to_bytes(&madt);

    // Layout: RSDP, then XSDT, FADT, MADT, DSDT, each 16-byte aligned.
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + 8 * 2;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > VMGENID_START {
        return Err(AcpiError::TooBig(end - ACPI_START));
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"HUSKVMM\0").into();
    let fadt = to_bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (dsdt_addr, &dsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::GuestMemory)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut buf = vec![0; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = crate::memory::create(64).unwrap();
        let devices = [
            MmioDeviceAcpi {
                base: u32::try_from(VIRTIO_MMIO_START).unwrap(),
                len: 0x1000,
                gsi: 5,
            },
            MmioDeviceAcpi {
                base: u32::try_from(VIRTIO_MMIO_START + 0x1000).unwrap(),
                len: 0x1000,
                gsi: 6,
            },
        ];
        let rsdp = write_tables(&mem, 2, &devices).unwrap();
        let mut rsdp_bytes = [0u8; 36];
        mem.read_slice(&mut rsdp_bytes, rsdp).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes[..20]) && checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = table_at(&mem, fadt_addr);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let madt = table_at(&mem, madt_addr);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Two local APICs (8 bytes each) and one IOAPIC (12 bytes).
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let text = String::from_utf8_lossy(&dsdt);
        assert!(text.contains("LNRO0005") && text.contains("_S5_") && text.contains("COM1"));
        assert!(text.contains("V000") && text.contains("V001"));
        assert!(text.contains("VMGENCTR") && text.contains("ACPI0013") && text.contains("_EVT"));
    }
}
