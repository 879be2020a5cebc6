//! Header writers and checksum arithmetic shared by the code that builds or rewrites packets:
//! encapsulation, the ICMP "too big" answer, echo replies.

/// IPv4 flags word: don't fragment.
pub const IPV4_DF: u16 = 0x4000;
pub const TTL: u8 = 64;

/// Copies a 6-byte MAC as a 4- and a 2-byte word. As a byte copy from map memory into the
/// packet, LLVM (unable to tell the two apart) calls memmove: a BPF-to-BPF call and a byte loop.
///
/// # Safety
/// `dst` must hold 6 writable bytes, `src` 6 readable ones.
#[inline(always)]
pub unsafe fn copy_mac(dst: *mut u8, src: *const u8) {
    // SAFETY: the caller's contract.
    unsafe {
        dst.cast::<u32>()
            .write_unaligned(src.cast::<u32>().read_unaligned());
        dst.add(4)
            .cast::<u16>()
            .write_unaligned(src.add(4).cast::<u16>().read_unaligned());
    }
}

/// Ethernet header: the 6-byte addresses at `dst` and `src`, then `ethertype`.
///
/// # Safety
/// `p` must hold 14 writable bytes, `dst` and `src` 6 readable bytes each.
#[inline(always)]
pub unsafe fn write_eth(p: *mut u8, dst: *const u8, src: *const u8, ethertype: u16) {
    // SAFETY: the caller's contract.
    unsafe {
        core::ptr::copy_nonoverlapping(dst, p, 6);
        core::ptr::copy_nonoverlapping(src, p.add(6), 6);
        (p.add(12) as *mut u16).write_unaligned(ethertype.to_be());
    }
}

/// An option-less IPv4 header with id 0, TTL 64 and its checksum; `flags` is the flags and
/// fragment-offset word, addresses are in wire order.
///
/// # Safety
/// `p` must hold 20 writable bytes.
#[inline(always)]
pub unsafe fn write_ipv4(p: *mut u8, tos: u8, proto: u8, total_len: u16, flags: u16, src: u32, dst: u32) {
    let w0 = 0x4500u16 | tos as u16;
    let w4 = (TTL as u16) << 8 | proto as u16;
    // Addresses are in wire order; sum their big-endian halves.
    let (s, d) = (u32::from_be(src), u32::from_be(dst));
    let sum = w0 as u32 + total_len as u32 + flags as u32 + w4 as u32;
    let csum = !fold(sum + (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff));
    // SAFETY: the caller's contract.
    unsafe {
        let h = p as *mut u16;
        h.write_unaligned(w0.to_be());
        h.add(1).write_unaligned(total_len.to_be());
        h.add(2).write_unaligned(0);
        h.add(3).write_unaligned(flags.to_be());
        h.add(4).write_unaligned(w4.to_be());
        h.add(5).write_unaligned(csum.to_be());
        (p.add(12) as *mut u32).write_unaligned(src);
        (p.add(16) as *mut u32).write_unaligned(dst);
    }
}

/// Sum of the big-endian 16-bit words of `len` bytes (even) at `p`, unfolded.
///
/// # Safety
/// `p` must hold `len` readable bytes.
#[inline(always)]
pub unsafe fn sum_words(p: *const u8, len: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < len {
        // SAFETY: the caller's contract.
        sum += unsafe { u16::from_be((p.add(i) as *const u16).read_unaligned()) } as u32;
        i += 2;
    }
    sum
}

/// One's-complement fold of a 32-bit sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// What a 32-bit word changing from `old` to `new` adds to a checksum's complement (RFC 1624,
/// `~m + m'`, for both 16-bit halves). The words are as read from the wire: one's-complement
/// sums do not depend on byte order, so no swapping is needed.
#[inline(always)]
pub fn word_delta(old: u32, new: u32) -> u32 {
    (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16)
}

/// As `word_delta`, for a 16-bit field.
#[inline(always)]
pub fn half_delta(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// Updates the checksum at `at` by `delta` (from `word_delta`/`half_delta`): `~(~HC + delta)`.
/// Returns the new checksum as read from the wire.
///
/// # Safety
/// `at` must point at two writable bytes.
#[inline(always)]
pub unsafe fn csum_apply(at: *mut u8, delta: u32) -> u16 {
    let p = at as *mut u16;
    // SAFETY: the caller's contract.
    unsafe {
        let new = !fold((!p.read_unaligned()) as u32 + delta);
        p.write_unaligned(new);
        new
    }
}
