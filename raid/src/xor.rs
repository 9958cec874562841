//! Parity arithmetic: XOR of equal-length buffers.
//!
//! Written as fixed 64-byte block loops the compiler turns into full-width vector code; on
//! x86-64 an AVX2 copy of the same loop is selected at run time (the baseline build only
//! assumes SSE2). One pass reads every source once and writes the destination once, which is
//! what keeps parity generation near memory bandwidth.

const BLOCK: usize = 64;

#[inline(always)]
fn xor_into_generic(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    let mut d = dst.chunks_exact_mut(BLOCK);
    let mut s = src.chunks_exact(BLOCK);
    for (db, sb) in (&mut d).zip(&mut s) {
        for j in 0..BLOCK {
            db[j] ^= sb[j];
        }
    }
    for (x, y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x ^= *y;
    }
}

#[inline(always)]
fn xor_many_generic(dst: &mut [u8], srcs: &[&[u8]]) {
    let n = dst.len();
    let mut off = 0;
    while off + BLOCK <= n {
        let mut acc = [0u8; BLOCK];
        for s in srcs {
            let sb = &s[off..off + BLOCK];
            for j in 0..BLOCK {
                acc[j] ^= sb[j];
            }
        }
        dst[off..off + BLOCK].copy_from_slice(&acc);
        off += BLOCK;
    }
    for i in off..n {
        let mut a = 0u8;
        for s in srcs {
            a ^= s[i];
        }
        dst[i] = a;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn xor_into_avx2(dst: &mut [u8], src: &[u8]) {
    xor_into_generic(dst, src)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn xor_many_avx2(dst: &mut [u8], srcs: &[&[u8]]) {
    xor_many_generic(dst, srcs)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static CACHE: AtomicU8 = AtomicU8::new(0);
    match CACHE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let v = std::arch::is_x86_feature_detected!("avx2");
            CACHE.store(if v { 2 } else { 1 }, Ordering::Relaxed);
            v
        }
    }
}

/// `dst ^= src` over the common length.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        unsafe { xor_into_avx2(dst, src) };
        return;
    }
    xor_into_generic(dst, src)
}

/// `dst = srcs[0] ^ srcs[1] ^ ...` over the common length of `dst` and every source
/// (`dst` is zeroed when `srcs` is empty).
pub fn xor_many(dst: &mut [u8], srcs: &[&[u8]]) {
    // Work over the common length so a short source can never index out of bounds.
    let n = srcs.iter().map(|s| s.len()).fold(dst.len(), usize::min);
    let dst = &mut dst[..n];
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        unsafe { xor_many_avx2(dst, srcs) };
        return;
    }
    xor_many_generic(dst, srcs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_matches_bytewise() {
        for len in [0usize, 1, 63, 64, 65, 200, 4096 + 7] {
            let a: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let b: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
            let c: Vec<u8> = (0..len).map(|i| (i * 31 + 5) as u8).collect();
            let want: Vec<u8> = (0..len).map(|i| a[i] ^ b[i] ^ c[i]).collect();
            let mut d = vec![0xAAu8; len];
            xor_many(&mut d, &[&a, &b, &c]);
            assert_eq!(d, want);
            let mut e = a.clone();
            xor_into(&mut e, &b);
            xor_into(&mut e, &c);
            assert_eq!(e, want);
            let mut z = vec![1u8; len];
            xor_many(&mut z, &[]);
            assert!(z.iter().all(|&x| x == 0));
        }
    }
}
