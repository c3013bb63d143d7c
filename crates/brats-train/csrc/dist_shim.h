// Shared by dist_shim.cpp (linked into brats-trainer) and nccl_shim.cpp (a separately built shared
// object, dlopen'ed only next to a CUDA libtorch): both must agree on these handle layouts, since
// a group made by one is used and freed by the other.
#pragma once

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace brats_dist {

// Bumped whenever Store or Group change, so a stale nccl shim is refused instead of misread.
constexpr int kAbiVersion = 1;

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;
};

inline void set_err(char** err, const std::string& msg) {
  if (err == nullptr) return;
  *err = static_cast<char*>(std::malloc(msg.size() + 1));
  if (*err != nullptr) std::memcpy(*err, msg.c_str(), msg.size() + 1);
}

// c10::Error::what() carries a C++ backtrace that says nothing useful to an operator; the short
// form is what ends up in the Rust error.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, e.what());
  } catch (...) {
    set_err(err, "unknown C++ exception");
  }
  return 1;
}

}  // namespace brats_dist
