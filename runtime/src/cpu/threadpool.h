// threadpool.h - a persistent pool for the CPU backend's data-parallel ops.
//
// run(fn) calls fn(ith, nth) on every thread (the caller is thread 0) and returns when all are
// done. Workers spin briefly on a generation counter before sleeping, because ops arrive back
// to back during a forward pass and a condition-variable wake per op would cost more than
// the small ops themselves.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sparrow {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool & operator=(const ThreadPool &) = delete;

    int size() const { return n_threads_; }
    void run(const std::function<void(int ith, int nth)> & fn);

private:
    void worker(int ith);

    int n_threads_;
    std::vector<std::thread> threads_;
    const std::function<void(int, int)> * job_ = nullptr;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
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
