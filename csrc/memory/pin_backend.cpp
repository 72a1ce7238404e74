// mlock pin backend and the process-wide default; see strata/memory/pin_backend.h.
#include <strata/memory/pin_backend.h>

#include <mutex>
#include <string>

#include <strata/platform/meminfo.h>
#include <strata/platform/vm.h>

namespace strata::memory {

namespace {

class MlockPinBackend final : public PinBackend {
 public:
  const char* name() const override { return "mlock"; }
  bool uses_memlock() const override { return true; }
  Status pin(void* addr, size_t bytes) override {
    int r = platform::lock_memory(addr, bytes);
    if (r != 0) {
      return Status::from_errno(r, "mlock " + platform::format_bytes(bytes));
    }
    return Status::Ok();
  }
  Status unpin(void* addr, size_t bytes) override {
    int r = platform::unlock_memory(addr, bytes);
    if (r != 0) {
      return Status::from_errno(r, "munlock " + platform::format_bytes(bytes));
    }
    return Status::Ok();
  }
};

std::mutex g_default_mu;
std::shared_ptr<PinBackend> g_default;

}  // namespace

std::shared_ptr<PinBackend> mlock_pin_backend() {
  static const std::shared_ptr<PinBackend> kMlock = std::make_shared<MlockPinBackend>();
  return kMlock;
}

std::shared_ptr<PinBackend> default_pin_backend() {
  std::lock_guard<std::mutex> lock(g_default_mu);
  return g_default ? g_default : mlock_pin_backend();
}

void set_default_pin_backend(std::shared_ptr<PinBackend> backend) {
  std::lock_guard<std::mutex> lock(g_default_mu);
  g_default = std::move(backend);
}

}  // namespace strata::memory
