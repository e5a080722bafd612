// A small extern "C" surface over PyTorch's own c10d: a TCPStore for the
// rendezvous and a ProcessGroupGloo for the collectives, both exported by the
// wheel's libtorch_cpu.so.  Replicas use it to exchange a few bytes per step
// (src/replicas/c10d.rs is the only caller).
//
// Invariant: no C++ exception crosses the boundary.  Every entry point catches
// everything and returns an error code plus a message in the caller's buffer.
//
// Built by build.rs: -std=c++17 -DUSE_C10D_GLOO (ProcessGroupGloo.hpp is empty
// without it), -D_GLIBCXX_USE_CXX11_ABI=<the wheel's>, the wheel's include
// folders, and csrc/gloo_stub (the wheel ships no Gloo headers).  Linked to
// libtorch_cpu and libc10.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Logging.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

// Return codes, mirrored in src/replicas/c10d.rs.
constexpr int C10D_OK = 0;
constexpr int C10D_ERR = 1; // any failure (message in err)
constexpr int C10D_ERR_TIMEOUT = 2; // the wait ran past the timeout
constexpr int C10D_ERR_ARG = 3; // bad argument (null handle, sizes)

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  int rank;
  int size;
  std::chrono::milliseconds timeout;
};

void put_err(char* err, size_t errlen, const std::string& msg) {
  if (err == nullptr || errlen == 0) {
    return;
  }
  size_t n = std::min(msg.size(), errlen - 1);
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

// c10d and Gloo report timeouts only in words ("Operation timed out!",
// "Timed out after 6 seconds waiting for clients", "The client socket has
// timed out ...").
bool is_timeout(const std::string& msg) {
  return msg.find("imed out") != std::string::npos ||
      msg.find("timeout") != std::string::npos;
}

// Runs f, turning any exception into (code, message).
template <typename F>
int guarded(char* err, size_t errlen, F&& f) {
  try {
    f();
    return C10D_OK;
  } catch (const c10::Error& e) {
    // what() carries a C++ backtrace; the short form is enough here.
    std::string msg = e.what_without_backtrace();
    put_err(err, errlen, msg);
    return is_timeout(msg) ? C10D_ERR_TIMEOUT : C10D_ERR;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    put_err(err, errlen, msg);
    return is_timeout(msg) ? C10D_ERR_TIMEOUT : C10D_ERR;
  } catch (...) {
    put_err(err, errlen, "unknown C++ exception");
    return C10D_ERR;
  }
}

// Python's `import torch` calls c10::initLogging(); a plain libtorch process
// does not, and then TORCH_CPP_LOG_LEVEL is ignored and c10d writes every
// connect retry and failure, with a C++ backtrace, to stderr.  The failures
// reach the caller as errors anyway, so unless the user chose a level, only
// fatal messages are logged.  This sets the level flag rather than the
// environment variable: no setenv racing other threads' getenv, and child
// processes inherit nothing.
void init_logging_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    c10::initLogging(); // reads TORCH_CPP_LOG_LEVEL when it is set
    const char* level = std::getenv("TORCH_CPP_LOG_LEVEL");
    if (level == nullptr || level[0] == '\0') {
      FLAGS_caffe2_log_level = c10::GLOG_FATAL;
      c10::UpdateLoggingLevelsFromFlags();
    }
  });
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1" ||
      addr == "[::1]";
}

// The same device choice as torch's Python binding (GLOO_SOCKET_IFNAME, a
// comma list of interfaces, else the address this host's name resolves to),
// except that a loopback MASTER_ADDR binds Gloo to loopback too: one-node
// jobs then do not depend on the hostname resolving.
std::vector<std::shared_ptr<::gloo::transport::Device>> make_devices(
    const std::string& master_addr) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
  bool lazy = c10d::getDefaultGlooLazyInit();
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname != nullptr && ifname[0] != '\0') {
    std::string s(ifname);
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find(',', start);
      if (end == std::string::npos) {
        end = s.size();
      }
      if (end > start) {
        devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(
            s.substr(start, end - start), lazy));
      }
      start = end + 1;
    }
  } else if (is_loopback(master_addr)) {
    devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1", lazy));
  } else {
    devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice(lazy));
  }
  return devices;
}

} // namespace

extern "C" {

// Connects to the store and forms the Gloo group; blocks until all world_size
// ranks have joined, or about timeout_ms (the store rounds its wait up to
// whole seconds, and a client retries its connect once, so up to about 2x).
//   host_store != 0: this process hosts the TCPStore on master_port (rank 0,
//                    when no launcher hosts it: a hand launch, Slurm, torchrun
//                    with TORCHELASTIC_USE_AGENT_STORE=False)
//   host_store == 0: connect as a client (every rank under torchrun, whose
//                    agent already listens on MASTER_PORT)
//   key_prefix:      namespace for this group's keys in the store (torchrun's
//                    store outlives a worker restart and keeps old keys)
// The TCPStore arguments are the ones Python's _create_c10d_store passes.
// Returns nullptr on failure, with the message in err.
void* mezod_c10d_group_new(
    const char* master_addr,
    uint16_t master_port,
    int rank,
    int world_size,
    int64_t timeout_ms,
    int host_store,
    const char* key_prefix,
    char* err,
    size_t errlen) {
  if (master_addr == nullptr || world_size < 1 || rank < 0 ||
      rank >= world_size || timeout_ms <= 0) {
    put_err(err, errlen, "mezod_c10d_group_new: bad arguments");
    return nullptr;
  }
  Group* out = nullptr;
  int rc = guarded(err, errlen, [&] {
    init_logging_once();
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = master_port;
    opts.isServer = host_store != 0;
    opts.numWorkers = static_cast<size_t>(world_size);
    // The server waits in its constructor until numWorkers clients have
    // checked in (clients only check in), as Python's TCPStore does.
    opts.waitWorkers = true;
    opts.timeout = timeout;
    opts.multiTenant = true;
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
    std::string prefix = key_prefix != nullptr ? key_prefix : "";
    if (!prefix.empty()) {
      store = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
    }

    auto pg_opts = c10d::ProcessGroupGloo::Options::create(timeout);
    pg_opts->devices = make_devices(master_addr);
    pg_opts->threads = 1; // one collective at a time is all we issue

    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        store, rank, world_size, pg_opts);
    out = new Group{store, pg, rank, world_size, timeout};
  });
  if (rc != C10D_OK) {
    return nullptr;
  }
  return out;
}

// all_gather of `len` bytes per rank: out (len * world_size bytes) receives
// rank r's bytes at [r * len, (r + 1) * len).  Every rank must pass the same
// len: on a mismatch Gloo throws from its I/O thread, where nothing catches
// it (std::terminate).  Blocks at most the group's timeout.  After an error
// the group is broken (a peer died or timed out): issue no more collectives.
int mezod_c10d_all_gather(
    void* handle,
    const uint8_t* in,
    size_t len,
    uint8_t* out,
    char* err,
    size_t errlen) {
  auto* g = static_cast<Group*>(handle);
  if (g == nullptr || (len > 0 && (in == nullptr || out == nullptr))) {
    put_err(err, errlen, "mezod_c10d_all_gather: bad arguments");
    return C10D_ERR_ARG;
  }
  return guarded(err, errlen, [&] {
    // Tensors owned here, not from_blob over the caller's memory: after a
    // timed-out wait the Work still holds them, and a late completion must
    // not write into a buffer the caller has already freed.
    auto opts = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
    at::Tensor input = at::empty({static_cast<int64_t>(len)}, opts);
    if (len > 0) {
      std::memcpy(input.data_ptr<uint8_t>(), in, len);
    }
    std::vector<at::Tensor> inputs{input};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < g->size; ++r) {
      outputs[0].push_back(at::empty({static_cast<int64_t>(len)}, opts));
    }
    auto work = g->pg->allgather(outputs, inputs);
    work->wait(g->timeout);
    if (len > 0) {
      for (int r = 0; r < g->size; ++r) {
        std::memcpy(out + r * len, outputs[0][r].data_ptr<uint8_t>(), len);
      }
    }
  });
}

int mezod_c10d_barrier(void* handle, char* err, size_t errlen) {
  auto* g = static_cast<Group*>(handle);
  if (g == nullptr) {
    put_err(err, errlen, "mezod_c10d_barrier: null handle");
    return C10D_ERR_ARG;
  }
  return guarded(err, errlen, [&] {
    auto work = g->pg->barrier();
    work->wait(g->timeout);
  });
}

// Frees the group: ~ProcessGroupGloo waits for queued collectives and joins
// its threads (milliseconds after a peer died, measured; up to the timeout
// for a hung peer).
void mezod_c10d_group_free(void* handle) {
  auto* g = static_cast<Group*>(handle);
  if (g == nullptr) {
    return;
  }
  try {
    delete g;
  } catch (...) {
  }
}

} // extern "C"
