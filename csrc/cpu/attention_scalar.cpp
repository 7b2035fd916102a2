// The attention kernel compiled for the compiler's baseline (any CPU).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention.h"

namespace kvquant_cpu {
namespace {
#include "simd_scalar.h"
#include "attention_kernel.h"
}  // namespace
}  // namespace kvquant_cpu

namespace kvquant_cpu {

Kernels kernels_scalar() {
  return {Scalar::name, Scalar::BF16_STEPS, attend_any<Scalar>, rope_tables<Scalar>, scratch_floats};
}

}  // namespace kvquant_cpu
