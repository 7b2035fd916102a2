// The attention kernel compiled for AVX-512 (F, DQ, BW, VL).
//
// Standard headers come first, outside the target region, so that their inline functions are compiled for the
// baseline; everything inside the region has internal linkage (anonymous namespace), so no code built for
// this instruction set is shared with other translation units. ops.cpp calls in only when the CPU has it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <immintrin.h>

#include "attention.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2")
#endif

namespace kvquant_cpu {
namespace {
#include "simd_avx512.h"
#include "attention_kernel.h"
}  // namespace
}  // namespace kvquant_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace kvquant_cpu {

Kernels kernels_avx512() {
  return {Avx512::name, Avx512::BF16_STEPS, attend_any<Avx512>, rope_tables<Avx512>, scratch_floats};
}

}  // namespace kvquant_cpu
