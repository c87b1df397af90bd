//! The 16550 console at port [`COM1`], written by polling. Every register access is a VM
//! exit, so callers keep their output short.

/// The console's base port (the boot-info page's `serial_port`).
const COM1: u16 = 0x3f8;
use core::sync::atomic::{AtomicBool, Ordering};

/// Transmit holding register, line status register and its "THR empty" bit.
const THR: u16 = 0;
const LSR: u16 = 5;
const LSR_THRE: u8 = 1 << 5;
/// How many LSR reads to wait for THRE before writing anyway. An emulated UART reports
/// THRE at once; one that never does must not cost this many exits per byte, so after
/// the first such timeout the console stops polling.
const THRE_SPINS: u32 = 1000;
static NO_THRE: AtomicBool = AtomicBool::new(false);

fn read_reg(off: u16) -> u8 {
    let v: u8;
    // SAFETY: a port read of the UART exits to amsvm; it touches no memory.
    unsafe { core::arch::asm!("in al, dx", in("dx") COM1 + off, out("al") v, options(nomem, nostack, preserves_flags)) };
    v
}

fn write_reg(off: u16, value: u8) {
    // SAFETY: a port write to the UART exits to amsvm; it touches no memory.
    unsafe { core::arch::asm!("out dx, al", in("dx") COM1 + off, in("al") value, options(nomem, nostack, preserves_flags)) };
}

pub fn write_byte(b: u8) {
    if !NO_THRE.load(Ordering::Relaxed) {
        let mut spins = 0;
        while read_reg(LSR) & LSR_THRE == 0 {
            spins += 1;
            if spins == THRE_SPINS {
                NO_THRE.store(true, Ordering::Relaxed);
                break;
            }
            core::hint::spin_loop();
        }
    }
    write_reg(THR, b);
}

/// `core::fmt` sink for the console.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            write_byte(b);
        }
        Ok(())
    }
}

/// `println!` onto the serial console.
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}

/// `print!` onto the serial console.
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}
