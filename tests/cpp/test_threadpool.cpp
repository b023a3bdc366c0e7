// test_threadpool.cpp - the CPU backend's thread pool: every thread runs the job, the caller
// gets the job's exception back (whichever thread threw it) after all threads are done, and the
// pool keeps working afterwards. Before, an exception on a worker ended the process
// (std::terminate): a tensor of an unsupported type reached a matmul on a worker thread.

#include "common.h"
#include "cpu/threadpool.h"
#include "test_util.h"

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <string>

using namespace sparrow;

namespace {

using namespace sparrow_test;

void test_pool(int n_threads) {
    ThreadPool pool(n_threads);
    for (int round = 0; round < 200; round++) {
        std::atomic<int> ran{0}, sum{0};
        pool.run([&](int ith, int nth) {
            ran++;
            sum += ith;
            check(nth == n_threads, "nth is the pool size");
        });
        check(ran == n_threads && sum == n_threads * (n_threads - 1) / 2, "every thread runs the job once");

        // a throw on one thread (a worker, or the caller) comes back on the caller
        const int thrower = round % n_threads;
        std::atomic<int> finished{0};
        bool caught = false;
        try {
            pool.run([&](int ith, int) {
                if (ith == thrower) throw Error(SPARROW_ERR_UNSUPPORTED, "thread " + std::to_string(ith));
                finished++;
            });
        } catch (const Error & e) {
            caught = e.status() == SPARROW_ERR_UNSUPPORTED && std::string(e.what()) == "thread " + std::to_string(thrower);
        }
        check(caught, "the job's exception is rethrown on the caller (thread " + std::to_string(thrower) + ")");
        check(finished == n_threads - 1, "the other threads finished before run returned");
        // every thread throwing: one of them comes back, nothing terminates
        caught = false;
        try {
            pool.run([&](int, int) { throw std::runtime_error("all"); });
        } catch (const std::runtime_error &) {
            caught = true;
        }
        check(caught, "one of several exceptions is rethrown");
    }
    std::printf("  %d thread(s) ok\n", n_threads);
}

}  // namespace

int main(int argc, char ** argv) {
    (void) argc, (void) argv;
    for (int n : {1, 2, 3, 4}) test_pool(n);
    return finish("test_threadpool");
}
