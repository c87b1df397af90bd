//! The CMOS real-time clock at ports 0x70 (index) and 0x71 (data), as much of it as a
//! guest reads at boot: the time and date in BCD from the host's clock (UTC), status
//! registers that never show an update in progress, and 128 bytes of CMOS RAM. Linux
//! reads the clock at boot and waits for a clear "update in progress" bit; without this
//! device a Linux guest stalls for seconds on an unclaimed port.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

pub const CMOS_PORT: u64 = 0x70;
pub const CMOS_PORTS_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A: 32.768 kHz time base, 1024 Hz rate, no update in progress.
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode, BCD, no interrupts.
const STATUS_B: u8 = 0x02;
/// Status D: the clock's battery and RAM are valid.
const STATUS_D: u8 = 0x80;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Seconds since the epoch; a fixed clock for tests.
    now: fn() -> u64,
}

fn host_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos { index: 0, ram: [0; 128], now: host_now }
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard
/// Hinnant's days-to-civil algorithm).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Cmos {
    fn register(&self, r: u8) -> u8 {
        let t = (self.now)();
        let (secs, days) = (t % 86_400, (t / 86_400) as i64);
        let (year, month, day) = civil(days);
        match r {
            REG_SECONDS => bcd(secs % 60),
            REG_MINUTES => bcd(secs / 60 % 60),
            REG_HOURS => bcd(secs / 3600),
            // 1 = Sunday; 1970-01-01 was a Thursday.
            REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year.rem_euclid(100) as u64),
            REG_CENTURY => bcd((year / 100) as u64),
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D,
            r => self.ram[r as usize & 0x7f],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            if let Some(b) = data.first_mut() {
                *b = self.register(self.index);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on a PC; the index is the low 7 bits.
            0 => self.index = v & 0x7f,
            1 if self.index > REG_STATUS_D => self.ram[self.index as usize] = v,
            _ => {} // the clock itself is read-only
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, r: u8) -> u8 {
        c.write(0, &[r | 0x80]);
        let mut d = [0xffu8];
        c.read(1, &mut d);
        d[0]
    }

    #[test]
    fn clock_reads_the_date_in_bcd_and_never_updates() {
        // 2026-11-22 01:49:47 UTC, a Sunday.
        let mut c = Cmos { now: || 1_795_312_187, ..Cmos::default() };
        assert_eq!(
            [REG_CENTURY, REG_YEAR, REG_MONTH, REG_DAY, REG_HOURS, REG_MINUTES, REG_SECONDS, REG_WEEKDAY].map(|r| read(&mut c, r)),
            [0x20, 0x26, 0x11, 0x22, 0x01, 0x49, 0x47, 0x01]
        );
        assert_eq!(read(&mut c, REG_STATUS_A) & 0x80, 0, "no update in progress");
        assert_eq!(read(&mut c, REG_STATUS_B), STATUS_B);
        assert_eq!(read(&mut c, REG_STATUS_D), STATUS_D);
        // The clock is read-only; CMOS RAM keeps what is written.
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x99]);
        assert_eq!(read(&mut c, REG_SECONDS), 0x47);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        // Odd accesses do nothing harmful.
        c.write(0, &[]);
        c.read(0, &mut []);
        let mut wide = [0xffu8; 4];
        c.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
    }
}
