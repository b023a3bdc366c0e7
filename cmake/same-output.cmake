# ctest helper: run CLI twice, once plain and once with EXTRA_ARGS (';'-separated), and fail unless
# both succeed with byte-identical stdout. Speculative decoding must not change the text.
#   cmake -DCLI=... -DARGS="..." -DEXTRA_ARGS="..." -P same-output.cmake
execute_process(COMMAND ${CLI} ${ARGS} OUTPUT_VARIABLE plain ERROR_VARIABLE plain_err RESULT_VARIABLE plain_rc)
execute_process(COMMAND ${CLI} ${ARGS} ${EXTRA_ARGS} OUTPUT_VARIABLE spec ERROR_VARIABLE spec_err RESULT_VARIABLE spec_rc)
if(NOT plain_rc EQUAL 0 OR NOT spec_rc EQUAL 0)
  message(FATAL_ERROR "exit codes ${plain_rc} / ${spec_rc}\n${plain_err}\n${spec_err}")
endif()
if(NOT plain STREQUAL spec)
  message(FATAL_ERROR "outputs differ:\n--- plain\n${plain}\n--- with ${EXTRA_ARGS}\n${spec}")
endif()
if(NOT spec_err MATCHES "mean accepted length")
  message(FATAL_ERROR "no speculative statistics:\n${spec_err}")
endif()
message(STATUS "identical output (${spec_err})")
