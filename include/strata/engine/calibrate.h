// strata/engine/calibrate.h — short measurements of this machine's rates for
// the performance model (when no strata.hardware_profile is given).
//
// calibrate() measures, each in well under a second:
// - the CPU update rate: kernels::optimizer_step (AdamW) on a few tens of MB
//   of resident state with the engine's thread count, fp32 and bf16
//   gradients, and with one thread (the backward-time pool);
// - XXH3 (the swap file's checksums) and the gradient-statistics kernel;
// - NVMe read, write and mixed read+write rates on the swap directory
//   from buffers of a PinnedPool made like the engine's:
//   a temporary SwapFile (O_DIRECT when the file system allows it) written
//   and read back through the same IoEngine, block size and queue depth the
//   engine uses (reads are of extents written just before: reading
//   fallocated, never-written extents returns zeros without touching the
//   device and would overstate the rate);
// - GPU rates (pinned H2D/D2H, CUDA AdamW, free memory) when this build has
//   CUDA and a device answers; otherwise the profile says "no GPU" and why.
// Every figure's origin is recorded in HardwareProfile::sources. Results are
// medians of repeated runs; a noisy machine shows in `spread` notes.
//
// Ownership: temporary files are removed before returning (also on error).
// Thread-safety: may run concurrently with other work (it competes for it).
#pragma once

#include <cstddef>
#include <string>

#include <strata/config.h>
#include <strata/engine/perf_model.h>
#include <strata/status.h>

namespace strata::engine {

// The fields named after a config key default to the schema's.
struct CalibrationOptions {
  std::string swap_dir;               // "" : no NVMe measurement
  size_t io_bytes = 128u << 20;       // bytes per NVMe pass (a multiple of 4096)
  size_t io_chunk_bytes = 16u << 20;  // extent size (the engine moves whole records)
  size_t block_size = size_t(default_engine_config().aio.block_size);        // aio.block_size
  unsigned queue_depth = unsigned(default_engine_config().aio.queue_depth);  // aio.queue_depth
  unsigned intra_op_parallelism = unsigned(default_engine_config().aio.intra_op_parallelism);
  unsigned threads = unsigned(default_engine_config().strata.threads);  // strata.threads (0: all)
  size_t cpu_numel = 4u << 20;    // elements of resident state for the kernel
  double seconds_per_test = 0.2;  // each CPU test repeats for about this long
  unsigned io_repeats = 2;        // NVMe passes per direction (median)
  // offload_optimizer.pin_memory (buffers as the engine's pool makes them)
  bool pin = default_engine_config().zero.offload.pin_memory;
  bool gpu = true;  // measure PCIe copies and the CUDA AdamW when a device is there
};

// swap_dir from offload_optimizer.nvme_path, aio.*, strata.threads.
CalibrationOptions calibration_options_from_config(const Config& config);

Result<HardwareProfile> calibrate(const CalibrationOptions& options);

}  // namespace strata::engine
