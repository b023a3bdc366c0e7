// threadpool.cpp - see threadpool.h.
#include "cpu/threadpool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARROW_PAUSE() _mm_pause()
#else
#define SPARROW_PAUSE() std::this_thread::yield()
#endif

namespace sparrow {

namespace {
// How long an idle worker spins before sleeping: long enough to cover the gap between
// consecutive ops in a forward pass and between the tokens of a decode loop driven from
// Python, short enough not to burn a core for long once generation stops.
constexpr auto kSpinTime = std::chrono::microseconds(1000);
// After this long spinning, waits also yield the core now and then: when the machine is
// oversubscribed the thread we wait for may be queued behind us, and burning a whole time slice
// on pause would make every op cost a scheduler tick.
constexpr auto kPureSpinTime = std::chrono::microseconds(50);
constexpr int kSpinsPerCheck = 64;
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
        generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto & t : threads_) t.join();
}

void ThreadPool::run_raw(RawFn fn, void * ctx) {
    if (n_threads_ == 1) {
        fn(ctx, 0, 1);
        return;
    }
    error_ = nullptr;
    job_fn_ = fn;
    job_ctx_ = ctx;
    pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    // seq_cst pairs with the worker's sleepers_ increment then generation_ check: either the
    // worker sees the new generation, or this thread sees it asleep and wakes it.
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        { std::lock_guard<std::mutex> lock(mutex_); }
        wake_.notify_all();
    }
    call(fn, ctx, 0);
    if (pending_.load(std::memory_order_acquire) != 0) {
        const auto yield_after = std::chrono::steady_clock::now() + kPureSpinTime;
        bool yielding = false;
        for (int spins = 1; pending_.load(std::memory_order_acquire) != 0; ++spins) {
            SPARROW_PAUSE();
            if (spins % kSpinsPerCheck == 0) {
                if (yielding) std::this_thread::yield();
                else yielding = std::chrono::steady_clock::now() > yield_after;
            }
        }
    }
    if (error_) {
        std::exception_ptr e = error_;
        error_ = nullptr;
        std::rethrow_exception(e);
    }
}

void ThreadPool::call(RawFn fn, void * ctx, int ith) {
    try {
        fn(ctx, ith, n_threads_);
    } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
    }
}

void ThreadPool::worker(int ith) {
    uint64_t seen = 0;
    for (;;) {
        const auto start = std::chrono::steady_clock::now();
        const auto yield_after = start + kPureSpinTime, sleep_after = start + kSpinTime;
        int spins = 0;
        while (generation_.load(std::memory_order_acquire) == seen) {
            SPARROW_PAUSE();
            if (++spins % kSpinsPerCheck != 0) continue;
            const auto now = std::chrono::steady_clock::now();
            if (now > yield_after) std::this_thread::yield();
            if (now > sleep_after) {
                std::unique_lock<std::mutex> lock(mutex_);
                sleepers_.fetch_add(1, std::memory_order_seq_cst);
                wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
                sleepers_.fetch_sub(1, std::memory_order_relaxed);
            }
        }
        seen = generation_.load(std::memory_order_acquire);
        if (stop_.load()) return;
        call(job_fn_, job_ctx_, ith);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

}  // namespace sparrow
