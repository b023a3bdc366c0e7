// tokenizer.cpp - byte-level BPE as Hugging Face tokenizers runs it, loaded from llama.cpp's
// tokenizer.ggml.* GGUF keys.
//
// encode(text):
//   1. special tokens: literal occurrences of CONTROL (only with parse_special) and
//      USER_DEFINED token texts are cut out first, leftmost-longest like HF's added-token
//      matcher; they become single tokens and never reach the steps below.
//   2. each remaining fragment is decoded to code points (ill-formed UTF-8 bytes are kept as
//      raw bytes, see unicode.h), NFC-normalized for the vocabs whose tokenizer.json has an NFC
//      normalizer (Qwen2), and split into pieces by the pre-tokenizer's regex.
//   3. each piece's bytes start as one symbol per byte and are merged by BPE, lowest merge rank
//      first (leftmost on ties), with a heap of candidate pairs: O(k log k) for k bytes.
#include "tokenizer.h"

#include "common.h"
#include "gguf.h"
#include "unicode.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sparrow {

namespace {

// The token texts llama.cpp treats as ending generation wherever they appear in a vocab, in the
// order used to pick an end-of-turn token for vocabs that do not name one.
const char * const END_OF_GENERATION_TEXTS[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<|eom_id|>", "<EOT>", "_<EOT>",
};

struct Merge {
    int32_t rank;
    int32_t result;  // token id of the merged symbol
};

uint64_t pair_key(int32_t left, int32_t right) {
    return ((uint64_t) (uint32_t) left << 32) | (uint32_t) right;
}

// A candidate merge of the symbol at `left` with its right neighbour. It may be stale by the
// time it is popped (either side already merged into something else); the ids say.
struct MergeCandidate {
    int32_t rank;
    int32_t result;    // id of the merged symbol
    int32_t left;      // position of the left symbol (its first byte in the piece)
    int32_t left_id;
    int32_t right_id;
    bool operator>(const MergeCandidate & o) const {
        return rank != o.rank ? rank > o.rank : left > o.left;
    }
};

// Per-call working memory reused across the pieces of one encode call.
struct BpeScratch {
    std::vector<int32_t> ids, prev, next;
    std::vector<MergeCandidate> heap;
    std::string piece_bytes;
    std::string byte_level;
};

// The texts of the special (CONTROL, USER_DEFINED, UNKNOWN) tokens as a byte trie, so finding
// the longest one starting at a position costs at most its length, however many there are.
class SpecialTokenTrie {
public:
    void insert(const std::string & text, int32_t token) {
        int32_t node = 0;
        for (unsigned char c : text) {
            int32_t child = find_child(node, c);
            if (child < 0) {
                child = (int32_t) nodes_.size();
                nodes_[node].children.emplace_back(c, child);
                nodes_.emplace_back();
            }
            node = child;
        }
        if (nodes_[node].token < 0) nodes_[node].token = token;  // on duplicate texts the first id wins
    }

    // The longest token accepted by `allowed` that text[pos...] starts with, as (id, length);
    // (-1, 0) if none.
    template <typename Allowed>
    std::pair<int32_t, size_t> longest_match(std::string_view text, size_t pos, const Allowed & allowed) const {
        std::pair<int32_t, size_t> best(-1, 0);
        int32_t node = 0;
        for (size_t i = pos; i < text.size(); ++i) {
            node = find_child(node, (unsigned char) text[i]);
            if (node < 0) break;
            const int32_t token = nodes_[node].token;
            if (token >= 0 && allowed(token)) best = {token, i + 1 - pos};
        }
        return best;
    }

private:
    struct Node {
        std::vector<std::pair<unsigned char, int32_t>> children;
        int32_t token = -1;
    };
    int32_t find_child(int32_t node, unsigned char c) const {
        for (const auto & edge : nodes_[node].children) {
            if (edge.first == c) return edge.second;
        }
        return -1;
    }
    std::vector<Node> nodes_ = std::vector<Node>(1);  // nodes_[0] is the root
};

}  // namespace

struct Tokenizer::Impl {
    unicode::PreTokenizer pre_tokenizer = unicode::PreTokenizer::GPT2;
    bool normalize_nfc = false;
    // Llama 3 (HF "ignore_merges"): a piece that is itself a token is taken whole, unmerged.
    bool ignore_merges = false;

    std::vector<std::string> texts;
    std::vector<TokenType> types;
    std::unordered_map<std::string, int32_t> id_of_text;
    std::unordered_map<uint64_t, Merge> merges;
    int32_t byte_token[256];  // id of each byte's one-character token; -1 if the vocab lacks it

    SpecialTokenTrie special_tokens;

    int32_t bos = -1, eos = -1, eot = -1, eom = -1, unk = -1;
    int32_t pad = -1;  // read for completeness; encoding never emits it
    bool add_bos = false, add_eos = false;
    std::vector<int32_t> end_of_generation;

    void load(const GGUFFile & file);
    void encode_fragment(std::string_view text, BpeScratch & scratch, std::vector<int32_t> & out) const;
    void encode_piece(BpeScratch & scratch, std::vector<int32_t> & out) const;
    void push_symbol(int32_t id, std::vector<int32_t> & out) const;
};

// ---- loading -----------------------------------------------------------------------------

void Tokenizer::Impl::load(const GGUFFile & file) {
    const std::string model = file.get_string("tokenizer.ggml.model");
    if (model != "gpt2") {
        fail(SPARROW_ERR_UNSUPPORTED,
             format("tokenizer.ggml.model '%s' is not supported (only 'gpt2', byte-level BPE)", model.c_str()));
    }

    // Pre-tokenizer names as llama.cpp's converter writes them. A file without the key is
    // treated as "default", which we take to be plain GPT-2 splitting (llama.cpp's "default"
    // uses a different, legacy regex set that no model we run depends on).
    const std::string pre = file.get_string("tokenizer.ggml.pre", "default");
    if (pre == "qwen2") {
        pre_tokenizer = unicode::PreTokenizer::QWEN2;
        normalize_nfc = true;  // Qwen2's tokenizer.json normalizer is NFC
    } else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") {
        pre_tokenizer = unicode::PreTokenizer::LLAMA3;
        ignore_merges = true;
        add_bos = true;
    } else if (pre == "gpt-2" || pre == "default") {
        pre_tokenizer = unicode::PreTokenizer::GPT2;
    } else if (pre == "smollm") {
        pre_tokenizer = unicode::PreTokenizer::SMOLLM;
    } else {
        fail(SPARROW_ERR_UNSUPPORTED, format("tokenizer.ggml.pre '%s' is not supported "
             "(supported: qwen2, llama-bpe, gpt-2, smollm, default)", pre.c_str()));
    }

    texts = file.get_string_array("tokenizer.ggml.tokens");
    if (texts.empty() || texts.size() > (size_t) INT32_MAX) {
        fail(SPARROW_ERR_FORMAT, format("tokenizer.ggml.tokens has %zu entries", texts.size()));
    }
    const int32_t n_vocab = (int32_t) texts.size();

    types.assign(texts.size(), TokenType::NORMAL);
    if (file.has("tokenizer.ggml.token_type")) {
        const std::vector<int64_t> raw = file.get_int_array("tokenizer.ggml.token_type");
        if (raw.size() != texts.size()) {
            fail(SPARROW_ERR_FORMAT, format("tokenizer.ggml.token_type has %zu entries for %zu tokens",
                                            raw.size(), texts.size()));
        }
        for (size_t i = 0; i < raw.size(); ++i) {
            if (raw[i] < (int64_t) TokenType::UNDEFINED || raw[i] > (int64_t) TokenType::BYTE) {
                fail(SPARROW_ERR_FORMAT, format("token %zu has unknown type %lld", i, (long long) raw[i]));
            }
            types[i] = (TokenType) raw[i];
        }
    }

    id_of_text.reserve(texts.size());
    for (int32_t id = 0; id < n_vocab; ++id) {
        id_of_text.emplace(texts[id], id);  // on duplicates the first id wins
    }

    for (int b = 0; b < 256; ++b) {
        std::string text;
        unicode::utf8_append(text, unicode::byte_to_codepoint((uint8_t) b));
        auto it = id_of_text.find(text);
        byte_token[b] = it == id_of_text.end() ? -1 : it->second;
    }

    const std::vector<std::string> merge_texts = file.get_string_array("tokenizer.ggml.merges");
    merges.reserve(merge_texts.size());
    auto token_named = [&](const std::string & text, size_t rank) {
        auto it = id_of_text.find(text);
        if (it == id_of_text.end()) {
            fail(SPARROW_ERR_FORMAT, format("merge %zu names '%s', which is not in the vocab", rank, text.c_str()));
        }
        return it->second;
    };
    for (size_t rank = 0; rank < merge_texts.size(); ++rank) {
        const std::string & m = merge_texts[rank];
        // "left right"; searching from 1 lets a left side that is a lone space parse too
        const size_t space = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
        if (space == std::string::npos || rank > (size_t) INT32_MAX) {
            fail(SPARROW_ERR_FORMAT, format("merge %zu ('%s') is not of the form 'left right'", rank, m.c_str()));
        }
        const std::string left = m.substr(0, space);
        const std::string right = m.substr(space + 1);
        const int32_t left_id = token_named(left, rank);
        const int32_t right_id = token_named(right, rank);
        const int32_t result_id = token_named(left + right, rank);
        merges.emplace(pair_key(left_id, right_id), Merge{(int32_t) rank, result_id});  // first rank wins
    }

    auto special_id = [&](const char * key) -> int32_t {
        const int64_t id = file.get_int(key, -1);
        // llama.cpp ignores ids outside the vocab (some converters wrote them); so do we
        return id >= 0 && id < n_vocab ? (int32_t) id : -1;
    };
    bos = special_id("tokenizer.ggml.bos_token_id");
    eos = special_id("tokenizer.ggml.eos_token_id");
    eot = special_id("tokenizer.ggml.eot_token_id");
    eom = special_id("tokenizer.ggml.eom_token_id");
    pad = special_id("tokenizer.ggml.padding_token_id");
    unk = special_id("tokenizer.ggml.unknown_token_id");
    add_bos = file.get_bool("tokenizer.ggml.add_bos_token", add_bos);
    add_eos = file.get_bool("tokenizer.ggml.add_eos_token", add_eos);

    for (int32_t id : {eos, eot, eom}) {
        if (id >= 0) end_of_generation.push_back(id);
    }
    for (const char * text : END_OF_GENERATION_TEXTS) {
        auto it = id_of_text.find(text);
        if (it == id_of_text.end()) continue;
        if (eot < 0 && std::strcmp(text, "<|eom_id|>") != 0) eot = it->second;
        end_of_generation.push_back(it->second);
    }
    std::sort(end_of_generation.begin(), end_of_generation.end());
    end_of_generation.erase(std::unique(end_of_generation.begin(), end_of_generation.end()), end_of_generation.end());

    for (int32_t id = 0; id < n_vocab; ++id) {
        const TokenType t = types[id];
        const bool special = t == TokenType::CONTROL || t == TokenType::USER_DEFINED || t == TokenType::UNKNOWN;
        if (special && !texts[id].empty()) special_tokens.insert(texts[id], id);
    }
}

// ---- encoding ----------------------------------------------------------------------------

void Tokenizer::Impl::push_symbol(int32_t id, std::vector<int32_t> & out) const {
    if (id >= 0) {
        out.push_back(id);
    } else if (unk >= 0) {
        out.push_back(unk);  // a byte the vocab cannot spell; dropped if there is no unknown token
    }
}

void Tokenizer::Impl::encode_piece(BpeScratch & s, std::vector<int32_t> & out) const {
    const std::string & bytes = s.piece_bytes;
    const size_t n = bytes.size();
    if (n == 0) return;
    if (n == 1) {
        push_symbol(byte_token[(uint8_t) bytes[0]], out);
        return;
    }
    if (ignore_merges) {
        s.byte_level.clear();
        for (unsigned char b : bytes) unicode::utf8_append(s.byte_level, unicode::byte_to_codepoint(b));
        auto it = id_of_text.find(s.byte_level);
        if (it != id_of_text.end()) {
            out.push_back(it->second);
            return;
        }
    }

    // symbols form a doubly linked list over the bytes; a merged-away symbol's id becomes -1
    s.ids.resize(n);
    s.prev.resize(n);
    s.next.resize(n);
    for (size_t i = 0; i < n; ++i) {
        s.ids[i] = byte_token[(uint8_t) bytes[i]];
        s.prev[i] = (int32_t) i - 1;
        s.next[i] = i + 1 < n ? (int32_t) (i + 1) : -1;
    }

    // min-heap on (rank, left position), kept in scratch memory
    std::vector<MergeCandidate> & heap = s.heap;
    heap.clear();
    const std::greater<MergeCandidate> later;
    auto consider = [&](int32_t left) {
        if (left < 0) return;
        const int32_t right = s.next[left];
        if (right < 0 || s.ids[left] < 0 || s.ids[right] < 0) return;
        auto it = merges.find(pair_key(s.ids[left], s.ids[right]));
        if (it == merges.end()) return;
        heap.push_back({it->second.rank, it->second.result, left, s.ids[left], s.ids[right]});
        std::push_heap(heap.begin(), heap.end(), later);
    };
    for (int32_t i = 0; i + 1 < (int32_t) n; ++i) consider(i);

    while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), later);
        const MergeCandidate c = heap.back();
        heap.pop_back();
        const int32_t right = s.next[c.left];
        if (s.ids[c.left] != c.left_id || right < 0 || s.ids[right] != c.right_id) continue;  // stale
        s.ids[c.left] = c.result;
        s.ids[right] = -1;
        s.next[c.left] = s.next[right];
        if (s.next[right] >= 0) s.prev[s.next[right]] = c.left;
        consider(s.prev[c.left]);
        consider(c.left);
    }

    for (int32_t i = 0; i >= 0; i = s.next[i]) push_symbol(s.ids[i], out);
}

void Tokenizer::Impl::encode_fragment(std::string_view text, BpeScratch & scratch, std::vector<int32_t> & out) const {
    if (text.empty()) return;
    std::vector<uint32_t> cps = unicode::utf8_to_codepoints(text);
    if (normalize_nfc) unicode::nfc_in_place(cps);

    std::vector<size_t> piece_ends;
    unicode::pretokenize(pre_tokenizer, cps.data(), cps.size(), piece_ends);

    size_t begin = 0;
    for (size_t end : piece_ends) {
        scratch.piece_bytes.clear();
        for (size_t i = begin; i < end; ++i) unicode::utf8_append(scratch.piece_bytes, cps[i]);
        encode_piece(scratch, out);
        begin = end;
    }
}

// ---- public interface ------------------------------------------------------------------------

Tokenizer::Tokenizer() : impl_(new Impl()) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const GGUFFile & file) {
    std::unique_ptr<Tokenizer> tokenizer(new Tokenizer());
    tokenizer->impl_->load(file);
    return tokenizer;
}

int32_t Tokenizer::n_vocab() const { return (int32_t) impl_->texts.size(); }
int32_t Tokenizer::bos() const { return impl_->bos; }
int32_t Tokenizer::eos() const { return impl_->eos; }
int32_t Tokenizer::eot() const { return impl_->eot; }
bool Tokenizer::add_bos() const { return impl_->add_bos; }

bool Tokenizer::is_eog(int32_t token) const {
    const auto & eog = impl_->end_of_generation;
    return std::binary_search(eog.begin(), eog.end(), token);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
    const Impl & m = *impl_;
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 2);
    if (add_special && m.add_bos && m.bos >= 0) out.push_back(m.bos);

    // USER_DEFINED tokens are always matched; CONTROL (and UNKNOWN) ones only when asked to,
    // as in llama.cpp
    auto allowed = [&](int32_t id) { return parse_special || m.types[id] == TokenType::USER_DEFINED; };

    BpeScratch scratch;
    size_t fragment_begin = 0;
    size_t pos = 0;
    while (pos < text.size()) {
        const std::pair<int32_t, size_t> match = m.special_tokens.longest_match(text, pos, allowed);
        if (match.first < 0) {
            ++pos;
            continue;
        }
        m.encode_fragment(text.substr(fragment_begin, pos - fragment_begin), scratch, out);
        out.push_back(match.first);
        pos += match.second;
        fragment_begin = pos;
    }
    m.encode_fragment(text.substr(fragment_begin), scratch, out);

    if (add_special && m.add_eos && m.eos >= 0) out.push_back(m.eos);
    return out;
}

std::string Tokenizer::token_to_piece(int32_t token, bool special) const {
    const Impl & m = *impl_;
    if (token < 0 || token >= n_vocab()) {
        fail(SPARROW_ERR_INVALID_ARGUMENT, format("token id %d is out of range [0, %d)", token, n_vocab()));
    }
    const std::string & text = m.texts[token];
    switch (m.types[token]) {
        case TokenType::USER_DEFINED:
            return text;  // stored verbatim, not in the byte-level alphabet
        case TokenType::CONTROL:
        case TokenType::UNKNOWN:
            return special ? text : std::string();
        case TokenType::UNUSED:
            return std::string();
        case TokenType::BYTE: {
            // "<0xAB>": one raw byte (SentencePiece style; unusual in byte-level vocabs)
            unsigned value = 0;
            if (text.size() == 6 && std::sscanf(text.c_str(), "<0x%2x>", &value) == 1) {
                return std::string(1, (char) value);
            }
            return text;
        }
        case TokenType::UNDEFINED:
        case TokenType::NORMAL:
            break;
    }
    // undo the byte-level spelling; a code point outside the alphabet is kept as UTF-8
    std::string bytes;
    bytes.reserve(text.size());
    for (size_t pos = 0; pos < text.size();) {
        const uint32_t cp = unicode::utf8_decode_next(text, pos);
        const int byte = unicode::codepoint_to_byte(cp);
        if (byte >= 0) {
            bytes += (char) byte;
        } else {
            unicode::utf8_append(bytes, cp);
        }
    }
    return bytes;
}

}  // namespace sparrow
