# Install rules for C and C++ apps, included by CMakeLists.txt when the Python package is not being
# built. `cmake --install build --prefix P` lays out:
#   P/lib/libsparrow.so -> libsparrow.so.<ABI> -> libsparrow.so.<version>, P/lib/libsparrow.a
#   P/include/sparrow.h
#   P/lib/cmake/Sparrow/   find_package(Sparrow): Sparrow::sparrow (shared), Sparrow::sparrow_static
#   P/lib/pkgconfig/sparrow.pc
#   P/bin/sparrow-cli      (with SPARROW_BUILD_TOOLS)
# (lib/ is GNUInstallDirs' CMAKE_INSTALL_LIBDIR: lib/<multiarch> for a Debian /usr prefix.)
# tests/test_install_layout.py installs into a temporary prefix and builds runtime/tools/example.c
# against it both ways.
include(CMakePackageConfigHelpers)

# The ABI version in the soname. Before 1.0 the C API still changes between minor versions, so an
# app built against 0.1 must not load 0.2: the soname carries major.minor (libsparrow.so.0.1), and
# find_package accepts only the same minor. From 1.0 on, the major alone.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(SPARROW_SOVERSION 0.${PROJECT_VERSION_MINOR})
  set(SPARROW_COMPATIBILITY SameMinorVersion)
else()
  set(SPARROW_SOVERSION ${PROJECT_VERSION_MAJOR})
  set(SPARROW_COMPATIBILITY SameMajorVersion)
endif()
set_target_properties(sparrow PROPERTIES VERSION ${PROJECT_VERSION} SOVERSION ${SPARROW_SOVERSION})

install(TARGETS sparrow sparrow_static EXPORT SparrowTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# the public header only: runtime/src holds internals that apps must not reach
install(FILES ${PROJECT_SOURCE_DIR}/runtime/include/sparrow.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

# ---- CMake package: find_package(Sparrow) -----------------------------------------------------
set(SPARROW_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/Sparrow)
install(EXPORT SparrowTargets NAMESPACE Sparrow:: DESTINATION ${SPARROW_CMAKE_DIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/SparrowConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/SparrowConfig.cmake
                              INSTALL_DESTINATION ${SPARROW_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/SparrowConfigVersion.cmake
                                 COMPATIBILITY ${SPARROW_COMPATIBILITY})
install(FILES ${PROJECT_BINARY_DIR}/SparrowConfig.cmake ${PROJECT_BINARY_DIR}/SparrowConfigVersion.cmake
        DESTINATION ${SPARROW_CMAKE_DIR})

# ---- pkg-config: sparrow.pc -------------------------------------------------------------------
# The prefix is written relative to the .pc file's own folder (${pcfiledir}), not as the prefix
# known at configure time: `cmake --install --prefix P` chooses P only at install time, and a
# relative prefix also survives moving the installed tree.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(SPARROW_PC_PREFIX ${CMAKE_INSTALL_PREFIX})
  set(SPARROW_PC_LIBDIR ${CMAKE_INSTALL_FULL_LIBDIR})
  set(SPARROW_PC_INCLUDEDIR ${CMAKE_INSTALL_FULL_INCLUDEDIR})
else()
  file(RELATIVE_PATH SPARROW_PC_UP /p/${CMAKE_INSTALL_LIBDIR}/pkgconfig /p)
  string(REGEX REPLACE "/$" "" SPARROW_PC_UP "${SPARROW_PC_UP}")
  set(SPARROW_PC_PREFIX "\${pcfiledir}/${SPARROW_PC_UP}")
  set(SPARROW_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
  set(SPARROW_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file(${CMAKE_CURRENT_LIST_DIR}/sparrow.pc.in ${PROJECT_BINARY_DIR}/sparrow.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/sparrow.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

# ---- sparrow-cli --------------------------------------------------------------------------------
if(SPARROW_BUILD_TOOLS)
  # runs from P/bin without LD_LIBRARY_PATH: the library is found relative to the executable
  file(RELATIVE_PATH SPARROW_BIN_TO_LIB /p/${CMAKE_INSTALL_BINDIR} /p/${CMAKE_INSTALL_LIBDIR})
  set_target_properties(sparrow-cli PROPERTIES INSTALL_RPATH "$ORIGIN/${SPARROW_BIN_TO_LIB}")
  install(TARGETS sparrow-cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
