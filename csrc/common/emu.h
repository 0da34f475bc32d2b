// Host emulation of the CUDA execution model, so g++ compiles the kernel headers unchanged and runs
// them on the CPU (the transformer._C_emu extension; TILEFORMER_EMULATE defined). Never include this
// directly: kernel headers include "common/device.cuh", which includes it under TILEFORMER_EMULATE.
//
// Execution model
//   * A launch runs its blocks one after another, in a random order under the random schedule (as
//     blocks of a GPU grid run concurrently in no fixed order: fp32 atomic adds from different blocks
//     then land in a different order from seed to seed), in grid order under "inorder";
//     within a block every CUDA thread is a fiber
//     (ucontext, its own stack) on the calling OS thread. Fibers run until they reach a barrier
//     (__syncthreads) or a warp collective (shuffles, votes, __syncwarp, ldmatrix, mma), then yield.
//   * Warpgroup collectives (wgmma, setmaxnreg: 128 consecutive threads) work as warp collectives do, over
//     the 4 warps of the warpgroup; a thread waiting on an mbarrier phase is suspended until an arrival or
//     a landed TMA copy completes that phase (common/emu_hopper.h). Both count in the deadlock check.
//   * Named barriers (bar.sync / bar.arrive with an id 1..15 and a thread count): a phase completes when
//     `count` threads have arrived (bar.sync or bar.arrive; every thread counts one, so a whole warp counts 32
//     as on the hardware, which counts arriving warps); the bar.sync threads of the phase then continue.
//     Checked: the count is a multiple of 32 and the same for every arrival of a phase; each warp arrives with
//     all its threads (.aligned); no arrivals are left pending when the block exits; a bar.sync whose phase
//     never completes is a deadlock (reported with the barrier's arrivals).
//   * __syncthreads releases when every thread of the block has arrived at the same barrier (same
//     source line). A barrier some threads never reach (they exited or wait elsewhere) is a deadlock:
//     the launch stops with std::runtime_error naming the kernel, the block and who waits where.
//   * Warp collectives take the lanes named in `mask`; the last lane to arrive computes the result
//     for all (the documented lane-by-lane semantics), so nothing is ever read half-written.
//   * Schedule (TILEFORMER_EMU_SCHEDULE): "random" (default; seed TILEFORMER_EMU_SEED, default 0) picks
//     the next runnable thread at random -- the order in which threads run between two barriers, and
//     are released from a barrier, is random, which exposes missing barriers; "inorder" runs them by
//     thread index. tf::emu::set_schedule() changes it at run time (tests). set_schedule_lag(true) adds a
//     lagging warpgroup to the random schedule: per block one warpgroup, drawn at random, runs only when no
//     thread of another warpgroup can, so a warpgroup that reads what the other wrote without waiting for it
//     reads it unwritten (a missing barrier between warpgroups shows up as poison or stale data).
//   * __shared__ variables are function-local statics (blocks run one at a time). Dynamic shared memory
//     (TF_DYNAMIC_SMEM) is one buffer per launch, filled with 0xFF bytes (NaN in fp32/fp16/bf16)
//     before every block, so reads of shared memory nobody wrote show up.
//   * __trap() and errors in the emulator end the launch with std::runtime_error.
//   * Global memory: kernels reach it only through tf::gptr (common/gmem.h) and cp.async; with
//     TILEFORMER_EMU_CHECK_BOUNDS=1 every access must lie inside a tensor the op call registered
//     (tf::bind::KernelMemory), else the launch fails naming the kernel and the address.
#pragma once
#ifndef TILEFORMER_EMULATE
#error "common/emu.h is the host emulation; build with -DTILEFORMER_EMULATE=1 (the _C_emu extension only)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>
#include <driver_types.h>   // cudaStream_t (a typedef only; no CUDA runtime is linked)
#include <ucontext.h>
#include <sys/mman.h>
#include <dlfcn.h>
#include <cxxabi.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/gmem.h"

// ---- CUDA keywords on the host ---------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define warpSize 32

namespace tf::emu {

// ---------------------------------------------------------------------------------------------
// State of one launch and one block
// ---------------------------------------------------------------------------------------------

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kSlotBytes = 64;                   // per-lane payload of a warp collective

// GroupWait: in a warpgroup collective (wgmma, setmaxnreg); CondWait: blocked until another thread wakes its
// wait key (an mbarrier phase, common/emu_hopper.h).
enum class State : uint8_t { Ready, BlockWait, WarpWait, GroupWait, CondWait, Done };

struct CpAsyncCopy { void* dst; const void* src; int bytes; int src_bytes; };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0, warp = 0, lane = 0;
  State state = State::Ready;
  const char* wait_site = "";                    // file:line of the barrier / collective it waits at
  int wait_line = 0;
  const void* wait_key = nullptr;                // CondWait: what it waits for (woken by wake(key))
  std::string wait_what;                         // CondWait / GroupWait: description for the deadlock report
  std::vector<std::vector<CpAsyncCopy>> cp_groups = {{}};  // committed groups + the open one (back)
};

struct WarpState;
using CollectiveFn = void (*)(WarpState& w, uint32_t mask);

struct WarpState {
  uint32_t exists = 0;                           // lanes present in this warp (partial last warp)
  uint32_t waiting = 0;                          // lanes blocked in a collective
  uint32_t mask[32];
  CollectiveFn fn[32];
  const char* what[32];
  alignas(16) unsigned char in[32][kSlotBytes];  // each lane's inputs
  alignas(16) unsigned char out[32][kSlotBytes]; // each lane's results
};

// A warpgroup collective: the 128 consecutive threads 128w .. 128w + 127 of a block each pass a pointer to
// their own argument; the last to arrive runs fn(args), args[i] belonging to thread 128w + i.
constexpr int kWarpgroupThreads = 128;
using GroupFn = void (*)(void* const* args);

struct GroupState {
  int arrived = 0;
  GroupFn fn = nullptr;
  const char* what = "";
  const char* site = "";
  int line = 0;
  void* args[kWarpgroupThreads];
};

// One named barrier (ids 1..15) of a block: the current phase's expected count, arrivals so far (per warp).
constexpr int kNamedBarriers = 16;
struct NamedBarrier {
  int count = 0, arrived = 0;
  uint64_t phase = 0;                             // phases completed
  std::vector<int> warp_arrived;                  // per warp of the block, in the current phase
  const char* site = "";                          // where the current phase's first arrival came from
  int line = 0;
};

struct Launch {
  const char* kernel = "?";
  uint64_t block_serial = 0;                      // distinct for every block run (state keyed by shared memory
                                                  // addresses is stamped with it: blocks reuse the addresses)
  dim3 grid, block;
  uint3 block_idx;
  int nthreads = 0;
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_bytes = 0;
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<GroupState> groups;                 // warpgroups (complete ones only)
  NamedBarrier named[kNamedBarriers];             // bar.sync / bar.arrive ids (0 is __syncthreads')
  std::vector<int> ready;
  size_t ready_head = 0;
  int block_arrived = 0;                          // threads waiting at __syncthreads
  const char* block_site = nullptr;
  int block_line = 0;
  int block_count = 0;                            // __syncthreads_count/and/or accumulator
  int block_result = 0;
  std::string error;
  ucontext_t sched;
};

constexpr uint64_t kBlockSeedSalt = 0x9e3779b97f4a7c15ull;

struct Globals {
  std::mutex launch_mutex;                       // one emulated launch at a time per process
  std::vector<void*> stacks;                     // reused across launches
  bool random = true;
  bool lag = false;                              // random schedule with a lagging warpgroup (set_schedule_lag)
  std::mt19937_64 rng{0};
  uint64_t mma_count = 0;                        // warp-level mma.sync executed since load (work counts)
  uint64_t wgmma_count = 0;                      // warpgroup-level wgmma.mma_async executed since load
  uint64_t ldmatrix_x4_count = 0;                // warp-level ldmatrix .x4 (either layout) executed since load
  uint64_t block_serial = 0;                     // blocks run since load
  std::mt19937_64 block_rng{kBlockSeedSalt};     // block order (a stream of its own: thread schedules
                                                 // of one-block launches do not depend on it)
  Globals() {
    const char* s = std::getenv("TILEFORMER_EMU_SCHEDULE");
    if (s && std::string(s) == "inorder") random = false;
    else if (s && *s && std::string(s) != "random") {
      std::fprintf(stderr, "TILEFORMER_EMU_SCHEDULE must be 'random' or 'inorder', got '%s'; using random\n", s);
    }
    const char* seed = std::getenv("TILEFORMER_EMU_SEED");
    if (seed && *seed) {
      rng.seed(std::strtoull(seed, nullptr, 10));
      block_rng.seed(std::strtoull(seed, nullptr, 10) ^ kBlockSeedSalt);
    }
  }
};

inline Globals& globals() { static Globals g; return g; }

// The state of what a CondWait thread waits for, at deadlock time (set by common/emu_hopper.h: an mbarrier's
// phase, pending arrivals and tx-count).
inline std::string (*g_wait_state)(const void* key) = nullptr;
inline thread_local Launch* g_launch = nullptr;
inline thread_local Fiber* g_fiber = nullptr;

// Schedule for the next launches: random=true picks runnable threads in a random order (seeded).
inline void set_schedule(bool random, uint64_t seed) {
  std::lock_guard<std::mutex> lock(globals().launch_mutex);
  globals().random = random;
  globals().rng.seed(seed);
  globals().block_rng.seed(seed ^ kBlockSeedSalt);
}

// With the random schedule, one warpgroup per block runs only when no other thread can (see the file comment).
inline void set_schedule_lag(bool on) {
  std::lock_guard<std::mutex> lock(globals().launch_mutex);
  globals().lag = on;
}

inline Fiber& cur() {
  if (!g_fiber) {
    std::fprintf(stderr, "tileformer emu: a device builtin was used outside an emulated kernel\n");
    std::abort();
  }
  return *g_fiber;
}

// ---------------------------------------------------------------------------------------------
// Scheduling
// ---------------------------------------------------------------------------------------------

inline void make_ready(int i) {
  Launch& L = *g_launch;
  L.fibers[i].state = State::Ready;
  L.ready.push_back(i);
}

// Give control back to the scheduler (the caller has set its state).
inline void yield_to_scheduler() {
  Fiber& f = cur();
  swapcontext(&f.ctx, &g_launch->sched);
}

// Record an error and leave this fiber for good: the launch fails with the message.
[[noreturn]] inline void fail(const std::string& msg) {
  Launch& L = *g_launch;
  Fiber& f = cur();
  if (L.error.empty()) {
    char where[160];
    std::snprintf(where, sizeof(where), " [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]", L.kernel,
                  L.block_idx.x, L.block_idx.y, L.block_idx.z, f.tid.x, f.tid.y, f.tid.z);
    L.error = msg + where;
  }
  f.state = State::Done;
  swapcontext(&f.ctx, &L.sched);
  std::abort();  // never resumed
}

inline void run_cp_async(std::vector<CpAsyncCopy>& group) {
  for (auto& c : group) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
    if (c.bytes > c.src_bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
  }
  group.clear();
}

inline void fiber_main() {
  Launch& L = *g_launch;
  Fiber& f = *g_fiber;
  try {
    L.body();
  } catch (const std::exception& e) {
    fail(std::string("exception in kernel: ") + e.what());
  }
  f.cp_groups.assign(1, {});  // outstanding cp.async copies die with the block's shared memory
  f.state = State::Done;
  swapcontext(&f.ctx, &L.sched);
  std::abort();
}

inline std::string named_barrier_state(const NamedBarrier& b) {
  return "phase " + std::to_string(b.phase) + ": " + std::to_string(b.arrived) + " of " + std::to_string(b.count) +
         " threads arrived";
}

// The state of what a CondWait thread waits for: a named barrier of the block, else an mbarrier.
inline std::string wait_state(const Launch& L, const void* key) {
  for (const NamedBarrier& b : L.named)
    if (key == &b) return named_barrier_state(b);
  return g_wait_state ? g_wait_state(key) : std::string();
}

inline std::string deadlock_report(Launch& L) {
  int done = 0, at_block = 0, at_warp = 0, at_other = 0;
  std::string exited, warp_detail, other_detail;
  for (auto& f : L.fibers) {
    if (f.state == State::Done) {
      if (++done <= 8) exited += " " + std::to_string(f.linear);
    } else if (f.state == State::BlockWait) {
      ++at_block;
    } else if (f.state == State::WarpWait) {
      if (++at_warp <= 4) {
        warp_detail += "; thread " + std::to_string(f.linear) + " waits in " + L.warps[f.warp].what[f.lane] +
                       " at " + f.wait_site + ":" + std::to_string(f.wait_line);
        char m[32];
        std::snprintf(m, sizeof(m), " (mask 0x%08x)", L.warps[f.warp].mask[f.lane]);
        warp_detail += m;
      }
    } else if (f.state == State::GroupWait || f.state == State::CondWait) {
      if (++at_other <= 4)
        other_detail += "; thread " + std::to_string(f.linear) + " waits in " + f.wait_what +
                        (f.state == State::CondWait ? " (" + wait_state(L, f.wait_key) + ")" : "") +
                        " at " + f.wait_site + ":" + std::to_string(f.wait_line);
    }
  }
  std::string msg = "deadlock in kernel " + std::string(L.kernel) + " block (" + std::to_string(L.block_idx.x) +
                    "," + std::to_string(L.block_idx.y) + "," + std::to_string(L.block_idx.z) + "): ";
  if (at_block)
    msg += "__syncthreads at " + std::string(L.block_site) + ":" + std::to_string(L.block_line) + " reached by " +
           std::to_string(at_block) + " of " + std::to_string(L.nthreads) + " threads";
  else
    msg += "no thread can proceed";
  msg += "; " + std::to_string(done) + " threads exited" + (done ? " (e.g." + exited + ")" : "");
  msg += "; " + std::to_string(at_warp) + " wait in warp collectives" + warp_detail;
  if (at_other)
    msg += "; " + std::to_string(at_other) + " wait in warpgroup collectives, on mbarriers or named barriers" +
           other_detail;
  msg += " (a barrier or warp collective not reached by every participating thread";
  msg += at_other ? ", or an mbarrier or named-barrier phase that never completes)" : ")";
  return msg;
}

inline void* stack_for(int i) {
  auto& stacks = globals().stacks;
  while ((int)stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("tileformer emu: cannot map a fiber stack");
    mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
    stacks.push_back(p);
  }
  return stacks[i];
}

inline void run_block(Launch& L) {
  const int n = L.nthreads;
  L.fibers.resize(n);
  L.warps.assign((n + 31) / 32, WarpState{});
  L.groups.assign(n / kWarpgroupThreads, GroupState{});
  L.block_serial = ++globals().block_serial;
  L.ready.clear();
  L.ready_head = 0;
  L.block_arrived = 0;
  L.block_site = nullptr;
  for (NamedBarrier& b : L.named) {
    b = NamedBarrier{};
    b.warp_arrived.assign(L.warps.size(), 0);
  }
  if (L.dyn_smem_bytes) std::memset(L.dyn_smem, 0xFF, L.dyn_smem_bytes);
  for (int i = 0; i < n; ++i) {
    Fiber& f = L.fibers[i];
    f.linear = i;
    f.tid = make_uint3(i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y));
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = State::Ready;
    f.wait_key = nullptr;
    f.cp_groups.assign(1, {});
    L.warps[f.warp].exists |= 1u << f.lane;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_for(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
    L.ready.push_back(i);
  }
  Globals& G = globals();
  const int groups = (n + kWarpgroupThreads - 1) / kWarpgroupThreads;
  const int lagging = G.random && G.lag && groups > 1 ? int(G.rng() % uint64_t(groups)) : -1;
  int done = 0;
  while (done < n) {
    if (L.ready_head == L.ready.size()) {
      if (L.error.empty()) L.error = deadlock_report(L);
      break;
    }
    int i;
    if (G.random) {
      size_t k = L.ready_head + G.rng() % (L.ready.size() - L.ready_head);
      if (lagging >= 0 && L.fibers[L.ready[k]].linear / kWarpgroupThreads == lagging) {
        size_t others = 0;   // ready threads of the other warpgroups: one of them, at random, if any
        for (size_t j = L.ready_head; j < L.ready.size(); ++j)
          others += L.fibers[L.ready[j]].linear / kWarpgroupThreads != lagging;
        if (others) {
          size_t pick = G.rng() % others;
          for (size_t j = L.ready_head; j < L.ready.size(); ++j)
            if (L.fibers[L.ready[j]].linear / kWarpgroupThreads != lagging && pick-- == 0) {
              k = j;
              break;
            }
        }
      }
      std::swap(L.ready[k], L.ready[L.ready_head]);
    }
    i = L.ready[L.ready_head++];
    if (L.ready_head > 4096 && L.ready_head * 2 > L.ready.size()) {  // compact the queue
      L.ready.erase(L.ready.begin(), L.ready.begin() + L.ready_head);
      L.ready_head = 0;
    }
    Fiber& f = L.fibers[i];
    g_fiber = &f;
    swapcontext(&L.sched, &f.ctx);
    g_fiber = nullptr;
    if (!L.error.empty()) break;
    if (f.state == State::Done) ++done;
  }
  for (int id = 1; id < kNamedBarriers && L.error.empty(); ++id) {
    const NamedBarrier& b = L.named[id];
    if (b.arrived)
      L.error = "named barrier " + std::to_string(id) + " has arrivals no phase completed when the block exited (" +
                named_barrier_state(b) + ", the first from " + b.site + ":" + std::to_string(b.line) +
                "): a bar.arrive without the matching bar.sync [kernel " + L.kernel + ", block (" +
                std::to_string(L.block_idx.x) + "," + std::to_string(L.block_idx.y) + "," +
                std::to_string(L.block_idx.z) + ")]";
  }
}

// Name of a kernel from its address (exported symbol, demangled); used in error messages.
inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = (status == 0 && d) ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "kernel@%p", fn);
  return buf;
}

// Run body() as a grid of blocks of CUDA threads. Throws std::runtime_error on any emulated fault.
inline void launch(const void* fn, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::string name = kernel_name(fn);
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    throw std::runtime_error("launch of " + name + ": invalid grid (" + std::to_string(grid.x) + "," +
                             std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
  if (nthreads == 0 || nthreads > kMaxThreads || block.z > 64)
    throw std::runtime_error("launch of " + name + ": invalid block (" + std::to_string(block.x) + "," +
                             std::to_string(block.y) + "," + std::to_string(block.z) + ")");
  if (smem > 227 * 1024)
    throw std::runtime_error("launch of " + name + ": " + std::to_string(smem) +
                             " bytes of dynamic shared memory exceed the 227 KB per block of sm_90");
  std::lock_guard<std::mutex> lock(globals().launch_mutex);
  Launch L;
  L.kernel = name.c_str();
  L.grid = grid;
  L.block = block;
  L.nthreads = int(nthreads);
  // 1024-byte aligned, so offsets from it swizzle as shared-memory addresses do (common/emu_hopper.h)
  std::vector<unsigned char> smem_buf(smem + 1024);
  L.dyn_smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_buf.data()) + 1023) & ~uintptr_t(1023));
  L.dyn_smem_bytes = smem;
  L.body = body;
  Launch* prev = g_launch;
  g_launch = &L;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  // Block order: a random permutation (Fisher-Yates, drawn lazily) under the random schedule.
  std::vector<uint64_t> order;
  if (globals().random && nblocks > 1) {
    if (nblocks > (uint64_t(1) << 28))
      throw std::runtime_error("launch of " + name + ": grid of " + std::to_string(nblocks) +
                               " blocks is too large for the emulator");
    order.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  }
  for (uint64_t i = 0; i < nblocks && L.error.empty(); ++i) {
    uint64_t lin = i;
    if (!order.empty()) {
      std::swap(order[i], order[i + globals().block_rng() % (nblocks - i)]);
      lin = order[i];
    }
    L.block_idx = make_uint3(unsigned(lin % grid.x), unsigned((lin / grid.x) % grid.y),
                             unsigned(lin / (uint64_t(grid.x) * grid.y)));
    run_block(L);
  }
  g_launch = prev;
  if (!L.error.empty()) throw std::runtime_error("tileformer emu: " + L.error);
}

// ---------------------------------------------------------------------------------------------
// Barriers and warp collectives
// ---------------------------------------------------------------------------------------------

// Block barrier. op: 0 plain, 1 count, 2 and, 3 or; returns the reduced predicate.
inline int block_barrier(const char* file, int line, int op, int pred) {
  Launch& L = *g_launch;
  Fiber& f = cur();
  if (L.block_arrived == 0) {
    L.block_site = file;
    L.block_line = line;
    L.block_count = 0;
  } else if (L.block_line != line || std::strcmp(L.block_site, file) != 0) {
    fail("divergent __syncthreads: this thread is at " + std::string(file) + ":" + std::to_string(line) +
         " while " + std::to_string(L.block_arrived) + " threads wait at " + L.block_site + ":" +
         std::to_string(L.block_line));
  }
  L.block_count += pred ? 1 : 0;
  if (++L.block_arrived == L.nthreads) {
    L.block_result = op == 1 ? L.block_count : op == 2 ? (L.block_count == L.nthreads) : (L.block_count > 0);
    L.block_arrived = 0;
    for (auto& g : L.fibers)
      if (g.state == State::BlockWait) make_ready(g.linear);
    f.state = State::Ready;  // re-queue the last arriver too, so the release order is the scheduler's
    L.ready.push_back(f.linear);
  } else {
    f.state = State::BlockWait;
    f.wait_site = file;
    f.wait_line = line;
  }
  yield_to_scheduler();
  return L.block_result;
}

// Warp collective: this lane has written its inputs to w.in[lane]; when every lane of `mask` has
// arrived, the last one runs fn(w, mask), which fills w.out[] for the lanes of mask.
inline WarpState& warp_state() { return g_launch->warps[cur().warp]; }

inline void warp_collective(CollectiveFn fn, uint32_t mask, const char* what, const char* file, int line) {
  Launch& L = *g_launch;
  Fiber& f = cur();
  WarpState& w = L.warps[f.warp];
  const uint32_t me = 1u << f.lane;
  if (!(mask & me)) {
    char m[16];
    std::snprintf(m, sizeof(m), "0x%08x", mask);
    fail(std::string(what) + " at " + file + ":" + std::to_string(line) + ": calling lane " +
         std::to_string(f.lane) + " is not in mask " + m);
  }
  if (mask & ~w.exists) {
    char m[64];
    std::snprintf(m, sizeof(m), "mask 0x%08x names lanes absent from this warp (0x%08x)", mask, w.exists);
    fail(std::string(what) + " at " + file + ":" + std::to_string(line) + ": " + m);
  }
  w.mask[f.lane] = mask;
  w.fn[f.lane] = fn;
  w.what[f.lane] = what;
  w.waiting |= me;
  if ((w.waiting & mask) == mask) {
    for (int l = 0; l < 32; ++l) {
      if (!(mask & (1u << l))) continue;
      if (w.mask[l] != mask || w.fn[l] != fn) {
        char m[160];
        std::snprintf(m, sizeof(m), "warp collectives do not match: lane %d is in %s (mask 0x%08x), lane %d in %s "
                      "(mask 0x%08x)", f.lane, what, mask, l, w.what[l], w.mask[l]);
        fail(std::string(m) + " at " + file + ":" + std::to_string(line));
      }
    }
    fn(w, mask);
    w.waiting &= ~mask;
    for (int l = 0; l < 32; ++l)
      if ((mask & (1u << l)) && l != f.lane) make_ready(f.warp * 32 + l);
    f.state = State::Ready;
    L.ready.push_back(f.linear);
  } else {
    f.state = State::WarpWait;
    f.wait_site = file;
    f.wait_line = line;
  }
  yield_to_scheduler();
}

template <typename T>
inline T& slot_in(WarpState& w, int lane) {
  static_assert(sizeof(T) <= kSlotBytes, "collective payload too large");
  return *reinterpret_cast<T*>(w.in[lane]);
}
template <typename T>
inline T& slot_out(WarpState& w, int lane) {
  static_assert(sizeof(T) <= kSlotBytes, "collective payload too large");
  return *reinterpret_cast<T*>(w.out[lane]);
}

// ---- shuffles ---------------------------------------------------------------------------------
enum ShflKind : int { kIdx, kUp, kDown, kXor };
struct ShflIn { alignas(16) unsigned char value[16]; int kind, arg, width; };

inline void shfl_fn(WarpState& w, uint32_t mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    const ShflIn& in = slot_in<ShflIn>(w, l);
    const int seg = l & ~(in.width - 1), pos = l & (in.width - 1);
    int src = l;
    switch (in.kind) {
      case kIdx: src = seg + (in.arg & (in.width - 1)); break;
      case kUp: src = pos >= in.arg ? l - in.arg : l; break;
      case kDown: src = pos + in.arg < in.width ? l + in.arg : l; break;
      default: src = seg + ((pos ^ in.arg) & (in.width - 1)); break;
    }
    if (!(mask & (1u << src))) {
      char m[120];
      std::snprintf(m, sizeof(m), "__shfl_sync: lane %d reads lane %d, which is not in mask 0x%08x", l, src, mask);
      fail(m);
    }
    std::memcpy(w.out[l], slot_in<ShflIn>(w, src).value, 16);
  }
}

template <typename T>
inline T shfl(uint32_t mask, T var, int kind, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of an unsupported type");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("__shfl_sync: width must be a power of two in 1..32, got " + std::to_string(width));
  WarpState& w = warp_state();
  ShflIn& in = slot_in<ShflIn>(w, cur().lane);
  std::memcpy(in.value, &var, sizeof(T));
  in.kind = kind;
  in.arg = arg;
  in.width = width;
  warp_collective(shfl_fn, mask, "__shfl_sync", file, line);
  T out;
  std::memcpy(&out, warp_state().out[cur().lane], sizeof(T));
  return out;
}

// ---- votes --------------------------------------------------------------------------------------
inline void ballot_fn(WarpState& w, uint32_t mask) {
  uint32_t b = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && slot_in<int>(w, l)) b |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (mask & (1u << l)) slot_out<uint32_t>(w, l) = b;
}

inline uint32_t ballot(uint32_t mask, int pred, const char* what, const char* file, int line) {
  slot_in<int>(warp_state(), cur().lane) = pred ? 1 : 0;
  warp_collective(ballot_fn, mask, what, file, line);
  return slot_out<uint32_t>(warp_state(), cur().lane);
}

inline void syncwarp_fn(WarpState&, uint32_t) {}
inline void syncwarp(const char* file, int line, uint32_t mask = 0xffffffffu) {
  warp_collective(syncwarp_fn, mask, "__syncwarp", file, line);
}

inline uint32_t activemask() {
  Launch& L = *g_launch;
  const Fiber& f = cur();
  uint32_t m = 0;
  for (int l = 0; l < 32; ++l) {
    int i = f.warp * 32 + l;
    if (i < L.nthreads && L.fibers[i].state != State::Done) m |= 1u << l;
  }
  return m;
}

// ---- cp.async (deferred until the wait, so a missing wait reads stale shared memory) --------------
// The global source is bounds-checked when the copy is issued (common/gmem.h), if it reads anything.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (src_bytes > 0) check_access(src, size_t(src_bytes), "cp.async global read");
  cur().cp_groups.back().push_back({dst, src, bytes, src_bytes});
}
inline void cp_async_commit() { cur().cp_groups.emplace_back(); }
inline void cp_async_wait(int n) {  // all but the n most recent committed groups complete
  auto& g = cur().cp_groups;
  const int committed = int(g.size()) - 1;
  for (int i = 0; i < committed - n; ++i) run_cp_async(g[i]);
  if (committed - n > 0) g.erase(g.begin(), g.begin() + (committed - n));
}

inline unsigned char* dynamic_smem() { return g_launch->dyn_smem; }

// ---- warpgroup collectives and blocking waits (used by common/emu_hopper.h) ----------------------
// Every thread of the caller's warpgroup must reach the same collective (same fn); the last one to arrive
// runs fn over all 128 arguments. A block whose size is not a multiple of 128 has no warpgroup for its last
// threads: a collective there fails.
inline void group_collective(GroupFn fn, void* arg, const char* what, const char* file, int line) {
  Launch& L = *g_launch;
  Fiber& f = cur();
  const int gi = f.linear / kWarpgroupThreads;
  if (gi >= int(L.groups.size()))
    fail(std::string(what) + " at " + file + ":" + std::to_string(line) + ": thread " + std::to_string(f.linear) +
         " is in no complete warpgroup (a warpgroup is 128 consecutive threads; the block has " +
         std::to_string(L.nthreads) + ")");
  GroupState& g = L.groups[gi];
  f.wait_site = file;  // also read by fn (the last arriver runs it)
  f.wait_line = line;
  if (g.arrived == 0) {
    g.fn = fn;
    g.what = what;
    g.site = file;
    g.line = line;
  } else if (g.fn != fn) {
    fail("warpgroup collectives do not match: thread " + std::to_string(f.linear) + " is in " + what + " at " +
         file + ":" + std::to_string(line) + " while " + std::to_string(g.arrived) +
         " threads of its warpgroup wait in " +
         g.what + " at " + g.site + ":" + std::to_string(g.line));
  }
  g.args[f.linear % kWarpgroupThreads] = arg;
  if (++g.arrived == kWarpgroupThreads) {
    g.arrived = 0;
    fn(g.args);
    const int first = gi * kWarpgroupThreads;
    for (int i = first; i < first + kWarpgroupThreads; ++i)
      if (i != f.linear) make_ready(i);
    f.state = State::Ready;
    L.ready.push_back(f.linear);
  } else {
    f.state = State::GroupWait;
    f.wait_site = file;
    f.wait_line = line;
    f.wait_what = what;
  }
  yield_to_scheduler();
}

// Suspend the calling thread until another thread calls wake(key); `what` describes the wait in a deadlock
// report (every thread blocked: the launch fails naming it). The caller re-checks its condition after.
inline void block_on(const void* key, std::string what, const char* file, int line) {
  Fiber& f = cur();
  f.state = State::CondWait;
  f.wait_key = key;
  f.wait_what = std::move(what);
  f.wait_site = file;
  f.wait_line = line;
  yield_to_scheduler();
}

inline void wake(const void* key) {
  Launch& L = *g_launch;
  for (auto& g : L.fibers)
    if (g.state == State::CondWait && g.wait_key == key) {
      g.wait_key = nullptr;
      make_ready(g.linear);
    }
}

// Requeue the calling thread and give control to the scheduler: after an arrival (mbarrier or named barrier),
// the threads it released may run before the caller's next instruction, as on a GPU.
inline void reschedule() {
  Fiber& f = cur();
  f.state = State::Ready;
  g_launch->ready.push_back(f.linear);
  yield_to_scheduler();
}

// bar.sync id, count (wait = true) / bar.arrive id, count: see the file comment. The caller is requeued after
// an arrive too, so the order in which threads continue is the scheduler's.
inline void named_barrier(int id, int count, bool wait, const char* file, int line) {
  Launch& L = *g_launch;
  Fiber& f = cur();
  const std::string what = std::string(wait ? "bar.sync " : "bar.arrive ") + std::to_string(id) + ", " +
                           std::to_string(count);
  if (id < 1 || id >= kNamedBarriers)
    fail(what + " at " + file + ":" + std::to_string(line) + ": named barrier ids are 1..15 (0 is __syncthreads')");
  if (count < 32 || count % 32 || count > L.nthreads)
    fail(what + " at " + file + ":" + std::to_string(line) + ": the thread count must be a multiple of 32 and at "
         "most the block's " + std::to_string(L.nthreads) + " threads");
  NamedBarrier& b = L.named[id];
  if (b.arrived == 0) {
    b.count = count;
    b.site = file;
    b.line = line;
  } else if (b.count != count) {
    fail(what + " at " + file + ":" + std::to_string(line) + ": the phase was opened with a count of " +
         std::to_string(b.count) + " (at " + b.site + ":" + std::to_string(b.line) + "); every arrival of a phase "
         "gives the same count");
  }
  ++b.warp_arrived[f.warp];
  if (++b.arrived == b.count) {
    for (size_t w = 0; w < L.warps.size(); ++w) {
      const int lanes = __builtin_popcount(L.warps[w].exists);
      if (b.warp_arrived[w] % lanes)
        fail(what + " at " + file + ":" + std::to_string(line) + ": the phase completed with " +
             std::to_string(b.warp_arrived[w]) + " arrivals from warp " + std::to_string(w) + " (bar.sync / "
             "bar.arrive are .aligned: every thread of a warp executes them, the warp counts as " +
             std::to_string(lanes) + ")");
      b.warp_arrived[w] = 0;
    }
    b.arrived = 0;
    ++b.phase;
    wake(&b);
  } else if (wait) {
    const uint64_t phase = b.phase;
    while (b.phase == phase) block_on(&b, what, file, line);
    return;
  }
  reschedule();
}

}  // namespace tf::emu

// ---- builtins -----------------------------------------------------------------------------------
#define threadIdx (::tf::emu::cur().tid)
#define blockIdx (::tf::emu::g_launch->block_idx)
#define blockDim (::tf::emu::g_launch->block)
#define gridDim (::tf::emu::g_launch->grid)

#define __syncthreads() ::tf::emu::block_barrier(__FILE__, __LINE__, 0, 0)
#define __syncthreads_count(p) ::tf::emu::block_barrier(__FILE__, __LINE__, 1, (p))
#define __syncthreads_and(p) ::tf::emu::block_barrier(__FILE__, __LINE__, 2, (p))
#define __syncthreads_or(p) ::tf::emu::block_barrier(__FILE__, __LINE__, 3, (p))
#define __syncwarp(...) ::tf::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

#define __shfl_sync(mask, var, lane, ...) ::tf::emu::shfl((mask), (var), ::tf::emu::kIdx, (lane), TF_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, d, ...) ::tf::emu::shfl((mask), (var), ::tf::emu::kUp, (d), TF_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, d, ...) ::tf::emu::shfl((mask), (var), ::tf::emu::kDown, (d), TF_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, m, ...) ::tf::emu::shfl((mask), (var), ::tf::emu::kXor, (m), TF_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define TF_EMU_WIDTH(...) (32 __VA_OPT__(* 0 + (__VA_ARGS__)))

#define __ballot_sync(mask, p) ::tf::emu::ballot((mask), (p), "__ballot_sync", __FILE__, __LINE__)
#define __any_sync(mask, p) (::tf::emu::ballot((mask), (p), "__any_sync", __FILE__, __LINE__) != 0u)
#define __all_sync(mask, p) (::tf::emu::ballot((mask), !(p), "__all_sync", __FILE__, __LINE__) == 0u)
#define __activemask() ::tf::emu::activemask()

#define __trap() ::tf::emu::fail("__trap() called")
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
#define __threadfence_block() std::atomic_thread_fence(std::memory_order_seq_cst)

// Atomics: blocks and threads run on one OS thread and switch only at barriers, so plain
// read-modify-write is atomic here. The order in which different blocks' atomics land follows the block
// order (random under the random schedule). On global memory (tf::gptr) the access is bounds-checked.
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
inline unsigned atomicInc(unsigned* p, unsigned lim) { unsigned old = *p; *p = old >= lim ? 0 : old + 1; return old; }
template <typename T> inline T atomicAdd(tf::emu::GPtr<T> p, T v) { return atomicAdd(&*p, v); }
template <typename T> inline T atomicSub(tf::emu::GPtr<T> p, T v) { return atomicSub(&*p, v); }
template <typename T> inline T atomicMax(tf::emu::GPtr<T> p, T v) { return atomicMax(&*p, v); }
template <typename T> inline T atomicMin(tf::emu::GPtr<T> p, T v) { return atomicMin(&*p, v); }
template <typename T> inline T atomicExch(tf::emu::GPtr<T> p, T v) { return atomicExch(&*p, v); }
template <typename T> inline T atomicCAS(tf::emu::GPtr<T> p, T cmp, T v) { return atomicCAS(&*p, cmp, v); }

// Math and bit intrinsics (the fast-math variants are exact here; tolerances cover the difference).
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
using std::exp2f;
using std::fmaxf;
using std::fminf;
