// unicode.h - the Unicode pieces the byte-level BPE tokenizer needs: UTF-8 coding, general
// categories, NFC, the GPT-2 byte <-> code point alphabet, and the pre-tokenizer splitters.
//
// Ill-formed UTF-8: each byte that does not belong to a well-formed sequence (stray
// continuation bytes, truncated or overlong sequences, surrogates, values above U+10FFFF)
// decodes to its own pseudo code point RAW_BYTE_BASE + byte. Such a code point is classed as
// "other" (like punctuation), passes through NFC untouched and encodes back to the very same
// byte, so tokenizing never fails, never reads past the input, and detokenizing gives back the
// input bytes exactly. (llama.cpp substitutes U+FFFD instead, which loses the bytes; Hugging
// Face tokenizers only ever sees valid text.)
//
// The pre-tokenizers reproduce, with hand-written matchers over code points, what the
// Oniguruma regexes of the models' tokenizer.json files do in Hugging Face tokenizers
// (leftmost match, ordered alternation, greedy quantifiers with backtracking). The tables
// behind the categories and NFC are generated (unicode-data.cpp, scripts/gen_unicode_data.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sparrow {
namespace unicode {

constexpr uint32_t MAX_CODEPOINT = 0x10FFFF;
// Pseudo code points RAW_BYTE_BASE + b stand for a byte b of ill-formed UTF-8 (see above).
constexpr uint32_t RAW_BYTE_BASE = 0x110000;

inline bool is_raw_byte(uint32_t cp) { return cp >= RAW_BYTE_BASE && cp < RAW_BYTE_BASE + 256; }

// ---- UTF-8 ---------------------------------------------------------------------------------

// Decodes the code point starting at text[pos] and advances pos past it (by one byte for an
// ill-formed byte, which decodes to RAW_BYTE_BASE + byte). pos must be < text.size().
uint32_t utf8_decode_next(std::string_view text, size_t & pos);
std::vector<uint32_t> utf8_to_codepoints(std::string_view text);
// Appends the UTF-8 encoding of cp; a raw-byte pseudo code point appends its byte.
void utf8_append(std::string & out, uint32_t cp);
std::string codepoints_to_utf8(const uint32_t * cps, size_t n);
bool utf8_is_valid(std::string_view text);

// ---- general categories --------------------------------------------------------------------

// Major general category (the first letter of the Unicode category name).
enum Category : uint8_t {
    UCAT_OTHER = 0,        // C*: control, format, private use, surrogate, unassigned
    UCAT_LETTER,           // L*  (\p{L})
    UCAT_MARK,             // M*
    UCAT_NUMBER,           // N*  (\p{N})
    UCAT_PUNCTUATION,      // P*  (\p{P})
    UCAT_SYMBOL,           // S*
    UCAT_SEPARATOR,        // Z*
};

Category category(uint32_t cp);
// White_Space property, which is what \s means in Oniguruma's Unicode mode.
bool is_whitespace(uint32_t cp);
inline bool is_letter(uint32_t cp) { return category(cp) == UCAT_LETTER; }
inline bool is_number(uint32_t cp) { return category(cp) == UCAT_NUMBER; }

// ---- normalization -------------------------------------------------------------------------

uint8_t combining_class(uint32_t cp);
// Unicode Normalization Form C, in place. Text that passes the NFC quick check (the common
// case: ASCII, CJK, precomposed Latin) is left as it is without being rewritten.
void nfc_in_place(std::vector<uint32_t> & cps);

// ---- GPT-2 byte-level alphabet ---------------------------------------------------------------

// Byte-level BPE vocabularies spell every byte as a printable code point: bytes that are
// printable Latin-1 map to themselves, the other 68 to U+0100 and up, in byte order.
uint32_t byte_to_codepoint(uint8_t byte);
// The byte a code point of that alphabet stands for, or -1 if cp is not in the alphabet.
int codepoint_to_byte(uint32_t cp);

// ---- pre-tokenizers --------------------------------------------------------------------------

enum class PreTokenizer {
    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    GPT2,
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*
    //   |\s*[\r\n]+|\s+(?!\S)|\s+
    LLAMA3,
    // as LLAMA3 but \p{N} (single digits) instead of \p{N}{1,3}
    QWEN2,
    // every \p{N} isolated (HF Digits(individual_digits=true)), then GPT2 within each part
    SMOLLM,
};

// Splits cps[0, n) into consecutive pieces, which together always cover the whole input, and
// appends the end offset of each piece to piece_ends (so pieces are [prev_end, end)).
void pretokenize(PreTokenizer kind, const uint32_t * cps, size_t n, std::vector<size_t> & piece_ends);

// ---- generated tables (unicode-data.cpp) ---------------------------------------------------

struct CategoryRun { uint32_t start; uint8_t category; };
struct CodepointRange { uint32_t first, last; };
struct CombiningClassRange { uint32_t first, last; uint8_t ccc; };
// cp -> first [second]; second == 0 for a singleton. composes: NFC recomposes first+second.
struct Decomposition { uint32_t cp, first, second; uint8_t composes; };

extern const char * const unicode_data_version;
extern const CategoryRun unicode_category_runs[];
extern const size_t unicode_category_runs_count;
extern const CodepointRange unicode_whitespace_ranges[];
extern const size_t unicode_whitespace_ranges_count;
extern const CombiningClassRange unicode_ccc_ranges[];
extern const size_t unicode_ccc_ranges_count;
extern const Decomposition unicode_decompositions[];
extern const size_t unicode_decompositions_count;
extern const CodepointRange unicode_nfc_quick_check[];
extern const size_t unicode_nfc_quick_check_count;

}  // namespace unicode
}  // namespace sparrow
