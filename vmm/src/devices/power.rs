//! Reset and power-off: the ACPI sleep-control/status and reset registers the FADT
//! announces (hardware-reduced ACPI), the PCI reset-control port 0xcf9 and the i8042
//! reset command — what Linux and native images use to stop or reboot.

use std::sync::Arc;

use super::BusDevice;

/// Sleep control register (FADT SLEEP_CONTROL_REG), one byte.
pub const ACPI_SLEEP_CONTROL_PORT: u64 = 0x600;
/// Sleep status register (FADT SLEEP_STATUS_REG), one byte.
pub const ACPI_SLEEP_STATUS_PORT: u64 = 0x601;
/// Reset register (FADT RESET_REG), one byte; [`ACPI_RESET_VALUE`] resets.
pub const ACPI_RESET_PORT: u64 = 0x604;
pub const ACPI_RESET_VALUE: u8 = 1;
/// The S5 (soft-off) sleep type the DSDT's `_S5_` object announces.
pub const ACPI_S5_SLP_TYP: u8 = 5;
const SLP_EN: u8 = 1 << 5;
/// Range covering the three ACPI registers above.
pub const ACPI_PORTS_LEN: u64 = 8;
pub const PCI_RESET_PORT: u64 = 0xcf9;
pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_CMD_PORT: u64 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    PowerOff,
    Reset,
}

/// Where power events go (the partition's supervisor).
pub type PowerSink = Arc<dyn Fn(PowerEvent) + Send + Sync>;

/// The ACPI power registers at [`ACPI_SLEEP_CONTROL_PORT`].
pub struct AcpiPower(pub PowerSink);

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken", nothing pending.
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset + ACPI_SLEEP_CONTROL_PORT {
            ACPI_SLEEP_CONTROL_PORT if v & SLP_EN != 0 && (v >> 2) & 7 == ACPI_S5_SLP_TYP => (self.0)(PowerEvent::PowerOff),
            ACPI_RESET_PORT if v == ACPI_RESET_VALUE => (self.0)(PowerEvent::Reset),
            _ => {}
        }
    }
}

/// Port 0xcf9: bit 2 set requests a reset.
pub struct ResetControl(pub PowerSink);

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & 0x4 != 0) {
            (self.0)(PowerEvent::Reset)
        }
    }
}

/// A minimal i8042: no keyboard, status reads 0, command 0xfe resets.
pub struct I8042(pub PowerSink);

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_CMD_PORT - I8042_DATA_PORT && data.first() == Some(&I8042_RESET_CMD) {
            (self.0)(PowerEvent::Reset)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn power_registers_decode_events() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink: PowerSink = Arc::new(move |e| s.lock().unwrap().push(e));
        let mut acpi = AcpiPower(sink.clone());
        acpi.write(0, &[(ACPI_S5_SLP_TYP << 2) | SLP_EN]);
        acpi.write(0, &[ACPI_S5_SLP_TYP << 2]); // SLP_EN clear: nothing
        acpi.write(4, &[ACPI_RESET_VALUE]);
        acpi.write(4, &[7]);
        acpi.write(2, &[]);
        let mut rc = ResetControl(sink.clone());
        rc.write(0, &[0x2]);
        rc.write(0, &[0x6]);
        let mut kbd = I8042(sink);
        kbd.write(4, &[0xfe]);
        kbd.write(0, &[0xfe]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![PowerEvent::PowerOff, PowerEvent::Reset, PowerEvent::Reset, PowerEvent::Reset]
        );
    }
}
