// The param store as the binding holds it: shared, so an Engine created over
// it (and every staging buffer handed to Python) keeps it alive.
#pragma once

#include <memory>

#include <strata/tiers/param_store.h>

namespace strata::pybind {

struct PyParamStore {
  std::shared_ptr<tiers::ParamStore> store;
};

}  // namespace strata::pybind
