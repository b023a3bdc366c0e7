// features.h - which SIMD kernel level this process may use.
//
// Kernel tables (quant.cpp, cpu/ops.cpp) are filled once, from the best level that both the CPU
// reports and the SPARROW_SIMD environment variable allows ("scalar", "avx2", "avx512" or
// "avx512bf16"; unset means the best the CPU has). The cap lets tests run every level's kernels
// against the scalar references on one machine, and lets a user rule out a level suspected of a
// bug.
#pragma once

namespace sparrow {

enum class SimdLevel { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// AVX2 + FMA + F16C for Avx2; AVX-512 F/BW/VL/DQ with VNNI (on top of Avx2) for Avx512; and
// AVX512_BF16 on top of that for Avx512Bf16 (bf16 weights multiplied by vdpbf16ps).
SimdLevel simd_level_available();

// Whether the L1 data cache is known to hold under 48 KiB. Some kernels prefetch differently by
// it: on the CPUs measured it tells a Zen 4 (32 KiB) from a Zen 5 (48 KiB), whose memory streams
// behave differently (cpu/ops.h, cpu/matmul_avx512.cpp, cpu/panel_driver.h). Where the size is
// unknown, false: the choices measured first (on the Zen 5) stand.
bool small_l1_data_cache();

}  // namespace sparrow
