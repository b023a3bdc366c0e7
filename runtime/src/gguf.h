// gguf.h - GGUF reader: maps a file (or takes a buffer) and validates everything before use.
//
// Every count, string length, value type, tensor shape, type, offset and alignment is checked
// against the file size while parsing, so a truncated, corrupted or hostile file raises
// sparrow::Error(SPARROW_ERR_FORMAT) and never causes an out-of-bounds read. Readers of
// metadata go through the typed getters, which raise on a missing key or a wrong type.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace sparrow {

enum class GGUFType : uint32_t {
    UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};

const char * gguf_type_name(GGUFType type);

struct GGUFValue {
    GGUFType type = GGUFType::UINT8;
    // scalars (integers widened; floats as double)
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0.0;
    std::string str;
    // arrays: element type and count; strings are decoded, numbers stay in the mapped file
    GGUFType array_type = GGUFType::UINT8;
    uint64_t array_n = 0;
    std::vector<std::string> array_strings;
    const uint8_t * array_data = nullptr;
};

struct GGUFTensorInfo {
    std::string name;
    uint32_t type = 0;          // ggml type id
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // ne[0] is the contiguous (row) dimension, as in ggml
    uint64_t offset = 0;        // relative to the start of the data section
    uint64_t nbytes = 0;
    int64_t numel() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

class GGUFFile {
public:
    // Open and validate a file. use_mmap=false reads it into memory instead.
    static std::unique_ptr<GGUFFile> open(const std::string & path, bool use_mmap = true);
    // Parse a caller-owned buffer (kept alive by the caller), e.g. for fuzzing.
    static std::unique_ptr<GGUFFile> from_memory(const void * data, size_t size);
    ~GGUFFile();
    GGUFFile(const GGUFFile &) = delete;
    GGUFFile & operator=(const GGUFFile &) = delete;

    uint32_t version() const { return version_; }
    size_t size() const { return size_; }
    const std::string & path() const { return path_; }

    // metadata
    const std::vector<std::string> & keys() const { return key_order_; }
    const GGUFValue * find(const std::string & key) const;
    bool has(const std::string & key) const { return find(key) != nullptr; }
    std::string get_string(const std::string & key) const;
    std::string get_string(const std::string & key, const std::string & fallback) const;
    int64_t get_int(const std::string & key) const;
    int64_t get_int(const std::string & key, int64_t fallback) const;
    double get_float(const std::string & key) const;
    double get_float(const std::string & key, double fallback) const;
    bool get_bool(const std::string & key, bool fallback) const;
    std::vector<std::string> get_string_array(const std::string & key) const;
    std::vector<int64_t> get_int_array(const std::string & key) const;
    std::vector<float> get_float_array(const std::string & key) const;

    // tensors
    const std::vector<GGUFTensorInfo> & tensors() const { return tensors_; }
    const GGUFTensorInfo * find_tensor(const std::string & name) const;
    const uint8_t * tensor_data(const GGUFTensorInfo & info) const { return data_ + info.offset; }

private:
    GGUFFile() = default;
    void parse();

    std::string path_;
    const uint8_t * base_ = nullptr;
    size_t size_ = 0;
    void * mapping_ = nullptr;        // mmap'd region, if any
    std::vector<uint8_t> owned_;      // file contents when not mmap'd
    uint32_t version_ = 0;
    const uint8_t * data_ = nullptr;  // start of the tensor data section
    std::vector<std::string> key_order_;
    std::unordered_map<std::string, GGUFValue> kv_;
    std::vector<GGUFTensorInfo> tensors_;
    std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace sparrow
