// Helpers shared by the kernel tests (unit and stress): random records with
// deliberately misaligned views, and the list of ISAs this CPU can run.
#pragma once

#include <strata/kernels/cast.h>
#include <strata/kernels/optimizer.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace strata::kernels::testing {

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// SIMD variants this CPU (and OS) can run.
inline std::vector<Isa> simd_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (isa_supported(isa)) {
      out.push_back(isa);
    }
  }
  return out;
}

// A byte buffer with a view starting `offset_bytes` past a 64-byte boundary.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, size_t offset_bytes) : storage_(bytes + offset_bytes + 128, 0) {
    const auto base = reinterpret_cast<uintptr_t>(storage_.data());
    const size_t align = (64 - base % 64) % 64;
    view_ = storage_.data() + align + offset_bytes;
    bytes_ = bytes;
  }
  // Copies content into an identically laid-out buffer.
  Buffer(const Buffer& other) : Buffer(other.bytes_, other.offset_bytes()) {
    if (bytes_ > 0) {
      std::memcpy(view_, other.view_, bytes_);
    }
  }
  Buffer& operator=(const Buffer& other) {
    if (this != &other) {
      Buffer copy(other);
      std::swap(storage_, copy.storage_);
      std::swap(view_, copy.view_);
      std::swap(bytes_, copy.bytes_);
    }
    return *this;
  }
  void* data() { return view_; }
  const void* data() const { return view_; }
  float* f32() { return reinterpret_cast<float*>(view_); }
  uint16_t* u16() { return reinterpret_cast<uint16_t*>(view_); }
  size_t bytes() const { return bytes_; }
  bool same_bytes(const Buffer& o) const {
    return bytes_ == o.bytes_ && (bytes_ == 0 || std::memcmp(view_, o.view_, bytes_) == 0);
  }
  size_t offset_bytes() const {
    return view_ == nullptr ? 0 : size_t(reinterpret_cast<uintptr_t>(view_) % 64);
  }

 private:
  std::vector<unsigned char> storage_;
  unsigned char* view_ = nullptr;
  size_t bytes_ = 0;
};

// Fills a gradient buffer of dtype with values ~ N(0, scale), plus a few
// exact zeros, tiny values (fp16 denormals) and negative zeros.
inline void fill_grad(Buffer& b, DType dtype, size_t n, std::mt19937_64& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  for (size_t i = 0; i < n; ++i) {
    float x = normal(rng);
    const uint64_t r = rng() % 64;
    if (r == 0) {
      x = 0.0f;
    } else if (r == 1) {
      x = -0.0f;
    } else if (r == 2) {
      x = 3e-6f * normal(rng);
    }
    switch (dtype) {
      case DType::kF32:
        b.f32()[i] = x;
        break;
      case DType::kBF16:
        b.u16()[i] = float_to_bf16_bits(x);
        break;
      case DType::kF16:
        b.u16()[i] = float_to_fp16_bits(x);
        break;
    }
  }
}

// One optimizer record: slots, gradient and copy-out destinations, every
// array at its own misalignment.
struct Record {
  size_t n = 0;
  int slots = 0;
  Buffer slot[4];
  Buffer grad;
  DType grad_dtype = DType::kF32;
  std::vector<Buffer> outs;
  std::vector<CopyOut> copy_out;

  StateView view() {
    StateView v;
    for (int s = 0; s < slots; ++s) {
      v.slot[s] = slot[s].f32();
    }
    v.n = n;
    return v;
  }
  // Re-point copy_out at this record's own buffers (after a copy).
  void bind_outs() {
    for (size_t i = 0; i < copy_out.size(); ++i) {
      copy_out[i].dst = outs[i].data();
    }
  }
};

inline Record make_record(const OptimizerHyper& hyper, size_t n, DType grad_dtype, DType out_dtype,
                          std::mt19937_64& rng, bool with_copy_out) {
  Record r;
  r.n = n;
  r.slots = state_slots(hyper);
  r.grad_dtype = grad_dtype;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto offset = [&rng](size_t elem) { return size_t(rng() % 16) * elem; };
  for (int s = 0; s < r.slots; ++s) {
    r.slot[s] = Buffer(n * 4, offset(4));
    float* x = r.slot[s].f32();
    for (size_t i = 0; i < n; ++i) {
      if (s == 0) {
        x[i] = normal(rng);
      } else if (hyper.kind == OptimizerKind::kAdagrad || s >= 2) {
        const float y = 0.01f * normal(rng);
        x[i] = y * y + (hyper.kind == OptimizerKind::kAdagrad ? 0.1f : 0.0f);  // v, max_v, sum >= 0
      } else {
        x[i] = 0.01f * normal(rng);
      }
    }
  }
  if (hyper.kind == OptimizerKind::kAdam || hyper.kind == OptimizerKind::kAdamW) {
    if (hyper.amsgrad) {  // max_v >= v mostly, below it sometimes
      for (size_t i = 0; i < n; ++i) {
        r.slot[3].f32()[i] = r.slot[2].f32()[i] * ((rng() % 3) == 0 ? 0.5f : 1.5f);
      }
    }
  }
  r.grad = Buffer(n * dtype_size(grad_dtype), offset(dtype_size(grad_dtype)));
  fill_grad(r.grad, grad_dtype, n, rng, 0.1f);
  if (with_copy_out && n > 0) {
    // Ranges covering most of the record with gaps, some tiny.
    size_t pos = rng() % 3;
    while (pos < n) {
      const size_t len = std::min(n - pos, size_t(1 + rng() % (rng() % 4 == 0 ? 5 : 200)));
      CopyOut c;
      c.offset = pos;
      c.n = len;
      r.outs.emplace_back(len * dtype_size(out_dtype), offset(dtype_size(out_dtype)));
      r.copy_out.push_back(c);
      pos += len + (rng() % 4 == 0 ? rng() % 7 : 0);
    }
    r.bind_outs();
  }
  return r;
}

// Returns "" when every slot and copy-out buffer of a and b are bit-identical,
// else a description of the first difference.
inline std::string first_difference(const Record& a, const Record& b) {
  for (int s = 0; s < a.slots; ++s) {
    if (!a.slot[s].same_bytes(b.slot[s])) {
      const float* x = reinterpret_cast<const float*>(a.slot[s].data());
      const float* y = reinterpret_cast<const float*>(b.slot[s].data());
      for (size_t i = 0; i < a.n; ++i) {
        if (bits_of(x[i]) != bits_of(y[i])) {
          char text[160];
          std::snprintf(text, sizeof(text), "slot %d element %zu: %.9g (0x%08x) vs %.9g (0x%08x)",
                        s, i, double(x[i]), unsigned(bits_of(x[i])), double(y[i]),
                        unsigned(bits_of(y[i])));
          return text;
        }
      }
    }
  }
  for (size_t k = 0; k < a.outs.size(); ++k) {
    if (!a.outs[k].same_bytes(b.outs[k])) {
      return "copy_out " + std::to_string(k) + " (offset " + std::to_string(a.copy_out[k].offset) +
             ", n " + std::to_string(a.copy_out[k].n) + ") differs";
    }
  }
  return "";
}

}  // namespace strata::kernels::testing
