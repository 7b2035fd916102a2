// Runs CUDA kernel code on the CPU for tests: each CUDA thread of a block is a fiber (ucontext) on one OS thread,
// scheduled round robin; the warp and block barriers, shuffles, ballots and shared-memory atomics are emulated
// with them, and the PTX instructions of csrc/kvquant_ptx.cuh (mma.sync, cvt.rna.tf32, cp.async) from their
// definitions in the PTX ISA. Warp-level calls must be reached by all 32 lanes, as on a GPU with full masks: a
// lane that skips one deadlocks the emulation, which is reported.
//
// Force-included (g++ -include) before the kernel header, which then leaves out kvquant_ptx.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <vector_functions.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define KVQUANT_HOST_EMULATION 1
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  int count = 0;
  unsigned generation = 0;
  uint64_t slot[32];
  float c[32][4];
  uint32_t a[32][4], b[32][2];
};

struct Fiber {
  ucontext_t context;
  Dim3 thread;
  bool done = false;
  std::vector<char> stack;
};

struct Block {
  Dim3 index, grid;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<uint8_t> smem;
  ucontext_t scheduler;
  int current = 0;
  int block_count = 0;
  unsigned block_generation = 0;
  long idle_resumes = 0;  // resumes since the last barrier release or exit: deadlock when it passes 2 rounds
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline Fiber& fiber() { return block()->fibers[block()->current]; }
inline int lane() { return static_cast<int>(fiber().thread.x % 32); }
inline Warp& warp() { return block()->warps[fiber().thread.x / 32]; }

inline void yield() { swapcontext(&fiber().context, &block()->scheduler); }

inline void warp_barrier() {
  Warp& w = warp();
  const unsigned generation = w.generation;
  if (++w.count == 32) {
    w.count = 0;
    ++w.generation;
    block()->idle_resumes = 0;
  } else {
    while (w.generation == generation) yield();
  }
}

inline void block_barrier() {
  Block& b = *block();
  const unsigned generation = b.block_generation;
  if (++b.block_count == static_cast<int>(b.fibers.size())) {
    b.block_count = 0;
    ++b.block_generation;
    b.idle_resumes = 0;
  } else {
    while (b.block_generation == generation) yield();
  }
}

template <typename T>
T exchange(T value, int source_lane) {
  static_assert(sizeof(T) <= 8);
  Warp& w = warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slot[lane()] = bits;
  warp_barrier();
  T r;
  bits = w.slot[source_lane];
  std::memcpy(&r, &bits, sizeof(T));
  warp_barrier();
  return r;
}

using Kernel = std::function<void()>;

inline void fiber_main(unsigned hi, unsigned lo) {
  auto* kernel = reinterpret_cast<const Kernel*>((static_cast<uintptr_t>(hi) << 32) | lo);
  (*kernel)();
  fiber().done = true;
  block()->idle_resumes = 0;
  swapcontext(&fiber().context, &block()->scheduler);
}

// Runs `kernel` for every block of `grid` with `threads` threads and `smem_bytes` of dynamic shared memory.
inline void launch(Dim3 grid, int threads, int smem_bytes, const Kernel& kernel) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.index = {x, y, z};
        b.grid = grid;
        b.fibers.resize(threads);
        b.warps.resize((threads + 31) / 32);
        b.smem.assign(smem_bytes + 16, 0xA5);  // garbage, as on a GPU
        block() = &b;
        const uintptr_t address = reinterpret_cast<uintptr_t>(&kernel);
        for (int i = 0; i < threads; ++i) {
          Fiber& f = b.fibers[i];
          f.thread = {static_cast<unsigned>(i), 0, 0};
          f.stack.resize(1 << 18);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = nullptr;
          makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_main), 2, static_cast<unsigned>(address >> 32),
                      static_cast<unsigned>(address & 0xffffffffu));
        }
        for (int running = threads; running > 0;) {
          running = 0;
          for (int i = 0; i < threads; ++i) {
            if (b.fibers[i].done) continue;
            b.current = i;
            swapcontext(&b.scheduler, &b.fibers[i].context);
            running += !b.fibers[i].done;
            if (++b.idle_resumes > 4L * threads) {
              std::fprintf(stderr, "emulated block (%u, %u, %u) deadlocked: a warp or block barrier that not every "
                           "thread reaches\n", x, y, z);
              std::abort();
            }
          }
        }
        block() = nullptr;
      }
    }
  }
}

inline float tf32_value(uint32_t bits) {  // the tensor cores read the top 19 bits of a tf32 operand
  bits &= 0xffffe000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float half_value(uint32_t pair, int high, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(high ? pair >> 16 : pair & 0xffff);
  if (bf16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

// D = A B + C over the warp; `element(a or b regs of a lane, k)` and the coordinates follow the PTX ISA fragments.
inline void mma(float (&d)[4], const uint32_t* a, int a_regs, const uint32_t (&b)[2], int k_dim, bool tf32,
                bool bf16) {
  Warp& w = warp();
  const int me = lane();
  std::memcpy(w.a[me], a, a_regs * 4);
  std::memcpy(w.b[me], b, 8);
  std::memcpy(w.c[me], d, 16);
  warp_barrier();
  double A[16][16] = {}, B[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    if (tf32) {  // m16n8k8: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); b0 (t, g), b1 (t + 4, g)
      A[g][t] = tf32_value(w.a[l][0]);
      A[g + 8][t] = tf32_value(w.a[l][1]);
      A[g][t + 4] = tf32_value(w.a[l][2]);
      A[g + 8][t + 4] = tf32_value(w.a[l][3]);
      B[t][g] = tf32_value(w.b[l][0]);
      B[t + 4][g] = tf32_value(w.b[l][1]);
    } else {  // m16n8k16: element i of A at row g (+8 for i % 4 >= 2), column 2t + i % 2 (+8 for i >= 4)
      for (int i = 0; i < 8; ++i) {
        A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = half_value(w.a[l][i / 2], i % 2, bf16);
      }
      for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + 8 * (i >> 1)][g] = half_value(w.b[l][i / 2], i % 2, bf16);
    }
  }
  const int g = me / 4, t = me % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double sum = w.c[me][i];
    for (int k = 0; k < k_dim; ++k) sum += A[row][k] * B[k][col];
    d[i] = static_cast<float>(sum);
  }
  warp_barrier();
}

}  // namespace emu

#define threadIdx (emu::fiber().thread)
#define blockIdx (emu::block()->index)
#define gridDim (emu::block()->grid)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) { return emu::exchange(value, emu::lane() ^ mask); }
template <typename T>
T __shfl_sync(unsigned, T value, int source) { return emu::exchange(value, source & 31); }
inline unsigned __ballot_sync(unsigned, int predicate) {
  emu::Warp& w = emu::warp();
  w.slot[emu::lane()] = predicate != 0;
  emu::warp_barrier();
  unsigned mask = 0;
  for (int l = 0; l < 32; ++l) mask |= static_cast<unsigned>(w.slot[l]) << l;
  emu::warp_barrier();
  return mask;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float atomicAdd(float* address, float value) {  // fibers never interleave inside it
  const float old = *address;
  *address = old + value;
  return old;
}
inline float __uint_as_float(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline void __sincosf(float x, float* s, float* c) { ::sincosf(x, s, c); }
using std::max;
using std::min;

namespace kvquant {

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma(d, a, 4, b, 16, false, false);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma(d, a, 4, b, 16, false, true);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::mma(d, a, 4, b, 8, true, false);
}
inline uint32_t to_tf32(float x) {  // cvt.rna: to nearest, ties away from zero (on the magnitude bits)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return (bits + 0x1000u) & 0xffffe000u;
}
inline void cp_async_16(void* dst, const void* src) { std::memcpy(dst, src, 16); }
inline void cp_async_commit() {}
template <int PENDING>
inline void cp_async_wait() {}
inline uint8_t* dynamic_smem() {
  uint8_t* base = emu::block()->smem.data();
  return base + (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
}

}  // namespace kvquant
