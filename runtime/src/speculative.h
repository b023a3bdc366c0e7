// speculative.h - the draft/verify/accept/hand-off loop of Sparrow's speculative decoding.
//
// A round: the draft runs the committed entries that are pending (the text the target accepted
// since the last round, each with the target's own hidden states as its feature), then drafts
// n_draft tokens from its own hidden states; the target verifies them in one forward pass; the
// longest acceptable prefix plus one token from the target (the bonus) is kept. The target's
// KV cache is cut back to the accepted tokens and the draft forgets its speculative entries, so
// both end exactly where plain decoding of the produced tokens would have left them.
//
// Acceptance keeps the output the target's own: greedy, a draft token is kept only if it is the
// target's argmax; sampling, it is kept with probability min(1, p/q) and a rejection resamples
// from max(0, p - q), so every produced token is distributed as the target's (filtered) p.
#pragma once

#include <cstdint>
#include <vector>

struct sparrow_context;

namespace sparrow {

// Layers of the target the draft reads, in the order of the draft's taps.
const std::vector<int32_t> & spec_capture_layers(const sparrow_context & ctx);
// Layers to capture during the prompt's prefill: the taps, then the ivsb layer's output (the
// input of layer ivsb_layer + 1) when the draft has glimpses.
const std::vector<int32_t> & spec_prefill_capture_layers(const sparrow_context & ctx);
// The prompt's hand-off is collected while it is prefilled: spec_prefill_start before the
// prefill of prompt rows [0, n_prompt), then spec_prefill_chunk for each chunk's states captured
// at every row with spec_prefill_capture_layers ([n_capture][n_rows][n_embd], rows first_row..).
// Text rows keep their taps; visual rows only add their ivsb output to their glimpse segment.
void spec_prefill_start(sparrow_context & ctx, const int32_t * prompt, int32_t n_prompt);
void spec_prefill_chunk(sparrow_context & ctx, const int32_t * prompt, int32_t first_row, int32_t n_rows,
                        const float * hidden);
// After the prompt's prefill: enter the glimpses and queue the prompt's text entries for the
// draft. first_token is the token the target produced after the prompt. The first n_cached
// rows were kept from the cache (their text rows' features are in spec.text_g; visual rows
// among them are those the kept glimpses pooled); the n_fed after them were prefilled between
// spec_prefill_start and now.
void spec_begin(sparrow_context & ctx, int32_t n_cached, int32_t n_fed, int32_t first_token);
// How many of the `common` leading cache rows that match the prompt a speculative generation
// may keep: rows with known features, and visual rows only if they are exactly the ones the
// kept glimpses pooled and the prompt adds none (else the text before them).
int32_t spec_reusable_rows(const sparrow_context & ctx, const int32_t * prompt, int32_t n_prompt, int32_t common);
// One round; appends the tokens produced (accepted drafts, then the target's bonus token).
// Needs room for at least one token in the target cache.
void spec_round(sparrow_context & ctx, std::vector<int32_t> & produced);

}  // namespace sparrow
