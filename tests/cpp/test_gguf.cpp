// test_gguf.cpp - the GGUF reader against files built here byte by byte from the format spec,
// and against every truncation and thousands of corruptions of them (run under ASan/UBSan in
// CI, so an out-of-bounds read fails the test even when it would not crash).
#include "common.h"
#include "gguf.h"

#include <cstdio>
#include <cstring>
#include <random>
#include <unistd.h>
#include <string>
#include <vector>

using namespace sparrow;

static int g_failures = 0;
#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++g_failures;                                                        \
        }                                                                        \
    } while (0)

// A minimal GGUF v3 writer following the spec (independent of the reader).
struct Writer {
    std::vector<uint8_t> out;
    template <typename T> void put(T v) {
        const uint8_t * p = (const uint8_t *) &v;
        out.insert(out.end(), p, p + sizeof(T));
    }
    void str(const std::string & s) {
        put<uint64_t>(s.size());
        out.insert(out.end(), s.begin(), s.end());
    }
};

static std::vector<uint8_t> build_file(std::vector<float> & expected_tensor) {
    Writer w;
    w.put<uint32_t>(0x46554747);
    w.put<uint32_t>(3);
    w.put<uint64_t>(2);  // tensors
    w.put<uint64_t>(5);  // kv
    w.str("general.architecture"); w.put<uint32_t>(8); w.str("qwen2");
    w.str("qwen2.block_count"); w.put<uint32_t>(4); w.put<uint32_t>(3);
    w.str("qwen2.rope.freq_base"); w.put<uint32_t>(6); w.put<float>(1000000.0f);
    w.str("tokenizer.ggml.tokens"); w.put<uint32_t>(9); w.put<uint32_t>(8); w.put<uint64_t>(3);
    w.str("a"); w.str("bc"); w.str("");
    w.str("qwen2.rope.dimension_sections"); w.put<uint32_t>(9); w.put<uint32_t>(5); w.put<uint64_t>(4);
    for (int32_t v : {2, 3, 3, 0}) w.put<int32_t>(v);
    // tensor infos: t0 f32 [4, 2], t1 f16 [8]
    w.str("t0"); w.put<uint32_t>(2); w.put<int64_t>(4); w.put<int64_t>(2); w.put<uint32_t>(0); w.put<uint64_t>(0);
    w.str("t1"); w.put<uint32_t>(1); w.put<int64_t>(8); w.put<uint32_t>(1); w.put<uint64_t>(32);
    while (w.out.size() % 32) w.out.push_back(0);
    expected_tensor.clear();
    for (int i = 0; i < 8; ++i) {
        expected_tensor.push_back(0.5f * i - 1.0f);
        w.put<float>(0.5f * i - 1.0f);
    }
    for (int i = 0; i < 8; ++i) w.put<uint16_t>(0x3C00);  // 1.0 in fp16
    return w.out;
}

static void test_valid() {
    std::vector<float> expected;
    std::vector<uint8_t> file = build_file(expected);
    auto g = GGUFFile::from_memory(file.data(), file.size());
    CHECK(g->version() == 3);
    CHECK(g->get_string("general.architecture") == "qwen2");
    CHECK(g->get_int("qwen2.block_count") == 3);
    CHECK(g->get_float("qwen2.rope.freq_base") == 1000000.0);
    CHECK(g->get_int("missing", 7) == 7);
    auto toks = g->get_string_array("tokenizer.ggml.tokens");
    CHECK(toks.size() == 3 && toks[0] == "a" && toks[1] == "bc" && toks[2].empty());
    auto sec = g->get_int_array("qwen2.rope.dimension_sections");
    CHECK(sec.size() == 4 && sec[0] == 2 && sec[1] == 3 && sec[2] == 3 && sec[3] == 0);
    CHECK(g->tensors().size() == 2);
    const GGUFTensorInfo * t0 = g->find_tensor("t0");
    CHECK(t0 && t0->ne[0] == 4 && t0->ne[1] == 2 && t0->nbytes == 32);
    if (t0) CHECK(memcmp(g->tensor_data(*t0), expected.data(), 32) == 0);
    const GGUFTensorInfo * t1 = g->find_tensor("t1");
    CHECK(t1 && t1->type == 1 && t1->nbytes == 16);
    // type mismatches are errors, not garbage
    bool threw = false;
    try { g->get_string("qwen2.block_count"); } catch (const Error & e) { threw = e.status() == SPARROW_ERR_FORMAT; }
    CHECK(threw);
    threw = false;
    try { g->get_int("nope"); } catch (const Error & e) { threw = e.status() == SPARROW_ERR_FORMAT; }
    CHECK(threw);
}

// Parse must either succeed or throw sparrow::Error; anything else (a crash, a sanitizer
// report, another exception) fails the test.
static bool parse_ok(const std::vector<uint8_t> & bytes) {
    try {
        auto g = GGUFFile::from_memory(bytes.data(), bytes.size());
        // touch everything a loader would
        for (const auto & k : g->keys()) (void) g->find(k);
        for (const auto & t : g->tensors()) {
            const uint8_t * p = g->tensor_data(t);
            volatile uint8_t sink = 0;
            if (t.nbytes) sink ^= p[0] ^ p[t.nbytes - 1];
            (void) sink;
        }
        return true;
    } catch (const Error &) {
        return false;
    }
}

static void test_truncations() {
    std::vector<float> expected;
    std::vector<uint8_t> file = build_file(expected);
    for (size_t n = 0; n < file.size(); ++n) {
        std::vector<uint8_t> cut(file.begin(), file.begin() + n);
        CHECK(!parse_ok(cut));  // every proper prefix lacks tensor data, so must be refused
    }
}

static void test_corruptions() {
    std::vector<float> expected;
    std::vector<uint8_t> file = build_file(expected);
    std::mt19937 rng(1234);
    int accepted = 0;
    for (int iter = 0; iter < 20000; ++iter) {
        std::vector<uint8_t> bad = file;
        const int n_flips = 1 + (int) (rng() % 4);
        for (int k = 0; k < n_flips; ++k) {
            size_t at = rng() % bad.size();
            switch (rng() % 3) {
                case 0: bad[at] ^= (uint8_t) (1u << (rng() % 8)); break;
                case 1: bad[at] = (uint8_t) rng(); break;
                default: bad[at] = 0xFF; break;
            }
        }
        accepted += parse_ok(bad);
    }
    printf("corruptions: %d of 20000 still parse (flips in data or values)\n", accepted);
    // pure garbage of many sizes
    for (int iter = 0; iter < 2000; ++iter) {
        std::vector<uint8_t> junk(rng() % 512);
        for (auto & b : junk) b = (uint8_t) rng();
        if (junk.size() >= 8 && iter % 2) {  // a valid header in front of garbage
            memcpy(junk.data(), file.data(), 8);
        }
        parse_ok(junk);
    }
    // hostile counts: huge string length, huge array, huge tensor count
    {
        std::vector<uint8_t> bad = file;
        uint64_t huge = ~0ull;
        memcpy(bad.data() + 24, &huge, 8);  // length of the first key string
        CHECK(!parse_ok(bad));
        bad = file;
        memcpy(bad.data() + 8, &huge, 8);  // tensor count
        CHECK(!parse_ok(bad));
    }
}

static void test_files() {
    bool threw = false;
    try { GGUFFile::open("/nonexistent/model.gguf"); } catch (const Error & e) { threw = e.status() == SPARROW_ERR_IO; }
    CHECK(threw);
    threw = false;
    try { GGUFFile::open("/"); } catch (const Error & e) { threw = e.status() == SPARROW_ERR_IO; }
    CHECK(threw);
    // an empty file
    char path[] = "/tmp/sparrow-test-gguf-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd >= 0) {
        close(fd);
        threw = false;
        try { GGUFFile::open(path); } catch (const Error & e) { threw = e.status() == SPARROW_ERR_FORMAT; }
        CHECK(threw);
        // a valid file through mmap and through read()
        std::vector<float> expected;
        std::vector<uint8_t> file = build_file(expected);
        FILE * f = fopen(path, "wb");
        fwrite(file.data(), 1, file.size(), f);
        fclose(f);
        for (bool use_mmap : {true, false}) {
            auto g = GGUFFile::open(path, use_mmap);
            const GGUFTensorInfo * t0 = g->find_tensor("t0");
            CHECK(t0 && memcmp(g->tensor_data(*t0), expected.data(), 32) == 0);
        }
        remove(path);
    }
}

int main() {
    test_valid();
    test_truncations();
    test_corruptions();
    test_files();
    if (g_failures) {
        fprintf(stderr, "test_gguf: %d failures\n", g_failures);
        return 1;
    }
    printf("test_gguf: all checks passed\n");
    return 0;
}
