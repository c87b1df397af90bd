//! Runtime glue: the entry stub and the memory functions the compiler calls.
//!
//! There is no C library: `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp` are written
//! in assembly here, so the compiler cannot turn their bodies back into calls to
//! themselves.

// Entry contract (amsvm_abi): rip = _start, rsp = layout::STACK_TOP, rdi = boot-info
// address, CPL3, interrupts off. Clear the direction flag (the ABI wants it clear at
// every call), terminate the frame-pointer chain, align the stack for the call and enter
// `main`, which never returns.
core::arch::global_asm!(
    ".pushsection .text._start,\"ax\",@progbits",
    ".global _start",
    ".type _start,@function",
    "_start:",
    "    cld",
    "    xor ebp, ebp",
    "    and rsp, -16",
    "    call {main}",
    "    ud2",
    ".size _start, . - _start",
    ".popsection",
    main = sym crate::main,
);

core::arch::global_asm!(
    // void *memcpy(void *dst, const void *src, size_t n)
    ".pushsection .text.memcpy,\"ax\",@progbits",
    ".global memcpy",
    ".type memcpy,@function",
    "memcpy:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    rep movsb",
    "    ret",
    ".size memcpy, . - memcpy",
    ".popsection",
    // void *memmove(void *dst, const void *src, size_t n): copies backwards when dst lies
    // inside [src, src + n).
    ".pushsection .text.memmove,\"ax\",@progbits",
    ".global memmove",
    ".type memmove,@function",
    "memmove:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    cmp rdi, rsi",
    "    jbe 2f",
    "    lea r8, [rsi + rdx]",
    "    cmp rdi, r8",
    "    jae 2f",
    "    lea rsi, [rsi + rdx - 1]",
    "    lea rdi, [rdi + rdx - 1]",
    "    std",
    "    rep movsb",
    "    cld",
    "    ret",
    "2:",
    "    rep movsb",
    "    ret",
    ".size memmove, . - memmove",
    ".popsection",
    // void *memset(void *dst, int c, size_t n)
    ".pushsection .text.memset,\"ax\",@progbits",
    ".global memset",
    ".type memset,@function",
    "memset:",
    "    mov r8, rdi",
    "    mov eax, esi",
    "    mov rcx, rdx",
    "    rep stosb",
    "    mov rax, r8",
    "    ret",
    ".size memset, . - memset",
    ".popsection",
    // int memcmp(const void *a, const void *b, size_t n); bcmp is the same function.
    ".pushsection .text.memcmp,\"ax\",@progbits",
    ".global memcmp",
    ".type memcmp,@function",
    ".global bcmp",
    ".type bcmp,@function",
    "memcmp:",
    "bcmp:",
    "    xor eax, eax",
    "    test rdx, rdx",
    "    jz 3f",
    "2:",
    "    movzx eax, byte ptr [rdi]",
    "    movzx ecx, byte ptr [rsi]",
    "    sub eax, ecx",
    "    jnz 3f",
    "    inc rdi",
    "    inc rsi",
    "    dec rdx",
    "    jnz 2b",
    "3:",
    "    ret",
    ".size memcmp, . - memcmp",
    ".size bcmp, . - bcmp",
    ".popsection",
);

/// Sets `len` bytes at `dst` to `byte` (`rep stosb`). Used instead of
/// `core::ptr::write_bytes`, whose out-of-line `memset` call would go through a GOT entry
/// after LTO (see link.ld).
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
pub unsafe fn fill_bytes(dst: *mut u8, byte: u8, len: usize) {
    // SAFETY: the caller vouches for the range; the direction flag is clear (ABI).
    unsafe {
        core::arch::asm!(
            "rep stosb",
            inout("rdi") dst => _,
            inout("rcx") len => _,
            in("al") byte,
            options(nostack, preserves_flags)
        )
    };
}
