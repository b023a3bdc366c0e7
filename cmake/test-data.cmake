# test-data.cmake - unpack the compressed test data the C++ tests read.
#
# tests/data/vocab.tar.xz holds llama.cpp's vocab-only GGUFs with their tokenizer test vectors
# (ggml-vocab-{gpt-2,llama-bpe,qwen2}.gguf + .inp/.out, under vocab/). It is extracted at
# configure time into ${CMAKE_BINARY_DIR}/test-data/vocab, again whenever the archive changes,
# and test_tokenizer is told where through the SPARROW_TEST_VOCAB_DIR compile definition.
#
# Include it after the test targets exist (inside if(SPARROW_BUILD_TESTS), after the loop that
# creates the tests/cpp/test_*.cpp executables).

set(SPARROW_TEST_DATA_DIR ${CMAKE_BINARY_DIR}/test-data)
set(SPARROW_VOCAB_ARCHIVE ${CMAKE_SOURCE_DIR}/tests/data/vocab.tar.xz)
set(SPARROW_VOCAB_STAMP ${SPARROW_TEST_DATA_DIR}/vocab.stamp)

# re-run configure (and so the extraction) when the archive is replaced
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${SPARROW_VOCAB_ARCHIVE})

if(NOT EXISTS ${SPARROW_VOCAB_STAMP} OR ${SPARROW_VOCAB_ARCHIVE} IS_NEWER_THAN ${SPARROW_VOCAB_STAMP})
  file(REMOVE_RECURSE ${SPARROW_TEST_DATA_DIR}/vocab)
  file(ARCHIVE_EXTRACT INPUT ${SPARROW_VOCAB_ARCHIVE} DESTINATION ${SPARROW_TEST_DATA_DIR})
  file(TOUCH ${SPARROW_VOCAB_STAMP})
endif()

if(TARGET test_tokenizer)
  target_compile_definitions(test_tokenizer PRIVATE
    SPARROW_TEST_VOCAB_DIR="${SPARROW_TEST_DATA_DIR}/vocab")
endif()
