// Stand-in for Gloo's <gloo/rendezvous/store.h>: the PyTorch wheel ships no
// Gloo headers (see gloo/context.h for why these stand-ins are sound).
// ProcessGroupGloo::GlooStore (inline in the header) derives from this class
// and marks these four methods `override`.  GLOO_STORE_HAS_STORE_V2 is left
// undefined, so the header skips its v2 overrides.
#pragma once
#include <chrono>
#include <string>
#include <vector>
namespace gloo {
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) = 0;
};
} // namespace rendezvous
} // namespace gloo
