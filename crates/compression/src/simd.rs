//! Whether the methods' few SIMD loops may run: the CPU has AVX2 and FMA, and the
//! environment does not ask for the portable kernels (`KVMERGER_KERNELS=plain`, or
//! the older `KVMERGER_NO_SIMD=1`; the engine's `kernels::Family` reads the same
//! variables and refuses a bad value at the binary's start).

/// AVX2 and FMA may be used.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let plain = std::env::var("KVMERGER_KERNELS")
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("plain"))
            || std::env::var_os("KVMERGER_NO_SIMD").is_some_and(|v| !v.is_empty() && v != "0");
        !plain && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}
