//! The ports through which the guest ends the VM: the ACPI sleep control and
//! reset registers of our hardware-reduced FADT, and the i8042 reset line
//! (what `reboot=k` and the kernel's fallback reboot path use).

use std::sync::Arc;

use crate::acpi::S5_SLEEP_TYPE;
use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Sleep control, sleep status and reset registers (three consecutive ports).
pub struct AcpiPowerPorts {
    exit: Arc<ExitSignal>,
}

impl AcpiPowerPorts {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPowerPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads as "not waking"; nothing else is readable.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = u64::from(ACPI_SLEEP_CONTROL_PORT) + offset;
        if port == u64::from(ACPI_SLEEP_CONTROL_PORT) {
            // The guest first clears status, then writes SLP_TYP|SLP_EN:
            // only the latter means "enter S5 now".
            let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                self.exit.request(ExitReason::PowerOff);
            }
        } else if port == u64::from(ACPI_RESET_PORT) && value == ACPI_RESET_VALUE {
            self.exit.request(ExitReason::Reset);
        }
    }
}

const I8042_COMMAND_OFFSET: u64 = 4;
const I8042_RESET_COMMAND: u8 = 0xfe;

/// Just enough of the i8042 for the kernel's keyboard-controller reset:
/// status reads as "empty, ready", command 0xfe resets.
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_OFFSET && data.first() == Some(&I8042_RESET_COMMAND) {
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_write_powers_off_but_status_clear_does_not() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut ports = AcpiPowerPorts::new(exit.clone());
        ports.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        ports.write(1, &[0xff]);
        ports.write(0, &[]);
        assert_eq!(exit.reason(), None);
        ports.write(0, &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_register_and_i8042_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        AcpiPowerPorts::new(exit.clone()).write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));

        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut kbd = I8042::new(exit.clone());
        kbd.write(0, &[I8042_RESET_COMMAND]);
        kbd.write(4, &[0xfd]);
        assert_eq!(exit.reason(), None);
        kbd.write(4, &[I8042_RESET_COMMAND]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
