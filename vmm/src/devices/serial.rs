//! The 16550 console of a partition (vm-superio), at COM1 (0x3f8, IRQ 4). Output goes to
//! the partition's log file and, on request, to stdout line by line with the partition's
//! name as prefix.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_GSI: u32 = 4;
/// A console line longer than this is cut and flushed (bounds what a guest can make
/// amsvm buffer).
const MAX_LINE: usize = 4096;

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub struct ConsoleOut {
    prefix: Option<String>,
    log: Option<io::BufWriter<File>>,
    line: Vec<u8>,
}

impl ConsoleOut {
    /// `log`: the per-partition log file (truncated unless `append`, which a partition
    /// rebuilt after a reset uses); `stdout_prefix`: copy lines to stdout as
    /// `[prefix] line`.
    pub fn new(log: Option<&Path>, append: bool, stdout_prefix: Option<String>) -> io::Result<Self> {
        let log = match log {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let f = std::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(p)?;
                Some(io::BufWriter::new(f))
            }
            None => None,
        };
        Ok(ConsoleOut { prefix: stdout_prefix, log, line: Vec::new() })
    }

    fn emit_line(&mut self) {
        if let Some(prefix) = &self.prefix {
            let text = String::from_utf8_lossy(&self.line);
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "[{prefix}] {}", text.trim_end_matches('\r'));
        }
        if let Some(log) = &mut self.log {
            let _ = log.flush();
        }
        self.line.clear();
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            log.write_all(buf)?;
        }
        for &b in buf {
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit_line();
                if b == b'\n' {
                    continue;
                }
            }
            self.line.push(b);
        }
        Ok(buf.len())
    }

    /// The UART flushes after every byte: only the log file is flushed here; stdout
    /// gets whole lines (a partial last line is emitted on drop).
    fn flush(&mut self) -> io::Result<()> {
        if let Some(log) = &mut self.log {
            log.flush()?;
        }
        Ok(())
    }
}

impl Drop for ConsoleOut {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit_line();
        }
        let _ = self.flush();
    }
}

/// The 16550 UART as a port-I/O bus device.
pub struct SerialDevice(pub Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>);

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), out))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset < 8 && !data.is_empty() {
            data[0] = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 8 && !data.is_empty() {
            if let Err(e) = self.0.write(offset as u8, data[0]) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_goes_to_log_and_reports_transmitter_empty() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/p.log");
        let out = ConsoleOut::new(Some(&log), false, None).unwrap();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), out);
        for b in b"hello\nworld\n" {
            dev.write(0, &[*b]);
        }
        let mut lsr = [0u8; 1];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "LSR says THR empty and transmitter idle");
        // Odd sizes and offsets do not panic.
        let mut wide = [0xffu8; 4];
        dev.read(9, &mut wide);
        assert_eq!(wide, [0; 4]);
        dev.write(3, &[]);
        drop(dev);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\nworld\n");
    }
}
