// unicode.cpp - UTF-8 coding, categories, NFC, the byte-level alphabet and the pre-tokenizers
// (see unicode.h for the conventions).
#include "unicode.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace sparrow {
namespace unicode {

// ---- UTF-8 ---------------------------------------------------------------------------------

uint32_t utf8_decode_next(std::string_view text, size_t & pos) {
    const auto * s = reinterpret_cast<const uint8_t *>(text.data());
    const size_t n = text.size();
    const uint8_t lead = s[pos];
    if (lead < 0x80) {
        pos += 1;
        return lead;
    }
    // Well-formed sequences per the Unicode standard (table 3-7). The second byte's range is
    // narrower after E0, ED, F0 and F4: that is what rules out overlong forms, surrogates and
    // values above U+10FFFF.
    size_t len = 0;
    uint32_t cp = 0;
    uint8_t second_lo = 0x80, second_hi = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
        len = 2; cp = lead & 0x1F;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
        len = 3; cp = lead & 0x0F;
        if (lead == 0xE0) second_lo = 0xA0;
        if (lead == 0xED) second_hi = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
        len = 4; cp = lead & 0x07;
        if (lead == 0xF0) second_lo = 0x90;
        if (lead == 0xF4) second_hi = 0x8F;
    }
    if (len == 0 || n - pos < len) {
        pos += 1;
        return RAW_BYTE_BASE + lead;
    }
    for (size_t k = 1; k < len; ++k) {
        const uint8_t b = s[pos + k];
        const uint8_t lo = k == 1 ? second_lo : 0x80;
        const uint8_t hi = k == 1 ? second_hi : 0xBF;
        if (b < lo || b > hi) {
            pos += 1;
            return RAW_BYTE_BASE + lead;
        }
        cp = (cp << 6) | (b & 0x3F);
    }
    pos += len;
    return cp;
}

std::vector<uint32_t> utf8_to_codepoints(std::string_view text) {
    std::vector<uint32_t> cps;
    cps.reserve(text.size());
    for (size_t pos = 0; pos < text.size();) {
        cps.push_back(utf8_decode_next(text, pos));
    }
    return cps;
}

void utf8_append(std::string & out, uint32_t cp) {
    if (cp < 0x80) {
        out += (char) cp;
    } else if (cp < 0x800) {
        out += (char) (0xC0 | (cp >> 6));
        out += (char) (0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += (char) (0xE0 | (cp >> 12));
        out += (char) (0x80 | ((cp >> 6) & 0x3F));
        out += (char) (0x80 | (cp & 0x3F));
    } else if (cp <= MAX_CODEPOINT) {
        out += (char) (0xF0 | (cp >> 18));
        out += (char) (0x80 | ((cp >> 12) & 0x3F));
        out += (char) (0x80 | ((cp >> 6) & 0x3F));
        out += (char) (0x80 | (cp & 0x3F));
    } else if (is_raw_byte(cp)) {
        out += (char) (cp - RAW_BYTE_BASE);
    } else {
        out += "\xEF\xBF\xBD";  // not a code point at all: U+FFFD
    }
}

std::string codepoints_to_utf8(const uint32_t * cps, size_t n) {
    std::string out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) utf8_append(out, cps[i]);
    return out;
}

bool utf8_is_valid(std::string_view text) {
    for (size_t pos = 0; pos < text.size();) {
        if (is_raw_byte(utf8_decode_next(text, pos))) return false;
    }
    return true;
}

// ---- general categories --------------------------------------------------------------------

namespace {

constexpr uint8_t PROP_CATEGORY_MASK = 0x07;
constexpr uint8_t PROP_WHITESPACE = 0x08;

Category category_from_runs(uint32_t cp) {
    const CategoryRun * begin = unicode_category_runs;
    const CategoryRun * end = unicode_category_runs + unicode_category_runs_count;
    const CategoryRun * it = std::upper_bound(begin, end, cp,
        [](uint32_t value, const CategoryRun & run) { return value < run.start; });
    return it == begin ? UCAT_OTHER : (Category) (it - 1)->category;
}

// The BMP holds nearly all text, so its properties are expanded once into a flat table
// (64 KiB); only supplementary code points pay for a binary search.
const std::array<uint8_t, 0x10000> & bmp_properties() {
    static const std::array<uint8_t, 0x10000> table = [] {
        std::array<uint8_t, 0x10000> t{};
        for (size_t r = 0; r < unicode_category_runs_count; ++r) {
            const uint32_t start = unicode_category_runs[r].start;
            const uint32_t stop = r + 1 < unicode_category_runs_count ? unicode_category_runs[r + 1].start : 0x110000;
            for (uint32_t cp = start; cp < stop && cp < 0x10000; ++cp) t[cp] = unicode_category_runs[r].category;
        }
        for (size_t r = 0; r < unicode_whitespace_ranges_count; ++r) {
            for (uint32_t cp = unicode_whitespace_ranges[r].first; cp <= unicode_whitespace_ranges[r].last; ++cp) {
                if (cp < 0x10000) t[cp] |= PROP_WHITESPACE;
            }
        }
        return t;
    }();
    return table;
}

}  // namespace

Category category(uint32_t cp) {
    if (cp < 0x10000) return (Category) (bmp_properties()[cp] & PROP_CATEGORY_MASK);
    if (cp > MAX_CODEPOINT) return UCAT_OTHER;  // raw bytes of ill-formed UTF-8
    return category_from_runs(cp);
}

bool is_whitespace(uint32_t cp) {
    // every White_Space code point is in the BMP
    return cp < 0x10000 && (bmp_properties()[cp] & PROP_WHITESPACE) != 0;
}

// ---- normalization -------------------------------------------------------------------------

namespace {

// Hangul syllables decompose and compose arithmetically (Unicode 3.12).
constexpr uint32_t HANGUL_S_BASE = 0xAC00, HANGUL_L_BASE = 0x1100, HANGUL_V_BASE = 0x1161, HANGUL_T_BASE = 0x11A7;
constexpr uint32_t HANGUL_L_COUNT = 19, HANGUL_V_COUNT = 21, HANGUL_T_COUNT = 28;
constexpr uint32_t HANGUL_N_COUNT = HANGUL_V_COUNT * HANGUL_T_COUNT;
constexpr uint32_t HANGUL_S_COUNT = HANGUL_L_COUNT * HANGUL_N_COUNT;

// Code points below U+0300 have combining class 0 and NFC_Quick_Check=Yes.
constexpr uint32_t FIRST_NORMALIZATION_RELEVANT = 0x300;

bool in_ranges(const CodepointRange * ranges, size_t count, uint32_t cp) {
    const CodepointRange * end = ranges + count;
    const CodepointRange * it = std::upper_bound(ranges, end, cp,
        [](uint32_t value, const CodepointRange & r) { return value < r.first; });
    return it != ranges && cp <= (it - 1)->last;
}

bool nfc_quick_check_yes(uint32_t cp) {
    return cp < FIRST_NORMALIZATION_RELEVANT ||
           !in_ranges(unicode_nfc_quick_check, unicode_nfc_quick_check_count, cp);
}

const Decomposition * find_decomposition(uint32_t cp) {
    const Decomposition * begin = unicode_decompositions;
    const Decomposition * end = unicode_decompositions + unicode_decompositions_count;
    const Decomposition * it = std::lower_bound(begin, end, cp,
        [](const Decomposition & d, uint32_t value) { return d.cp < value; });
    return it != end && it->cp == cp ? it : nullptr;
}

void decompose_canonical(uint32_t cp, std::vector<uint32_t> & out) {
    if (cp >= HANGUL_S_BASE && cp < HANGUL_S_BASE + HANGUL_S_COUNT) {
        const uint32_t index = cp - HANGUL_S_BASE;
        out.push_back(HANGUL_L_BASE + index / HANGUL_N_COUNT);
        out.push_back(HANGUL_V_BASE + (index % HANGUL_N_COUNT) / HANGUL_T_COUNT);
        if (index % HANGUL_T_COUNT != 0) out.push_back(HANGUL_T_BASE + index % HANGUL_T_COUNT);
        return;
    }
    const Decomposition * d = find_decomposition(cp);
    if (!d) {
        out.push_back(cp);
        return;
    }
    // the table holds one step; the parts may decompose further (e.g. U+1E08 -> U+00C7 U+0301)
    decompose_canonical(d->first, out);
    if (d->second != 0) decompose_canonical(d->second, out);
}

// (first << 32 | second) -> primary composite, sorted for binary search.
const std::vector<std::pair<uint64_t, uint32_t>> & composition_table() {
    static const std::vector<std::pair<uint64_t, uint32_t>> table = [] {
        std::vector<std::pair<uint64_t, uint32_t>> t;
        for (size_t i = 0; i < unicode_decompositions_count; ++i) {
            const Decomposition & d = unicode_decompositions[i];
            if (d.composes) t.emplace_back(((uint64_t) d.first << 32) | d.second, d.cp);
        }
        std::sort(t.begin(), t.end());
        return t;
    }();
    return table;
}

// The primary composite of starter + next, or 0 if there is none.
uint32_t compose_pair(uint32_t starter, uint32_t next) {
    if (starter >= HANGUL_L_BASE && starter < HANGUL_L_BASE + HANGUL_L_COUNT &&
        next >= HANGUL_V_BASE && next < HANGUL_V_BASE + HANGUL_V_COUNT) {
        return HANGUL_S_BASE + ((starter - HANGUL_L_BASE) * HANGUL_V_COUNT + (next - HANGUL_V_BASE)) * HANGUL_T_COUNT;
    }
    if (starter >= HANGUL_S_BASE && starter < HANGUL_S_BASE + HANGUL_S_COUNT &&
        (starter - HANGUL_S_BASE) % HANGUL_T_COUNT == 0 &&
        next > HANGUL_T_BASE && next < HANGUL_T_BASE + HANGUL_T_COUNT) {
        return starter + (next - HANGUL_T_BASE);
    }
    const auto & table = composition_table();
    const uint64_t key = ((uint64_t) starter << 32) | next;
    auto it = std::lower_bound(table.begin(), table.end(), key,
        [](const std::pair<uint64_t, uint32_t> & e, uint64_t value) { return e.first < value; });
    return it != table.end() && it->first == key ? it->second : 0;
}

// NFC_Quick_Check over the whole text: every code point "Yes" and marks in canonical order.
bool is_nfc_quick(const std::vector<uint32_t> & cps) {
    uint8_t last_ccc = 0;
    for (uint32_t cp : cps) {
        if (cp < FIRST_NORMALIZATION_RELEVANT) {
            last_ccc = 0;
            continue;
        }
        const uint8_t ccc = combining_class(cp);
        if (ccc != 0 && last_ccc > ccc) return false;
        if (!nfc_quick_check_yes(cp)) return false;
        last_ccc = ccc;
    }
    return true;
}

}  // namespace

uint8_t combining_class(uint32_t cp) {
    if (cp < FIRST_NORMALIZATION_RELEVANT || cp > MAX_CODEPOINT) return 0;
    const CombiningClassRange * begin = unicode_ccc_ranges;
    const CombiningClassRange * end = unicode_ccc_ranges + unicode_ccc_ranges_count;
    const CombiningClassRange * it = std::upper_bound(begin, end, cp,
        [](uint32_t value, const CombiningClassRange & r) { return value < r.first; });
    return it != begin && cp <= (it - 1)->last ? (it - 1)->ccc : 0;
}

void nfc_in_place(std::vector<uint32_t> & cps) {
    if (is_nfc_quick(cps)) return;

    // 1. full canonical decomposition
    std::vector<uint32_t> out;
    out.reserve(cps.size() + cps.size() / 4);
    for (uint32_t cp : cps) decompose_canonical(cp, out);

    // 2. canonical ordering: a stable sort of each run of non-starters by combining class
    //    (a real sort, not insertion: hostile text can carry thousands of marks in a row)
    std::vector<uint8_t> ccc(out.size());
    for (size_t i = 0; i < out.size(); ++i) ccc[i] = combining_class(out[i]);
    std::vector<std::pair<uint8_t, uint32_t>> run;
    for (size_t i = 0; i < out.size();) {
        if (ccc[i] == 0) {
            ++i;
            continue;
        }
        size_t end = i;
        while (end < out.size() && ccc[end] != 0) ++end;
        if (end - i > 1) {
            run.clear();
            for (size_t k = i; k < end; ++k) run.emplace_back(ccc[k], out[k]);
            std::stable_sort(run.begin(), run.end(),
                             [](const std::pair<uint8_t, uint32_t> & a, const std::pair<uint8_t, uint32_t> & b) {
                                 return a.first < b.first;
                             });
            for (size_t k = i; k < end; ++k) {
                ccc[k] = run[k - i].first;
                out[k] = run[k - i].second;
            }
        }
        i = end;
    }

    // 3. canonical composition: each character combines with the last starter if nothing
    //    between them blocks it (a starter, or a mark of the same or a higher class)
    size_t starter = 0;
    bool have_starter = !out.empty() && ccc[0] == 0;
    int last_ccc = out.empty() ? 0 : (have_starter ? 0 : 256);
    size_t kept = out.empty() ? 0 : 1;
    for (size_t i = 1; i < out.size(); ++i) {
        const uint32_t cp = out[i];
        const int cls = ccc[i];
        const bool blocked = last_ccc != 0 && last_ccc >= cls;
        const uint32_t composite = have_starter && !blocked ? compose_pair(out[starter], cp) : 0;
        if (composite != 0) {
            out[starter] = composite;
            continue;
        }
        if (cls == 0) {
            starter = kept;
            have_starter = true;
        }
        last_ccc = cls;
        out[kept++] = cp;
    }
    out.resize(kept);
    cps.swap(out);
}

// ---- GPT-2 byte-level alphabet ---------------------------------------------------------------

namespace {

struct ByteLevelAlphabet {
    uint32_t byte_to_cp[256];
    int16_t cp_to_byte[256 + 68];  // the alphabet never goes past U+0143
};

const ByteLevelAlphabet & byte_level_alphabet() {
    static const ByteLevelAlphabet alphabet = [] {
        ByteLevelAlphabet a{};
        std::fill(std::begin(a.cp_to_byte), std::end(a.cp_to_byte), (int16_t) -1);
        uint32_t next_substitute = 256;
        for (uint32_t b = 0; b < 256; ++b) {
            const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
            const uint32_t cp = printable ? b : next_substitute++;
            a.byte_to_cp[b] = cp;
            a.cp_to_byte[cp] = (int16_t) b;
        }
        return a;
    }();
    return alphabet;
}

}  // namespace

uint32_t byte_to_codepoint(uint8_t byte) {
    return byte_level_alphabet().byte_to_cp[byte];
}

int codepoint_to_byte(uint32_t cp) {
    const ByteLevelAlphabet & a = byte_level_alphabet();
    return cp < sizeof(a.cp_to_byte) / sizeof(a.cp_to_byte[0]) ? a.cp_to_byte[cp] : -1;
}

// ---- pre-tokenizers --------------------------------------------------------------------------

namespace {

// The regexes only ever ask which of these four mutually exclusive classes a code point is in.
enum CharClass : uint8_t { CLASS_OTHER = 0, CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE };

CharClass char_class(uint32_t cp) {
    if (is_whitespace(cp)) return CLASS_SPACE;
    switch (category(cp)) {
        case UCAT_LETTER: return CLASS_LETTER;
        case UCAT_NUMBER: return CLASS_NUMBER;
        default:          return CLASS_OTHER;
    }
}

bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// A window [begin, end) of the text that a regex is run over; the end is the end of the
// subject string as far as anchors and lookaheads are concerned.
struct Subject {
    const uint32_t * cps;
    const uint8_t * classes;
    size_t end;

    bool has(size_t i, CharClass c) const { return i < end && classes[i] == c; }
    // length of the run of class c starting at i, counting no further than max_len
    size_t run(size_t i, CharClass c, size_t max_len = SIZE_MAX) const {
        size_t j = i;
        while (j < end && classes[j] == c && j - i < max_len) ++j;
        return j - i;
    }
    // cps[i] equals the ASCII letter `lower`, or (ignore_case) its case variant: uppercase,
    // and for 's' U+017F LATIN SMALL LETTER LONG S, which Unicode case folding maps to 's'.
    bool letter_at(size_t i, char lower, bool ignore_case) const {
        if (i >= end) return false;
        const uint32_t cp = cps[i];
        if (cp == (uint32_t) lower) return true;
        if (!ignore_case) return false;
        return cp == (uint32_t) (lower - 'a' + 'A') || (lower == 's' && cp == 0x17F);
    }
};

// 's|'t|'re|'ve|'m|'ll|'d
size_t match_contraction(const Subject & s, size_t i, bool ignore_case) {
    if (s.cps[i] != '\'') return 0;
    if (s.letter_at(i + 1, 's', ignore_case) || s.letter_at(i + 1, 't', ignore_case) ||
        s.letter_at(i + 1, 'm', ignore_case) || s.letter_at(i + 1, 'd', ignore_case)) {
        return 2;
    }
    if ((s.letter_at(i + 1, 'r', ignore_case) && s.letter_at(i + 2, 'e', ignore_case)) ||
        (s.letter_at(i + 1, 'v', ignore_case) && s.letter_at(i + 2, 'e', ignore_case)) ||
        (s.letter_at(i + 1, 'l', ignore_case) && s.letter_at(i + 2, 'l', ignore_case))) {
        return 3;
    }
    return 0;
}

// \s+(?!\S)|\s+ at a whitespace run: the lookahead makes a run followed by a non-space give
// up its last character, which then prefixes the next word (" ?\p{L}+" and friends).
size_t match_trailing_whitespace(const Subject & s, size_t i) {
    const size_t width = s.run(i, CLASS_SPACE);
    return i + width < s.end && width > 1 ? width - 1 : width;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t match_gpt2(const Subject & s, size_t i) {
    if (size_t len = match_contraction(s, i, false)) return len;
    // the three " ?X+" alternatives: the class of the first non-space decides which applies
    size_t start = i;
    if (s.cps[i] == ' ' && i + 1 < s.end && s.classes[i + 1] != CLASS_SPACE) start = i + 1;
    if (s.classes[start] != CLASS_SPACE) {
        return (start - i) + s.run(start, (CharClass) s.classes[start]);
    }
    return match_trailing_whitespace(s, i);
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}
//   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
size_t match_llama3(const Subject & s, size_t i, size_t max_digits) {
    if (size_t len = match_contraction(s, i, true)) return len;

    const CharClass cls = (CharClass) s.classes[i];
    if (cls == CLASS_LETTER) return s.run(i, CLASS_LETTER);
    if (cls != CLASS_NUMBER && !is_newline(s.cps[i]) && s.has(i + 1, CLASS_LETTER)) {
        return 1 + s.run(i + 1, CLASS_LETTER);  // one leading space or symbol joins the word
    }
    if (cls == CLASS_NUMBER) return s.run(i, CLASS_NUMBER, max_digits);

    const size_t start = s.cps[i] == ' ' && s.has(i + 1, CLASS_OTHER) ? i + 1 : i;
    if (s.classes[start] == CLASS_OTHER) {
        size_t end = start + s.run(start, CLASS_OTHER);
        while (end < s.end && is_newline(s.cps[end])) ++end;
        return end - i;
    }

    // whitespace: \s*[\r\n]+ backtracks to end just after the run's last newline, if any
    const size_t width = s.run(i, CLASS_SPACE);
    for (size_t k = i + width; k > i; --k) {
        if (is_newline(s.cps[k - 1])) return k - i;
    }
    return match_trailing_whitespace(s, i);
}

void split_subject(PreTokenizer kind, const Subject & s, size_t begin, std::vector<size_t> & piece_ends) {
    size_t i = begin;
    while (i < s.end) {
        size_t len = 0;
        switch (kind) {
            case PreTokenizer::GPT2:
            case PreTokenizer::SMOLLM: len = match_gpt2(s, i); break;
            case PreTokenizer::LLAMA3: len = match_llama3(s, i, 3); break;
            case PreTokenizer::QWEN2:  len = match_llama3(s, i, 1); break;
        }
        if (len == 0) len = 1;  // unreachable (every class is matched); never loop forever
        i += len;
        piece_ends.push_back(i);
    }
}

}  // namespace

void pretokenize(PreTokenizer kind, const uint32_t * cps, size_t n, std::vector<size_t> & piece_ends) {
    std::vector<uint8_t> classes(n);
    for (size_t i = 0; i < n; ++i) classes[i] = char_class(cps[i]);

    if (kind != PreTokenizer::SMOLLM) {
        split_subject(kind, Subject{cps, classes.data(), n}, 0, piece_ends);
        return;
    }
    // SmolLM: each number character is a piece of its own; the GPT-2 regex then runs over each
    // stretch between them as a separate subject (so lookaheads stop at the digit).
    size_t i = 0;
    while (i < n) {
        if (classes[i] == CLASS_NUMBER) {
            piece_ends.push_back(++i);
            continue;
        }
        size_t stretch_end = i;
        while (stretch_end < n && classes[stretch_end] != CLASS_NUMBER) ++stretch_end;
        split_subject(PreTokenizer::GPT2, Subject{cps, classes.data(), stretch_end}, i, piece_ends);
        i = stretch_end;
    }
}

}  // namespace unicode
}  // namespace sparrow
