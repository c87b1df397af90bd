//! Guest images built together with amsvm (the workload unikernel and the paging server).
//!
//! `build.rs` builds `guest-images/workload` and exports the path of the ELF; the bytes
//! are embedded here, so the `amsvm` binary carries its workload image. The tests below
//! check the image's shape, and run the workload's pure code (math, page choice, page
//! contents) on the host.

/// The workload unikernel: a static, non-PIE ELF64 for x86-64 whose loadable segments
/// start at or above [`amsvm_abi::layout::IMAGE_MIN`]; entered at CPL3 as described in
/// `amsvm_abi`. See `docs/workload.md`.
pub fn workload_elf() -> &'static [u8] {
    include_bytes!(env!("AMSVM_WORKLOAD_ELF"))
}

/// The paging-server unikernel (`guest-images/paging-server`, `docs/vasi.md`).
pub fn paging_server_elf() -> &'static [u8] {
    include_bytes!(env!("AMSVM_PAGING_SERVER_ELF"))
}

/// Where `build.rs` left the workload ELF (in this build's OUT_DIR), for tools and tests
/// that want a file rather than bytes.
pub fn workload_elf_path() -> &'static str {
    env!("AMSVM_WORKLOAD_ELF")
}

// The workload's pure modules, compiled for the host so that `cargo test` exercises them.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../guest-images/workload/src/math.rs"]
mod math;
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../guest-images/workload/src/page.rs"]
mod page;
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../guest-images/workload/src/loan.rs"]
mod loan;
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../guest-images/workload/src/sampler.rs"]
mod sampler;
// The workload's kernel command-line settings (off amsvm); its tests are in the file.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../guest-images/workload/src/cmdline.rs"]
mod cmdline;

#[cfg(test)]
mod tests {
    use super::*;
    use amsvm_abi::layout;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    struct Phdr {
        ty: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn program_headers(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(elf, 0x20) as usize;
        let phentsize = u16_at(elf, 0x36) as usize;
        let phnum = u16_at(elf, 0x38) as usize;
        assert_eq!(phentsize, 56, "ELF64 program header size");
        (0..phnum)
            .map(|i| {
                let p = &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize];
                Phdr {
                    ty: u32_at(p, 0),
                    flags: u32_at(p, 4),
                    offset: u64_at(p, 8),
                    vaddr: u64_at(p, 16),
                    paddr: u64_at(p, 24),
                    filesz: u64_at(p, 32),
                    memsz: u64_at(p, 40),
                }
            })
            .collect()
    }

    /// (name, type) of every section.
    fn sections(elf: &[u8]) -> Vec<(String, u32)> {
        let shoff = u64_at(elf, 0x28) as usize;
        let shentsize = u16_at(elf, 0x3a) as usize;
        let shnum = u16_at(elf, 0x3c) as usize;
        let shstrndx = u16_at(elf, 0x3e) as usize;
        assert_eq!(shentsize, 64, "ELF64 section header size");
        let sh = |i: usize| &elf[shoff + i * shentsize..shoff + (i + 1) * shentsize];
        let strtab = u64_at(sh(shstrndx), 0x18) as usize;
        (0..shnum)
            .map(|i| {
                let name_off = strtab + u32_at(sh(i), 0) as usize;
                let end = elf[name_off..].iter().position(|&c| c == 0).unwrap() + name_off;
                (String::from_utf8_lossy(&elf[name_off..end]).into_owned(), u32_at(sh(i), 4))
            })
            .collect()
    }

    #[test]
    fn workload_is_a_static_elf64_x86_64_executable_above_image_min() {
        check_native_shape(workload_elf());
    }

    /// The workload boots under other VMMs too (docs/workload.md): a PT_NOTE with
    /// XEN_ELFNOTE_PHYS32_ENTRY (name "Xen", type 18) names its PVH entry, a 32-bit
    /// address in the executable segment, apart from the ELF entry.
    #[test]
    fn workload_announces_a_pvh_entry() {
        let elf = workload_elf();
        let phdrs = program_headers(elf);
        let note = phdrs.iter().find(|p| p.ty == 4).expect("no PT_NOTE");
        let n = &elf[note.offset as usize..(note.offset + note.filesz) as usize];
        let (namesz, descsz, ty) = (u32_at(n, 0), u32_at(n, 4), u32_at(n, 8));
        assert_eq!((namesz, ty, &n[12..16]), (4, 18, &b"Xen\0"[..]), "first note");
        // QEMU reads 8 bytes from an ELF64 note, linux-loader the first 4.
        assert_eq!(descsz, 8);
        let pvh = u64_at(n, 16);
        assert!(pvh < 1 << 32 && pvh != u64_at(elf, 0x18), "PVH entry {pvh:#x}");
        let text = phdrs.iter().find(|p| p.ty == 1 && p.flags & 1 != 0).unwrap();
        assert!(pvh >= text.vaddr && pvh < text.vaddr + text.memsz, "PVH entry {pvh:#x} outside the code");
    }

    #[test]
    fn paging_server_is_a_static_elf64_x86_64_executable_above_image_min() {
        check_native_shape(paging_server_elf());
    }

    /// A native image (docs/native-abi.md): static ELF64 x86-64 `ET_EXEC`, every segment
    /// at or above IMAGE_MIN, nothing for a dynamic loader.
    fn check_native_shape(elf: &[u8]) {
        assert!(elf.len() > 64, "image of {} bytes", elf.len());
        assert_eq!(&elf[..4], b"\x7fELF", "ELF magic");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(elf, 0x10), 2, "ET_EXEC (static, not PIE)");
        assert_eq!(u16_at(elf, 0x12), 62, "EM_X86_64");
        let entry = u64_at(elf, 0x18);
        assert!(entry >= layout::IMAGE_MIN, "entry {entry:#x} below IMAGE_MIN");

        let phdrs = program_headers(elf);
        let loads: Vec<&Phdr> = phdrs.iter().filter(|p| p.ty == 1).collect();
        assert!(!loads.is_empty(), "no PT_LOAD segment");
        for p in &loads {
            assert!(p.vaddr >= layout::IMAGE_MIN && p.paddr >= layout::IMAGE_MIN, "PT_LOAD at {:#x} below IMAGE_MIN", p.vaddr);
            assert!(p.filesz <= p.memsz, "PT_LOAD at {:#x}: filesz > memsz", p.vaddr);
            assert!(p.offset + p.filesz <= elf.len() as u64, "PT_LOAD at {:#x} beyond the file", p.vaddr);
            assert!(p.vaddr + p.memsz <= layout::MAX_RAM, "PT_LOAD at {:#x} beyond MAX_RAM", p.vaddr);
        }
        let text = loads.iter().find(|p| entry >= p.vaddr && entry < p.vaddr + p.memsz).expect("entry outside every PT_LOAD");
        assert!(text.flags & 1 != 0, "entry segment is not executable");
        // Nothing that needs a dynamic loader or a thread pointer.
        for (ty, what) in [(2, "PT_DYNAMIC"), (3, "PT_INTERP"), (7, "PT_TLS")] {
            assert!(phdrs.iter().all(|p| p.ty != ty), "image has {what}");
        }
        for (name, ty) in sections(elf) {
            assert!(![4, 6, 9, 11].contains(&ty), "section {name} is a relocation or dynamic-linking section (type {ty})");
            assert!(!name.starts_with(".plt") && !name.starts_with(".got"), "section {name}");
            assert!(!name.starts_with(".tdata") && !name.starts_with(".tbss"), "section {name}");
        }
    }

    #[test]
    fn ln_and_exp_match_std() {
        let mut x = 1e-310_f64;
        while x < 1e300 {
            for v in [x, x * 1.37, x * 0.71] {
                let (got, want) = (math::ln(v), v.ln());
                assert!((got - want).abs() <= 4.0 * f64::EPSILON * want.abs().max(1.0), "ln({v}) = {got}, want {want}");
            }
            x *= 9.3;
        }
        assert_eq!(math::ln(1.0), 0.0);
        assert!(math::ln(-1.0).is_nan() && math::ln(0.0) == f64::NEG_INFINITY);
        let mut x = -745.0;
        while x < 709.7 {
            let (got, want) = (math::exp(x), x.exp());
            assert!((got - want).abs() <= 4.0 * f64::EPSILON * want + f64::from_bits(1), "exp({x}) = {got}, want {want}");
            x += 0.4137;
        }
        assert_eq!(math::exp(0.0), 1.0);
        assert_eq!(math::exp(800.0), f64::INFINITY);
        assert_eq!(math::exp(-800.0), 0.0);
        for v in [1e-300, -1e-17, 1e-12, -3e-9, 2e-7, 0.01, -0.3, 0.49, 0.7, 5.0] {
            let (got, want) = (math::ln_1p(v), v.ln_1p());
            assert!((got - want).abs() <= 4.0 * f64::EPSILON * want.abs(), "ln_1p({v}) = {got}, want {want}");
            let (got, want) = (math::exp_m1(v), v.exp_m1());
            assert!((got - want).abs() <= 4.0 * f64::EPSILON * want.abs(), "exp_m1({v}) = {got}, want {want}");
        }
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 5, 64, 1000, 4097, 65_537] {
            let p = sampler::Permutation::new(n, 42 + n);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i);
                assert!(j < n && !seen[j as usize], "n={n}: {i} -> {j} twice or out of range");
                seen[j as usize] = true;
            }
        }
        // Spreads: the 16 most popular ranks of a large set do not land next to each other.
        let p = sampler::Permutation::new(1 << 20, 7);
        let mut hot: Vec<u64> = (0..16).map(|i| p.apply(i)).collect();
        hot.sort();
        assert!(hot.windows(2).filter(|w| w[1] - w[0] < 64).count() < 4, "{hot:?}");
    }

    #[test]
    fn zipf_follows_its_distribution() {
        for (n, s) in [(100u64, 0.99), (100, 1.0), (1000, 0.5), (50, 1.7)] {
            let z = sampler::Zipf::new(n, s);
            let mut rng = sampler::Rng::new(9);
            let draws = 400_000;
            let mut count = vec![0u64; n as usize + 1];
            for _ in 0..draws {
                let k = z.sample(&mut rng);
                assert!((1..=n).contains(&k));
                count[k as usize] += 1;
            }
            let norm: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
            for k in [1usize, 2, 3, 10, n as usize] {
                let p = (k as f64).powf(-s) / norm;
                let want = p * draws as f64;
                let sigma = (want * (1.0 - p)).sqrt();
                let got = count[k] as f64;
                assert!((got - want).abs() <= 5.0 * sigma + 1.0, "n={n} s={s} rank {k}: {got} draws, want {want:.0}");
            }
        }
        // Every exponent the settings allow, tiny to huge working sets: ranks stay in range.
        for s in [0.001, 0.3, 1.0, 3.0, 5.0, 10.0] {
            for n in [1u64, 2, 7, 1 << 20, 1 << 30] {
                let z = sampler::Zipf::new(n, s);
                let mut rng = sampler::Rng::new(n ^ s.to_bits());
                assert!((0..10_000).all(|_| (1..=n).contains(&z.sample(&mut rng))), "n={n} s={s}");
            }
        }
        let one = sampler::Zipf::new(1, 0.99);
        let mut rng = sampler::Rng::new(1);
        assert!((0..100).all(|_| one.sample(&mut rng) == 1));
    }

    #[test]
    fn sequential_and_uniform_cover_the_working_set() {
        let mut rng = sampler::Rng::new(3);
        let mut seq = sampler::PageSampler::Sequential { n: 5, next: 0 };
        let got: Vec<u64> = (0..7).map(|_| seq.sample(&mut rng)).collect();
        assert_eq!(got, [0, 1, 2, 3, 4, 0, 1]);
        let mut uni = sampler::PageSampler::Uniform { n: 10 };
        let mut count = [0u32; 10];
        for _ in 0..100_000 {
            count[uni.sample(&mut rng) as usize] += 1;
        }
        assert!(count.iter().all(|&c| (9_000..11_000).contains(&c)), "{count:?}");
        let hits = (0..100_000).filter(|_| rng.percent(30)).count();
        assert!((29_000..31_000).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| !rng.percent(0)) && (0..1000).all(|_| rng.percent(100)));
    }

    #[test]
    fn hotspot_gets_its_share_and_moves_away() {
        let (n, phase) = (1000u64, 20_000u64);
        let mut rng = sampler::Rng::new(5);
        let mut h = sampler::Hotspot::new(n, 10, 90, phase, &mut rng);
        assert_eq!(h.hot_pages(), 100);
        let in_spot = |base: u64, page: u64| (page + n - base) % n < 100;
        let mut prev_base = None;
        for _ in 0..5 {
            // The move happens on the first access of a phase.
            let first = h.sample(&mut rng);
            let base = h.base();
            let mut hot = in_spot(base, first) as u64;
            for _ in 1..phase {
                hot += in_spot(base, h.sample(&mut rng)) as u64;
            }
            let share = hot as f64 / phase as f64;
            assert!((0.88..0.92).contains(&share), "hot share {share}");
            if let Some(prev) = prev_base {
                let d = (base + n - prev) % n;
                assert!((100..=900).contains(&d), "moved from {prev} to {base}: overlaps");
            }
            prev_base = Some(base);
        }
        // No moves when phase_accesses is 0; a hot spot of the whole set is fine.
        let mut still = sampler::Hotspot::new(n, 100, 50, 0, &mut rng);
        let b = still.base();
        for _ in 0..10_000 {
            assert!(still.sample(&mut rng) < n);
        }
        assert_eq!(still.base(), b);
    }

    #[test]
    fn pages_verify_and_mismatches_are_described() {
        let mut buf = vec![0u64; page::WORDS];
        let p = buf.as_mut_ptr();
        // A never-written page must be all zeros.
        unsafe {
            assert_eq!(page::verify(p, &page::Expected::page(1, 7, 0)), Ok(()));
            page::fill(p, &page::Expected::page(1, 7, 3));
            assert_eq!(page::verify(p, &page::Expected::page(1, 7, 3)), Ok(()));
        }
        assert_eq!(buf[0] as u32, amsvm_abi::PAGE_STAMP_MAGIC);
        assert_eq!((buf[0] >> 32, buf[1], buf[2]), (1, 7, 3));
        // Every word is covered: flip one byte near the end.
        buf[page::WORDS - 1] ^= 0x100;
        let m = unsafe { page::verify(p, &page::Expected::page(1, 7, 3)) }.unwrap_err();
        assert_eq!((m.word, m.bad_words), (page::WORDS - 1, 1));
        // A stale page names the version it holds.
        unsafe { page::fill(p, &page::Expected::page(1, 7, 2)) };
        let m = unsafe { page::verify(p, &page::Expected::page(1, 7, 3)) }.unwrap_err();
        assert_eq!((m.found_magic(), m.found_partition(), m.found_index(), m.found_version()), (amsvm_abi::PAGE_STAMP_MAGIC, 1, 7, 2));
        assert!(m.bad_words > 400, "filler must depend on the version: {} bad words", m.bad_words);
        // A written page is not a zero page, and zero pages are checked word by word.
        let m = unsafe { page::verify(p, &page::Expected::page(1, 7, 0)) }.unwrap_err();
        assert_eq!(m.word, 0);
        // Other partitions, pages and block stamps give different contents.
        let a = page::Expected::page(1, 7, 3);
        for other in [page::Expected::page(2, 7, 3), page::Expected::page(1, 8, 3), page::Expected::block(1, 7, 3)] {
            let differing = (0..page::WORDS).filter(|&j| a.word(j) != other.word(j)).count();
            assert!(differing > 500, "{other:?}: only {differing} words differ");
        }
        unsafe { page::fill(p, &page::Expected::block(4, 9, 0xabc)) };
        assert_eq!(buf[0] as u32, amsvm_abi::BLOCK_STAMP_MAGIC);
        assert_eq!(unsafe { page::verify(p, &page::Expected::block(4, 9, 0xabc)) }, Ok(()));
    }
}
