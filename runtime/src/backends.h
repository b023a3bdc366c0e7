// backends.h - the backends compiled into this build, by name ("cpu", "ref"), and the model's
// weights prepared for each: a context or vision encode names a backend, and gets that backend's
// ops and a copy of the weights in its memory.
#pragma once

#include "backend.h"

#include <memory>
#include <string>

struct sparrow_model;

namespace sparrow {

struct LMWeights;
struct DraftWeights;
struct VisionModel;

// The names make_backend knows, e.g. "cpu, ref".
const char * backend_names();
// What a context uses when its parameters name no backend: $SPARROW_BACKEND if set (the test
// suite runs everything on "ref" this way), else "cpu".
std::string default_backend_name();
// SPARROW_ERR_INVALID_ARGUMENT, naming the ones there are, for an unknown name. With
// $SPARROW_PROFILE set (not "0") the backend is wrapped by make_profiled_backend.
std::unique_ptr<Backend> make_backend(const std::string & name, int n_threads);
// A backend that times each op of `inner` and prints the totals, by op and rows per call, to
// stderr when destroyed (profile-backend.cpp).
std::unique_ptr<Backend> make_profiled_backend(std::unique_ptr<Backend> inner);
std::unique_ptr<WeightStore> make_weight_store(const std::string & name, bool release_mapped_pages);

// A model's weights in one backend's memory (model.h keeps one per backend it was asked for).
struct PreparedWeights {
    std::unique_ptr<WeightStore> store;
    std::unique_ptr<LMWeights> lm;          // a language model
    std::unique_ptr<DraftWeights> draft;    // a draft
    std::unique_ptr<VisionModel> vision;    // a vision file (hyperparameters copied)
    ~PreparedWeights();
};

// The model's weights for the named backend, prepared on first use (thread-safe; the first
// preparation of a big model takes as long as its load did).
const PreparedWeights & model_weights(const sparrow_model & model, const std::string & backend);

// A backend borrowed from the model's idle ones with this name and thread count (or a new one),
// handed back on destruction: calls that need a backend for a moment (vision encodes) reuse
// thread pools instead of starting threads each time, and concurrent calls get one each.
class BackendLease {
public:
    BackendLease(const sparrow_model & model, const std::string & name, int n_threads);
    ~BackendLease();
    BackendLease(const BackendLease &) = delete;
    BackendLease & operator=(const BackendLease &) = delete;
    Backend & operator*() const { return *backend_; }

private:
    const sparrow_model & model_;
    std::unique_ptr<Backend> backend_;
    std::string name_;
    int n_threads_ = 0;
};

// A backend a finished lease handed back, with what it was asked for.
struct IdleBackend {
    std::string name;
    int n_threads = 0;
    std::unique_ptr<Backend> backend;
};

}  // namespace sparrow
