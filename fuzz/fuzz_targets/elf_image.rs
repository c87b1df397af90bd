#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::elf_image(data));
