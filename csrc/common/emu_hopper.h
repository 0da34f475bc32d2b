// Host emulation of the sm_90 asynchronous machinery behind the wrappers of common/ptx_sm90.cuh: shared-memory
// addresses and matrix descriptors, mbarriers, TMA loads / stores through a tensor map, and the per-thread
// bookkeeping of in-flight wgmma and bulk-store groups. Included by common/ptx_sm90.cuh under
// TILEFORMER_EMULATE only.
//
// Semantics (PTX ISA: "mbarrier", "cp.async.bulk.tensor", "Asynchronous Warpgroup Level Matrix Shared Memory
// Layout" / "Matrix Descriptor Format"):
//   * Shared-memory addresses are byte offsets from the launch's dynamic shared memory (1024-byte aligned, so
//     swizzle patterns fall as on a GPU); operands of wgmma descriptors and TMA live there.
//   * An mbarrier has an expected arrival count, pending arrivals and a transaction count; its current phase
//     completes when both pending arrivals and tx-count are 0: the phase flips, pending arrivals reset.
//     try_wait.parity(P) succeeds once the phase with parity P has completed, i.e. while the current phase's
//     parity differs from P (so parity 1 succeeds at once on a fresh barrier). A waiting thread is suspended
//     until the phase completes; if it never does, the launch fails with the deadlock report. An arrival is a
//     scheduling point: the threads it releases may run before the arriving thread's next instruction (so a
//     stage released before the wgmma reading it retired is refilled while the read is in flight: an error).
//   * A TMA load is recorded on its mbarrier and lands (copy, zero fill, complete_tx of the full box bytes)
//     when a thread waits on that barrier: shared memory read before the wait shows the 0xFF poison.
//   * A TMA store lands at the cp.async.bulk.wait_group that retires its bulk group (never without one).
//   * wgmma results are written to the accumulator registers at the wgmma.wait_group that retires their
//     group; a chain of wgmmas on the same accumulator in flight uses the latest pending value as its input.
//     The shared memory a wgmma reads stays in use until every thread of its warpgroup has retired it: a TMA
//     load issued into it before then fails (the hardware may still be reading it).
#pragma once

#ifndef TILEFORMER_EMULATE
#error "common/emu_hopper.h is part of the host emulation"
#endif

#include <unordered_map>

#include "common/tma.h"

namespace tf::emu {

// ---- shared-memory addresses ---------------------------------------------------------------------

inline uint32_t smem_addr(const void* p, const char* what) {
  const Launch& L = *g_launch;
  const ptrdiff_t off = static_cast<const unsigned char*>(p) - L.dyn_smem;
  if (off < 0 || size_t(off) >= L.dyn_smem_bytes)
    fail(std::string(what) + ": the address is not in the launch's dynamic shared memory (TF_DYNAMIC_SMEM)");
  return uint32_t(off);
}

inline unsigned char* smem_at(uint32_t addr, size_t bytes, const char* what) {
  if (size_t(addr) + bytes > g_launch->dyn_smem_bytes) {
    char m[200];
    std::snprintf(m, sizeof(m), "%s: shared-memory bytes [%u, %zu) are past the end of the dynamic shared memory "
                  "(%zu bytes)", what, addr, size_t(addr) + bytes, g_launch->dyn_smem_bytes);
    fail(m);
  }
  return g_launch->dyn_smem + addr;
}

// ---- wgmma matrix descriptors ----------------------------------------------------------------------

// Byte address of element (mn, k), k < 16, of a 16-bit wgmma operand (A: mn = row m; B: mn = column n) as
// the hardware forms it from the descriptor (canonical layouts of the PTX ISA, T = 8 elements per 16 bytes):
//   K-major,  no swizzle: ((8,m),(T,2)) : ((16 B, SBO), (2 B, LBO))
//   K-major,  swizzle W:  ((8,m),(T,2)) : ((W, SBO), (2 B, 16 B))           (LBO unused)
//   MN-major, no swizzle: ((T,m),(8,2)) : ((2 B, SBO), (16 B, LBO))
//   MN-major, swizzle W:  ((W/2,m),(8,2)) : ((2 B, LBO), (W, SBO))
// then the swizzle of the mode (bits [4,7) ^ [7,10) for 128 B, ...) on the resulting address.
inline uint32_t wgmma_elem_addr(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const int code = int(desc >> 62);  // 0 none, 1 128 B, 2 64 B, 3 32 B
  const Swizzle sw = code == 0 ? Swizzle::none : code == 1 ? Swizzle::b128 : code == 2 ? Swizzle::b64 : Swizzle::b32;
  const uint32_t W = uint32_t(swizzle_span(sw));
  uint32_t off;
  if (!mn_major) {
    off = sw == Swizzle::none ? (mn % 8) * 16 + (mn / 8) * sbo + (k / 8) * lbo + (k % 8) * 2
                              : (mn % 8) * W + (mn / 8) * sbo + k * 2;
  } else {
    off = sw == Swizzle::none ? (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                              : (mn % (W / 2)) * 2 + (mn / (W / 2)) * lbo + (k % 8) * W + (k / 8) * sbo;
  }
  return swizzle_addr(start + off, sw);
}

inline void check_wgmma_desc(uint64_t desc, const char* which) {
  // reserved bits: 14-15, 30-31, 46-48, 52-61; the matrix base offset (49-51) is not emulated
  const uint64_t reserved = (uint64_t(3) << 14) | (uint64_t(3) << 30) | (uint64_t(7) << 46) | (uint64_t(0x3FF) << 52);
  if (desc & reserved) fail(std::string("wgmma.mma_async: reserved bits set in the descriptor of ") + which);
  if ((desc >> 49) & 7)
    fail(std::string("wgmma.mma_async: a non-zero matrix base offset (descriptor of ") + which +
         ") is not emulated; start swizzled tiles at a multiple of the pattern size");
}

// ---- per-thread state of asynchronous groups -------------------------------------------------------

struct PendingAcc {
  float* d;          // the thread's accumulator registers
  int n;
  uint64_t read_id;  // its shared-memory operands (InflightRead)
  float v[128];
};

// The shared memory [lo, hi) (A, B) one wgmma of a warpgroup reads, in use until all 128 threads retired it.
struct InflightRead {
  uint64_t id, serial;
  uint32_t lo[2], hi[2];
  int remaining;
  const char* file;
  int line;
};

inline std::vector<InflightRead>& inflight_reads() {
  static thread_local std::vector<InflightRead> v;
  return v;
}

inline uint64_t add_inflight_read(const uint32_t* lo, const uint32_t* hi) {
  static thread_local uint64_t next = 0;
  auto& v = inflight_reads();
  std::erase_if(v, [](const InflightRead& r) { return r.serial != g_launch->block_serial; });
  const Fiber& f = cur();
  v.push_back({++next, g_launch->block_serial, {lo[0], lo[1]}, {hi[0], hi[1]}, kWarpgroupThreads, f.wait_site,
               f.wait_line});
  return next;
}

inline void retire_inflight_read(uint64_t id) {
  auto& v = inflight_reads();
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i].id == id) {
      if (--v[i].remaining == 0) v.erase(v.begin() + i);
      return;
    }
}

inline void check_no_inflight_read(uint32_t lo, uint32_t hi, const char* what) {
  for (const InflightRead& r : inflight_reads()) {
    if (r.serial != g_launch->block_serial) continue;
    for (int j = 0; j < 2; ++j)
      if (lo < r.hi[j] && r.lo[j] < hi) {
        char m[320];
        std::snprintf(m, sizeof(m), "%s writes shared memory [%u, %u) that a wgmma.mma_async (issued at %s:%d) still "
                      "reads: not every thread of its warpgroup has passed the wgmma.wait_group retiring it",
                      what, lo, hi, r.file, r.line);
        fail(m);
      }
  }
}

struct TmaXfer {
  TmaDesc desc;
  int coords[kTmaMaxRank];
  uint32_t smem;     // shared-memory address of the box
  int bytes;         // box bytes
};

struct FiberHopper {
  uint64_t serial = 0;
  bool wgmma_fenced = false;
  std::vector<std::vector<PendingAcc>> wgmma_groups = {{}};  // committed groups + the open one (back)
  std::vector<std::vector<TmaXfer>> bulk_groups = {{}};      // TMA stores: committed + open
};

inline FiberHopper& fiber_hopper() {
  static thread_local std::vector<FiberHopper> v(kMaxThreads);
  FiberHopper& h = v[cur().linear];
  if (h.serial != g_launch->block_serial) {
    h = FiberHopper{};
    h.serial = g_launch->block_serial;
  }
  return h;
}

// ---- TMA ---------------------------------------------------------------------------------------------

inline int tma_box_bytes(const TmaDesc& d) {
  int n = d.elem_bytes;
  for (int i = 0; i < d.rank; ++i) n *= d.box[i];
  return n;
}

// Moves one box between global and shared memory (load: global -> shared, zero fill outside the tensor;
// store: shared -> global, elements outside the tensor skipped). Shared memory is addressed through the
// map's swizzle. Global accesses are bounds-checked (common/gmem.h) element by element.
inline void tma_run(const TmaXfer& x, bool load) {
  const TmaDesc& d = x.desc;
  const int eb = d.elem_bytes;
  int64_t idx[kTmaMaxRank] = {};
  const int total = x.bytes / eb;
  for (int e = 0; e < total; ++e) {
    int rem = e;
    bool inside = true;
    int64_t src = 0;
    for (int i = 0; i < d.rank; ++i) {
      idx[i] = rem % d.box[i];
      rem /= d.box[i];
      const int64_t g = int64_t(x.coords[i]) + idx[i];
      if (g < 0 || g >= d.dims[i]) inside = false;
      src += g * d.strides[i];
    }
    unsigned char* s = smem_at(swizzle_addr(x.smem + uint32_t(e * eb), d.swizzle), eb, load ? "TMA load" : "TMA store");
    if (load) {
      if (inside) {
        const unsigned char* gp = static_cast<const unsigned char*>(d.base) + src;
        check_access(gp, eb, "TMA load global read");
        std::memcpy(s, gp, eb);
      } else {
        std::memset(s, 0, eb);
      }
    } else if (inside) {
      unsigned char* gp = const_cast<unsigned char*>(static_cast<const unsigned char*>(d.base)) + src;
      check_access(gp, eb, "TMA store global write");
      std::memcpy(gp, s, eb);
    }
  }
}

inline TmaXfer tma_xfer(const TmaDesc* desc, const int* coords, int rank, const void* smem, const char* what) {
  if (desc->rank != rank)
    fail(std::string(what) + ": the tensor map has rank " + std::to_string(desc->rank) + ", the instruction " +
         std::to_string(rank));
  TmaXfer x;
  x.desc = *desc;
  for (int i = 0; i < kTmaMaxRank; ++i) x.coords[i] = i < rank ? coords[i] : 0;
  x.smem = smem_addr(smem, what);
  if (x.smem & 127) fail(std::string(what) + ": the shared-memory box must be 128-byte aligned");
  x.bytes = tma_box_bytes(*desc);
  smem_at(x.smem, x.bytes, what);
  return x;
}

// ---- mbarrier ----------------------------------------------------------------------------------------

struct Mbar {
  uint64_t serial = 0;           // block that initialised it
  int expected = 0, pending = 0; // arrivals per phase / still missing in the current phase
  int64_t tx = 0;                // transaction count (bytes expected minus bytes landed)
  uint64_t phase = 0;            // phases completed
  std::vector<TmaXfer> loads;    // TMA loads signalling this barrier, not landed yet
};

inline std::unordered_map<const void*, Mbar>& mbar_table() {
  static thread_local std::unordered_map<const void*, Mbar> t;
  return t;
}

inline Mbar& mbar(const void* bar, const char* what) {
  auto it = mbar_table().find(bar);
  if (it == mbar_table().end() || it->second.serial != g_launch->block_serial)
    fail(std::string(what) + ": the mbarrier was not initialised (mbarrier.init) in this block");
  return it->second;
}

inline void mbar_complete_if_done(const void* bar, Mbar& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
    wake(bar);
  }
}

inline std::string mbar_state(const void* bar) {
  auto it = mbar_table().find(bar);
  if (it == mbar_table().end()) return "mbarrier not initialised";
  const Mbar& m = it->second;
  char s[160];
  std::snprintf(s, sizeof(s), "phase %llu: %d of %d arrivals pending, tx-count %lld",
                static_cast<unsigned long long>(m.phase), m.pending, m.expected, static_cast<long long>(m.tx));
  return s;
}

inline void mbarrier_init(void* bar, int count) {
  g_wait_state = mbar_state;
  if (reinterpret_cast<uintptr_t>(bar) & 7) fail("mbarrier.init: the mbarrier must be 8-byte aligned");
  if (count < 1 || count >= (1 << 20))
    fail("mbarrier.init: count must be in 1 .. 2^20 - 1, got " + std::to_string(count));
  auto& table = mbar_table();
  if (table.size() > 4096)  // barriers of finished blocks (keyed by addresses of past launches)
    for (auto it = table.begin(); it != table.end();)
      it = it->second.serial != g_launch->block_serial ? table.erase(it) : std::next(it);
  Mbar& m = table[bar];
  m = Mbar{};
  m.serial = g_launch->block_serial;
  m.expected = m.pending = count;
}

inline void mbarrier_arrive(void* bar, int count) {
  Mbar& m = mbar(bar, "mbarrier.arrive");
  if (count > m.pending)
    fail("mbarrier.arrive: " + std::to_string(count) + " arrival(s) but only " + std::to_string(m.pending) +
         " of " + std::to_string(m.expected) + " pending in the current phase (tx-count " + std::to_string(m.tx) + ")");
  m.pending -= count;
  mbar_complete_if_done(bar, m);
  reschedule();   // a released waiter (the producer refilling a stage) may run before the arriver's next step
}

inline void mbarrier_expect_tx(void* bar, uint32_t bytes) { mbar(bar, "mbarrier.expect_tx").tx += bytes; }

inline void mbar_land_loads(const void* bar, Mbar& m) {
  std::vector<TmaXfer> loads = std::move(m.loads);
  m.loads.clear();
  for (const TmaXfer& x : loads) {
    tma_run(x, true);
    m.tx -= x.bytes;
    mbar_complete_if_done(bar, m);
  }
}

inline bool mbarrier_try_wait_parity(void* bar, uint32_t parity, const char* file, int line) {
  for (;;) {
    Mbar& m = mbar(bar, "mbarrier.try_wait.parity");
    if (!m.loads.empty()) mbar_land_loads(bar, m);
    if ((m.phase & 1) != (parity & 1)) return true;
    block_on(bar, "mbarrier.try_wait.parity " + std::to_string(parity & 1), file, line);
  }
}

inline void tma_load(void* smem, const TmaDesc* desc, const int* coords, int rank, void* bar) {
  TmaXfer x = tma_xfer(desc, coords, rank, smem, "cp.async.bulk.tensor load");
  check_no_inflight_read(x.smem, x.smem + uint32_t(x.bytes), "cp.async.bulk.tensor load");
  mbar(bar, "cp.async.bulk.tensor load").loads.push_back(x);
  wake(bar);  // threads already waiting on the barrier land it
}

inline void tma_store(const TmaDesc* desc, const int* coords, int rank, const void* smem) {
  fiber_hopper().bulk_groups.back().push_back(tma_xfer(desc, coords, rank, smem, "cp.async.bulk.tensor store"));
}

inline void bulk_commit() { fiber_hopper().bulk_groups.emplace_back(); }

inline void bulk_wait(int n) {  // all but the n most recent committed groups complete
  auto& g = fiber_hopper().bulk_groups;
  const int retire = int(g.size()) - 1 - n;
  for (int i = 0; i < retire; ++i)
    for (const TmaXfer& x : g[i]) tma_run(x, false);
  if (retire > 0) g.erase(g.begin(), g.begin() + retire);
}

// ---- wgmma groups ------------------------------------------------------------------------------------

// The value an accumulator has for the next wgmma: the newest in-flight result for it, else the registers.
inline void wgmma_acc_in(const float* d, int n, float* out) {
  auto& groups = fiber_hopper().wgmma_groups;
  for (auto g = groups.rbegin(); g != groups.rend(); ++g)
    for (auto p = g->rbegin(); p != g->rend(); ++p)
      if (p->d == d) {
        std::memcpy(out, p->v, sizeof(float) * n);
        return;
      }
  std::memcpy(out, d, sizeof(float) * n);
}

inline void wgmma_wait(int n) {
  FiberHopper& h = fiber_hopper();
  auto& g = h.wgmma_groups;
  const int retire = int(g.size()) - 1 - n;
  for (int i = 0; i < retire; ++i)
    for (const PendingAcc& p : g[i]) {
      std::memcpy(p.d, p.v, sizeof(float) * p.n);
      retire_inflight_read(p.read_id);
    }
  if (retire > 0) g.erase(g.begin(), g.begin() + retire);
  h.wgmma_fenced = false;  // registers may be touched now: the next wgmma needs a wgmma.fence
}

}  // namespace tf::emu

#undef __grid_constant__
#define __grid_constant__
