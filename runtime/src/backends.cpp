// backends.cpp - see backends.h.
#include "backends.h"

#include "common.h"
#include "model.h"

#include <cstdlib>
#include <cstring>

namespace sparrow {

namespace {

// One row per backend compiled in: what a name makes.
struct BackendKind {
    const char * name;
    std::unique_ptr<Backend> (*make)(int n_threads);
    std::unique_ptr<WeightStore> (*store)(bool release_mapped_pages);
};

const BackendKind kBackends[] = {
    {"cpu", make_cpu_backend, make_cpu_weight_store},
    {"ref", [](int) { return make_ref_backend(); }, [](bool) { return make_ref_weight_store(); }},
};

const BackendKind & kind_of(const std::string & name) {
    for (const BackendKind & k : kBackends) {
        if (name == k.name) return k;
    }
    fail(SPARROW_ERR_INVALID_ARGUMENT, format("backend '%s' is not in this build (it has: %s)", name.c_str(), backend_names()));
}

}  // namespace

const char * backend_names() {
    static const std::string names = [] {
        std::string s;
        for (const BackendKind & k : kBackends) s += (s.empty() ? "" : ", ") + std::string(k.name);
        return s;
    }();
    return names.c_str();
}

std::string default_backend_name() {
    const char * env = std::getenv("SPARROW_BACKEND");
    return env && *env ? env : "cpu";
}

std::unique_ptr<Backend> make_backend(const std::string & name, int n_threads) {
    std::unique_ptr<Backend> b = kind_of(name).make(n_threads);
    const char * profile = std::getenv("SPARROW_PROFILE");
    if (profile && *profile && std::strcmp(profile, "0") != 0) return make_profiled_backend(std::move(b));
    return b;
}

std::unique_ptr<WeightStore> make_weight_store(const std::string & name, bool release_mapped_pages) {
    return kind_of(name).store(release_mapped_pages);
}

PreparedWeights::~PreparedWeights() {
    // the tensors point into the store: drop them first
    lm.reset();
    draft.reset();
    vision.reset();
    store.reset();
}

const PreparedWeights & model_weights(const sparrow_model & m, const std::string & backend) {
    std::lock_guard<std::mutex> lock(m.prepared_mutex);
    auto it = m.prepared.find(backend);
    if (it != m.prepared.end()) return *it->second;
    std::unique_ptr<PreparedWeights> p(new PreparedWeights());
    p->store = make_weight_store(backend, m.release_mapped_pages);
    if (m.vision) {
        p->vision.reset(new VisionModel(vision_prepare_weights(*p->store, *m.vision)));
    } else if (m.is_draft) {
        p->draft.reset(new DraftWeights(draft_prepare_weights(*p->store, m.draft_weights)));
    } else if (!m.vocab_only) {
        p->lm.reset(new LMWeights(lm_prepare_weights(*p->store, m.weights)));
    }
    const PreparedWeights & out = *p;
    m.prepared[backend] = std::move(p);
    return out;
}

BackendLease::BackendLease(const sparrow_model & model, const std::string & name, int n_threads) : model_(model) {
    {
        std::lock_guard<std::mutex> lock(model.idle_backends_mutex);
        auto & idle = model.idle_backends;
        for (auto it = idle.begin(); it != idle.end(); ++it) {
            if (it->name == name && it->n_threads == n_threads) {  // as asked, whatever the backend made of it
                backend_ = std::move(it->backend);
                idle.erase(it);
                break;
            }
        }
    }
    if (!backend_) backend_ = make_backend(name, n_threads);
    name_ = name;
    n_threads_ = n_threads;
}

BackendLease::~BackendLease() {
    std::lock_guard<std::mutex> lock(model_.idle_backends_mutex);
    model_.idle_backends.push_back({name_, n_threads_, std::move(backend_)});
    // a few at most: each idle CPU backend parks n_threads - 1 threads
    if (model_.idle_backends.size() > 4) model_.idle_backends.erase(model_.idle_backends.begin());
}

}  // namespace sparrow
