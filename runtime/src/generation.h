// generation.h - the generation state machine behind sparrow_generate_begin, _begin_media and
// _next: checking a generation's parameters and laying out its prompt (media rows included), then,
// a call at a time, the prefill, a plain decode step or a speculative round, the stop strings and
// finish reasons, and the outbox that hands the text out in buffer-sized pieces. It lives apart
// from api.cpp so that the C entry points stay thin shims around it.
//
// Both throw sparrow::Error like the rest of the runtime: the caller runs them inside guard()
// (api-common.h) with the context claimed, one claim per C call.
#pragma once

#include "sparrow.h"

#include <cstddef>
#include <cstdint>

namespace sparrow {

// Check the parameters and the prompt, lay out its media, and start a generation on ctx, keeping
// the longest cached prefix the prompt can reuse.
void generation_begin(sparrow_context & ctx, const sparrow_token * prompt, int32_t n_prompt, const sparrow_media * media,
                      int32_t n_media, sparrow_generate_params params);

// The next piece of text, with the size protocol and finish reasons of sparrow_generate_next.
void generation_next(sparrow_context & ctx, char * buf, size_t buf_size, size_t * out_len, int32_t * out_finish,
                     sparrow_token * out_token);

}  // namespace sparrow
