// threadpool.h - a persistent pool for the CPU backend's data-parallel ops.
//
// run(fn) calls fn(ith, nth) on every thread (the caller is thread 0) and returns when all are
// done. An exception thrown by fn on any thread is caught there and rethrown by run on the
// caller once every thread has finished (the first one, if several threw): nothing escapes a
// worker, which would terminate the process, and nothing unwinds the job's stack while
// workers still use it. Ops arrive back to back during a forward pass, so dispatch must cost well under a
// microsecond: workers spin on a generation counter for a while before sleeping, the caller
// takes the mutex and signals only when some worker is actually asleep, and the job is passed
// as a plain function pointer plus context (no std::function, so no allocation per op).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace sparrow {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool & operator=(const ThreadPool &) = delete;

    int size() const { return n_threads_; }

    // fn(int ith, int nth) on all threads; returns when every call has returned.
    template <typename F>
    void run(F && fn) {
        using Fn = std::remove_reference_t<F>;
        run_raw([](void * ctx, int ith, int nth) { (*(Fn *) ctx)(ith, nth); }, (void *) &fn);
    }

private:
    using RawFn = void (*)(void * ctx, int ith, int nth);
    void run_raw(RawFn fn, void * ctx);
    void call(RawFn fn, void * ctx, int ith);  // fn, its exception kept in error_
    void worker(int ith);

    int n_threads_;
    std::vector<std::thread> threads_;
    RawFn job_fn_ = nullptr;
    void * job_ctx_ = nullptr;
    // Each on its own cache line: workers poll generation_ while the caller counts pending_ down.
    alignas(64) std::atomic<uint64_t> generation_{0};
    alignas(64) std::atomic<int> pending_{0};
    alignas(64) std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
    std::exception_ptr error_;  // the job's first exception (guarded by error_mutex_)
    std::mutex error_mutex_;
    std::mutex mutex_;
    std::condition_variable wake_;
};

// Split [0, n) into nth nearly equal parts; part ith is [*begin, *end).
inline void split_range(int64_t n, int ith, int nth, int64_t * begin, int64_t * end) {
    int64_t per = (n + nth - 1) / nth;
    *begin = std::min<int64_t>(n, per * ith);
    *end = std::min<int64_t>(n, *begin + per);
}

}  // namespace sparrow
