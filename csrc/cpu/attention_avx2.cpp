// The attention kernel compiled for AVX2 with FMA and F16C.
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
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#endif

namespace kvquant_cpu {
namespace {
#include "simd_avx2.h"
#include "attention_kernel.h"
}  // namespace
}  // namespace kvquant_cpu

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace kvquant_cpu {

Kernels kernels_avx2() {
  return {Avx2::name, Avx2::BF16_STEPS, attend_any<Avx2>, rope_tables<Avx2>, scratch_floats};
}

}  // namespace kvquant_cpu
