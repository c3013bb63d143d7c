// A C ABI over libtorch's c10d (TCPStore + ProcessGroupGloo) for src/dist.rs.
//
// libtorch exports these classes but tch binds none of them, and their interface is C++ (intrusive
// pointers, std::chrono, exceptions), so Rust reaches them through this file. Rules kept by every
// entry point:
//   - no C++ exception crosses into Rust: each call catches everything and hands back a malloc'ed
//     message through `err` (the caller frees it with free());
//   - tensors arrive as `at::Tensor*`, which is what tch's C_tensor pointers are (torch_api.h:
//     `typedef torch::Tensor *tensor`), so collectives run in place on tch's own tensors.
#include "dist_shim.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace {

using brats_dist::Group;
using brats_dist::guarded;
using brats_dist::Store;

std::vector<at::Tensor> gather(at::Tensor* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i] != nullptr && tensors[i]->defined(), "tensor ", i, " is undefined");
    out.push_back(*tensors[i]);
  }
  return out;
}

// Every work item is waited on even after one fails: an abandoned item would still be writing into
// tensors that Rust may free as soon as this call returns.
void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  std::exception_ptr first;
  for (auto& w : works) {
    try {
      w->wait();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

// Launches `collective` on each tensor so all are in flight together, then waits for every one
// (see wait_all) before reporting a launch or wait failure.
template <typename Launch>
void each_in_flight(std::vector<at::Tensor>& ts, Launch collective) {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  works.reserve(ts.size());
  std::exception_ptr launch_error;
  for (auto& t : ts) {
    try {
      std::vector<at::Tensor> one{t};
      works.push_back(collective(one));
    } catch (...) {
      launch_error = std::current_exception();
      break;
    }
  }
  wait_all(works);
  if (launch_error) std::rethrow_exception(launch_error);
}

}  // namespace

extern "C" {

// Rank 0 hosts the store (is_master) and waits for `world_size` members; the others connect,
// retrying until `timeout_ms`.
void* brats_dist_store_new(const char* host, uint16_t port, int world_size, int is_master, int64_t timeout_ms,
                           char** err) {
  Store* out = nullptr;
  guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_master != 0;
    opts.numWorkers = static_cast<size_t>(world_size);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    out = new Store{store};
  });
  return out;
}

void brats_dist_store_free(void* store) {
  try {
    delete static_cast<Store*>(store);
  } catch (...) {
  }
}

// Gloo's timeout bounds every collective, so a peer that dies or stops answering turns into an
// error from wait() instead of a hang.
void* brats_dist_gloo_new(void* store, int rank, int world_size, int64_t timeout_ms, char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    TORCH_CHECK(store != nullptr, "store is null");
    auto timeout = std::chrono::milliseconds(timeout_ms);
    // create_default honours GLOO_SOCKET_IFNAME, as torch.distributed does.
    auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
    opts->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(static_cast<Store*>(store)->store, rank, world_size, opts);
    out = new Group{pg};
  });
  return out;
}

void brats_dist_group_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

// One collective per tensor, all in flight together; Gloo sums each in place.
int brats_dist_allreduce_sum(void* group, at::Tensor* const* tensors, size_t n, char** err) {
  return guarded(err, [&] {
    TORCH_CHECK(group != nullptr, "process group is null");
    auto& backend = static_cast<Group*>(group)->backend;
    auto ts = gather(tensors, n);
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    each_in_flight(ts, [&](std::vector<at::Tensor>& one) { return backend->allreduce(one, opts); });
  });
}

int brats_dist_broadcast(void* group, at::Tensor* const* tensors, size_t n, int root, char** err) {
  return guarded(err, [&] {
    TORCH_CHECK(group != nullptr, "process group is null");
    auto& backend = static_cast<Group*>(group)->backend;
    auto ts = gather(tensors, n);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    each_in_flight(ts, [&](std::vector<at::Tensor>& one) { return backend->broadcast(one, opts); });
  });
}

int brats_dist_barrier(void* group, char** err) {
  return guarded(err, [&] {
    TORCH_CHECK(group != nullptr, "process group is null");
    static_cast<Group*>(group)->backend->barrier()->wait();
  });
}

// tch has no setter for .grad; averaging must give a parameter whose local gradient was undefined
// the same gradient its peers apply, or the replicas drift apart.
int brats_dist_abi_version() { return brats_dist::kAbiVersion; }

int brats_dist_set_grad(at::Tensor* var, at::Tensor* grad, char** err) {
  return guarded(err, [&] {
    TORCH_CHECK(var != nullptr && var->defined(), "variable is undefined");
    TORCH_CHECK(grad != nullptr && grad->defined(), "gradient is undefined");
    var->mutable_grad() = *grad;
  });
}

}  // extern "C"
