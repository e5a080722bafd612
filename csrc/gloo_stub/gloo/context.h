// Stand-in for Gloo's <gloo/context.h>, for csrc/c10d_shim.cpp only.
//
// Why this folder exists: the PyTorch wheel ships no Gloo headers (there is no
// torch/include/gloo), yet torch/csrc/distributed/c10d/ProcessGroupGloo.hpp
// includes <gloo/algorithm.h>, <gloo/common/error.h>, <gloo/context.h>,
// <gloo/rendezvous/store.h> and <gloo/transport/device.h>.  These files declare
// only what that header needs to *parse*.  That is sound because
//   - Gloo types appear in ProcessGroupGloo's layout only behind
//     std::shared_ptr / std::unique_ptr, whose size does not depend on the
//     pointee, so the layout the shim sees matches the library's;
//   - the shim never constructs, calls or deletes a Gloo object: it passes
//     shared_ptrs made by libtorch_cpu back to libtorch_cpu, and calls only
//     exported members of c10d classes;
//   - the shim's object file references no gloo:: symbol (check with
//     `nm -C --undefined-only`), so nothing declared here needs a definition.
// If a future ProcessGroupGloo.hpp uses more of Gloo inline, the build fails
// loudly here rather than miscompiling.  The alternative would be vendoring
// pytorch/gloo's headers at the commit pinned by that PyTorch, plus a generated
// gloo/config.h.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  // Referenced only from the inline ProcessGroupGloo::setTimeout, which the
  // shim never calls (declared, never defined: a call would fail to link).
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
