// test_tokenizer.cpp - the byte-level BPE tokenizer against llama.cpp's tokenizer test vectors
// (ggml-vocab-{gpt-2,llama-bpe,qwen2}.gguf with their .inp/.out files, which llama.cpp's
// tests/test-tokenizer-0 checks), plus detokenization round trips, special-token handling,
// NFC, ill-formed UTF-8 and the load-time errors.
//
// Usage: test_tokenizer REPO_ROOT [VOCAB_DIR]
// The vocab directory is, in order: the second argument, $SPARROW_TEST_VOCAB_DIR, or the
// SPARROW_TEST_VOCAB_DIR compile definition set by cmake/test-data.cmake (which extracts
// tests/data/vocab.tar.xz into the build tree at configure time).
#include "common.h"
#include "gguf.h"
#include "tokenizer.h"
#include "unicode.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace sparrow;

namespace {

int g_failures = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++g_failures;                                                            \
        }                                                                            \
    } while (0)

std::string read_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        std::fprintf(stderr, "cannot open %s\n", path.c_str());
        std::exit(1);
    }
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Printable form of a test input: C escapes for control and non-ASCII bytes.
std::string escape(const std::string & s) {
    std::string out;
    for (unsigned char c : s) {
        char buf[8];
        if (c == '\n') out += "\\n";
        else if (c == '\t') out += "\\t";
        else if (c == '\r') out += "\\r";
        else if (c < 0x20 || c >= 0x7F) { std::snprintf(buf, sizeof(buf), "\\x%02X", c); out += buf; }
        else out += (char) c;
    }
    return out;
}

std::string ids_to_string(const std::vector<int32_t> & ids) {
    std::string out;
    for (size_t i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids[i]);
    return out;
}

std::string detokenize(const Tokenizer & tok, const std::vector<int32_t> & ids, bool special = false) {
    std::string out;
    for (int32_t id : ids) out += tok.token_to_piece(id, special);
    return out;
}

std::string nfc(const std::string & text) {
    std::vector<uint32_t> cps = unicode::utf8_to_codepoints(text);
    unicode::nfc_in_place(cps);
    return unicode::codepoints_to_utf8(cps.data(), cps.size());
}

struct TestCase {
    std::string input;
    std::vector<int32_t> expected;
};

// The .inp format of llama.cpp's test-tokenizer-0: inputs separated by
// "\n__ggml_vocab_test__\n" (the file ends with one); .out: one line of space-separated ids
// per input.
std::vector<TestCase> read_cases(const std::string & inp_path, const std::string & out_path) {
    const std::string raw = read_file(inp_path);
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> inputs;
    for (size_t pos = 0; pos < raw.size();) {
        const size_t next = raw.find(sep, pos);
        if (next == std::string::npos) {
            inputs.push_back(raw.substr(pos));
            break;
        }
        inputs.push_back(raw.substr(pos, next - pos));
        pos = next + sep.size();
    }
    std::istringstream out_lines(read_file(out_path));
    std::vector<TestCase> cases;
    std::string line;
    for (size_t i = 0; std::getline(out_lines, line); ++i) {
        if (i >= inputs.size()) break;
        TestCase c;
        c.input = inputs[i];
        std::istringstream ids(line);
        for (int32_t id; ids >> id;) c.expected.push_back(id);
        cases.push_back(std::move(c));
    }
    if (cases.size() != inputs.size() || cases.empty()) {
        std::fprintf(stderr, "%s: %zu inputs but %zu outputs\n", inp_path.c_str(), inputs.size(), cases.size());
        std::exit(1);
    }
    return cases;
}

std::unique_ptr<Tokenizer> load(const std::string & dir, const std::string & name,
                                std::unique_ptr<GGUFFile> & file) {
    file = GGUFFile::open(dir + "/ggml-vocab-" + name + ".gguf");
    return Tokenizer::from_gguf(*file);
}

// Every vector of one vocab; the first few mismatches are printed.
void check_vectors(const std::string & dir, const std::string & name, bool normalizes_nfc) {
    std::unique_ptr<GGUFFile> file;
    std::unique_ptr<Tokenizer> tok = load(dir, name, file);
    const std::string base = dir + "/ggml-vocab-" + name + ".gguf";
    const std::vector<TestCase> cases = read_cases(base + ".inp", base + ".out");

    int passed = 0, shown = 0, round_trips = 0;
    for (const TestCase & c : cases) {
        // as llama.cpp's test: add_special=false, parse_special=false
        const std::vector<int32_t> got = tok->encode(c.input, false, false);
        if (got == c.expected) {
            ++passed;
        } else if (shown++ < 5) {
            std::fprintf(stderr, "[%s] mismatch for \"%s\"\n  expected: %s\n  got:      %s\n", name.c_str(),
                         escape(c.input).c_str(), ids_to_string(c.expected).c_str(), ids_to_string(got).c_str());
        }
        // byte-level BPE loses nothing but what the normalizer changes
        const std::string want = normalizes_nfc ? nfc(c.input) : c.input;
        const std::string back = detokenize(*tok, c.expected);
        if (back == want) {
            ++round_trips;
        } else {
            std::fprintf(stderr, "[%s] round trip of \"%s\" gave \"%s\"\n", name.c_str(), escape(c.input).c_str(),
                         escape(back).c_str());
        }
    }
    std::printf("%-10s %d/%zu vectors match, %d/%zu detokenize back to the input\n", name.c_str(), passed,
                cases.size(), round_trips, cases.size());
    if (passed != (int) cases.size() || round_trips != (int) cases.size()) ++g_failures;
}

void check_qwen2_behaviour(const std::string & dir) {
    std::unique_ptr<GGUFFile> file;
    std::unique_ptr<Tokenizer> tok = load(dir, "qwen2", file);
    const int32_t im_start = 151644, im_end = 151645, endoftext = 151643;

    CHECK(tok->n_vocab() == 151936);
    CHECK(tok->eos() == endoftext);
    CHECK(!tok->add_bos());
    CHECK(tok->eot() == im_end);  // no eot key: picked from the usual end-of-turn texts
    CHECK(tok->is_eog(endoftext) && tok->is_eog(im_end) && !tok->is_eog(im_start) && !tok->is_eog(9707));

    // CONTROL tokens are split out only with parse_special; USER_DEFINED ones always
    const std::string chat = "<|im_start|>user\nHello<|im_end|>";
    const std::vector<int32_t> parsed = tok->encode(chat, false, true);
    CHECK(parsed.size() >= 3 && parsed.front() == im_start && parsed.back() == im_end);
    const std::vector<int32_t> literal = tok->encode(chat, false, false);
    CHECK(std::find(literal.begin(), literal.end(), im_start) == literal.end());
    CHECK(detokenize(*tok, literal) == chat);
    CHECK(tok->encode("a[PAD151646]b", false, false) == tok->encode("a[PAD151646]b", false, true));
    CHECK(tok->encode("[PAD151646]", false, false) == std::vector<int32_t>{151646});

    // rendering: control tokens only with special=true; out of range throws
    CHECK(tok->token_to_piece(im_start, false).empty());
    CHECK(tok->token_to_piece(im_start, true) == "<|im_start|>");
    CHECK(tok->token_to_piece(151646, false) == "[PAD151646]");
    CHECK(detokenize(*tok, parsed, true) == chat);
    for (int32_t bad : {-1, tok->n_vocab()}) {
        bool threw = false;
        try {
            tok->token_to_piece(bad, false);
        } catch (const Error & e) {
            threw = e.status() == SPARROW_ERR_INVALID_ARGUMENT;
        }
        CHECK(threw);
    }

    // NFC: a decomposed accent tokenizes like the precomposed character (as HF does)
    CHECK(tok->encode("caf\x65\xCC\x81 ol\x61\xCC\x80", false, false) == tok->encode("caf\xC3\xA9 ol\xC3\xA0", false, false));
    CHECK(tok->encode("\xE1\x84\x80\xE1\x85\xA1", false, false) == tok->encode("\xEA\xB0\x80", false, false));  // Hangul jamo

    // ill-formed UTF-8 never throws and detokenizes back to the same bytes
    const std::string bad_utf8[] = {
        std::string("\xFF"), std::string("ab\x80" "cd"), std::string("\xE4\xB8"), std::string("x\xED\xA0\x80y"),
        std::string("\xF4\x90\x80\x80"), std::string("\xC0\xAF ok"), std::string("\0mid\0", 5), std::string("caf\xC3"),
    };
    for (const std::string & s : bad_utf8) {
        const std::vector<int32_t> ids = tok->encode(s, true, true);
        CHECK(detokenize(*tok, ids) == s);
    }
}

void check_llama3_behaviour(const std::string & dir) {
    std::unique_ptr<GGUFFile> file;
    std::unique_ptr<Tokenizer> tok = load(dir, "llama-bpe", file);
    CHECK(tok->bos() == 128000 && tok->eos() == 128001 && tok->add_bos());
    CHECK(tok->eot() == 128009);  // <|eot_id|>
    CHECK(tok->is_eog(128001) && tok->is_eog(128009) && !tok->is_eog(128000));
    const std::vector<int32_t> with_bos = tok->encode("Hello", true, false);
    CHECK(with_bos.size() == 2 && with_bos[0] == 128000 && with_bos[1] == 9906);
    CHECK(tok->encode("<|eot_id|>", false, true) == std::vector<int32_t>{128009});
    CHECK(tok->encode("<|eot_id|>", false, false).size() > 1);

    // a long text: the per-piece BPE has to stay fast (and equal to encoding the parts)
    std::string long_text;
    for (int i = 0; i < 20000; ++i) long_text += "The quick brown fox " + std::to_string(i) + " jumps. ";
    const std::vector<int32_t> ids = tok->encode(long_text, false, false);
    CHECK(ids.size() > 100000);
    CHECK(detokenize(*tok, ids) == long_text);
}

// ---- a minimal GGUF writer for the load-error cases ------------------------------------------

struct GGUFBuilder {
    std::string bytes;
    uint64_t n_kv = 0;

    void u32(uint32_t v) { bytes.append((const char *) &v, 4); }
    void u64(uint64_t v) { bytes.append((const char *) &v, 8); }
    void str(const std::string & s) { u64(s.size()); bytes += s; }
    void key(const std::string & k, GGUFType t) { str(k); u32((uint32_t) t); ++n_kv; }

    GGUFBuilder & string(const std::string & k, const std::string & v) { key(k, GGUFType::STRING); str(v); return *this; }
    GGUFBuilder & strings(const std::string & k, const std::vector<std::string> & v) {
        key(k, GGUFType::ARRAY); u32((uint32_t) GGUFType::STRING); u64(v.size());
        for (const auto & s : v) str(s);
        return *this;
    }
    GGUFBuilder & ints(const std::string & k, const std::vector<int32_t> & v) {
        key(k, GGUFType::ARRAY); u32((uint32_t) GGUFType::INT32); u64(v.size());
        for (int32_t x : v) u32((uint32_t) x);
        return *this;
    }
    std::string finish() const {
        std::string head = "GGUF";
        const uint32_t version = 3;
        const uint64_t n_tensors = 0;
        head.append((const char *) &version, 4);
        head.append((const char *) &n_tensors, 8);
        head.append((const char *) &n_kv, 8);
        return head + bytes;
    }
};

// A complete little byte-level vocab: the 256 byte tokens, "ab" and one control token.
GGUFBuilder tiny_vocab(const std::string & model, const std::string & pre, bool bad_types, bool bad_merge) {
    std::vector<std::string> tokens;
    for (int b = 0; b < 256; ++b) {
        std::string t;
        unicode::utf8_append(t, unicode::byte_to_codepoint((uint8_t) b));
        tokens.push_back(t);
    }
    tokens.push_back("ab");
    tokens.push_back("<|end|>");
    std::vector<int32_t> types(tokens.size(), 1);
    types.back() = 3;
    if (bad_types) types.pop_back();
    GGUFBuilder g;
    g.string("tokenizer.ggml.model", model).string("tokenizer.ggml.pre", pre).strings("tokenizer.ggml.tokens", tokens)
        .ints("tokenizer.ggml.token_type", types).strings("tokenizer.ggml.merges", {bad_merge ? "a zz" : "a b"});
    return g;
}

sparrow_status load_status(const GGUFBuilder & g, std::unique_ptr<Tokenizer> * out = nullptr) {
    const std::string bytes = g.finish();
    try {
        std::unique_ptr<GGUFFile> file = GGUFFile::from_memory(bytes.data(), bytes.size());
        std::unique_ptr<Tokenizer> tok = Tokenizer::from_gguf(*file);
        if (out) *out = std::move(tok);
        return SPARROW_OK;
    } catch (const Error & e) {
        return e.status();
    }
}

void check_load_errors() {
    std::unique_ptr<Tokenizer> tok;
    CHECK(load_status(tiny_vocab("gpt2", "gpt-2", false, false), &tok) == SPARROW_OK);
    if (tok) {
        CHECK(tok->encode("abab<|end|>", false, true) == (std::vector<int32_t>{256, 256, 257}));
        CHECK(tok->is_eog(257) && tok->eot() == 257 && tok->bos() == -1 && !tok->add_bos());
    }
    CHECK(load_status(tiny_vocab("llama", "gpt-2", false, false)) == SPARROW_ERR_UNSUPPORTED);
    CHECK(load_status(tiny_vocab("gpt2", "no-such-pre", false, false)) == SPARROW_ERR_UNSUPPORTED);
    CHECK(load_status(tiny_vocab("gpt2", "gpt-2", true, false)) == SPARROW_ERR_FORMAT);
    CHECK(load_status(tiny_vocab("gpt2", "gpt-2", false, true)) == SPARROW_ERR_FORMAT);
    CHECK(load_status(GGUFBuilder().string("tokenizer.ggml.model", "gpt2")) == SPARROW_ERR_FORMAT);
}

void check_unicode() {
    CHECK(unicode::category('a') == unicode::UCAT_LETTER && unicode::category(0x4E2D) == unicode::UCAT_LETTER);
    CHECK(unicode::category('7') == unicode::UCAT_NUMBER && unicode::category(0x00BD) == unicode::UCAT_NUMBER);
    CHECK(unicode::category(0x1F600) == unicode::UCAT_SYMBOL && unicode::category('!') == unicode::UCAT_PUNCTUATION);
    CHECK(unicode::is_whitespace(0x3000) && unicode::is_whitespace(0x85) && !unicode::is_whitespace(0x200B));
    CHECK(unicode::utf8_is_valid("\xF0\x9F\x98\x80") && !unicode::utf8_is_valid("\xED\xA0\x80"));
    // U+1E0A U+0323 (D with dot above, dot below) -> U+1E0C U+0307: reordered, then composed
    CHECK(nfc("\xE1\xB8\x8A\xCC\xA3") == "\xE1\xB8\x8C\xCC\x87");
    CHECK(nfc("\xE2\x84\xAB") == "\xC3\x85");  // ANGSTROM SIGN is a singleton: -> A with ring
    for (int b = 0; b < 256; ++b) CHECK(unicode::codepoint_to_byte(unicode::byte_to_codepoint((uint8_t) b)) == b);
}

}  // namespace

int main(int argc, char ** argv) {
    std::string dir;
    if (argc > 2) {
        dir = argv[2];
    } else if (const char * env = std::getenv("SPARROW_TEST_VOCAB_DIR")) {
        dir = env;
    } else {
#ifdef SPARROW_TEST_VOCAB_DIR
        dir = SPARROW_TEST_VOCAB_DIR;
#else
        std::fprintf(stderr, "usage: %s REPO_ROOT VOCAB_DIR (or set SPARROW_TEST_VOCAB_DIR)\n", argv[0]);
        return 1;
#endif
    }

    try {
        check_unicode();
        check_load_errors();
        check_vectors(dir, "gpt-2", false);
        check_vectors(dir, "llama-bpe", false);
        check_vectors(dir, "qwen2", true);
        check_qwen2_behaviour(dir);
        check_llama3_behaviour(dir);
    } catch (const std::exception & e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
    }
    if (g_failures) {
        std::fprintf(stderr, "%d check(s) failed\n", g_failures);
        return 1;
    }
    std::printf("all tokenizer checks passed\n");
    return 0;
}
