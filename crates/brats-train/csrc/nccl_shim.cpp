// c10d::ProcessGroupNCCL behind the C ABI of dist_shim.cpp, built as its own shared object.
//
// The object is loaded with dlopen only when the process runs on a CUDA libtorch: it is linked
// against nothing, and its few undefined symbols (ProcessGroupNCCL's and Options' constructors,
// c10's assert helpers) resolve from libtorch_cuda.so / libtorch_cpu.so already in the process.
// A CPU-only build of brats-trainer therefore never needs CUDA, and one binary serves both.
//
// Only construction lives here: the group it returns is a brats_dist::Group, on which the
// collectives, barrier and free of dist_shim.cpp work unchanged (c10d::Backend is polymorphic).
#include "dist_shim.h"

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstdint>

extern "C" {

int brats_dist_nccl_abi_version() { return brats_dist::kAbiVersion; }

void* brats_dist_nccl_new(void* store, int rank, int world_size, int64_t timeout_ms, char** err) {
  brats_dist::Group* out = nullptr;
  brats_dist::guarded(err, [&] {
    TORCH_CHECK(store != nullptr, "store is null");
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    // NCCL's watchdog enforces this: a collective stuck past it aborts the communicator (and, by
    // torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING, the process) instead of hanging.
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(static_cast<brats_dist::Store*>(store)->store, rank,
                                                           world_size, opts);
    out = new brats_dist::Group{pg};
  });
  return out;
}

}  // extern "C"
