// Stand-in for Gloo's <gloo/transport/device.h>: the PyTorch wheel ships no
// Gloo headers (see gloo/context.h for why these stand-ins are sound).
#pragma once
namespace gloo {
namespace transport {
// Only ever held through std::shared_ptr (ProcessGroupGloo::Options::devices).
class Device;
// Held by std::unique_ptr members of ProcessGroupGloo::SendWork/RecvWork;
// complete (but empty) so that their implicit destructors compile.
class UnboundBuffer {
 public:
  virtual ~UnboundBuffer() = default;
};
} // namespace transport
} // namespace gloo
