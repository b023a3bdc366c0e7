// gguf.cpp - GGUF parsing with bounds checks on every read.
//
// Layout (v2/v3): magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, the key/value pairs,
// the tensor infos, padding to general.alignment (default 32), then the tensor data.
// A Cursor reads from [base, base + size) and raises SPARROW_ERR_FORMAT on any overrun, so no
// code path reads past the file. Counts are sanity-capped before anything is allocated from
// them, so a hostile header cannot make us reserve terabytes.
#include "gguf.h"

#include "common.h"
#include "quant.h"

#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace sparrow {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kMaxStringLength = 1ull << 30;
constexpr uint64_t kMaxTensors = 1ull << 20;
constexpr uint64_t kMaxKV = 1ull << 20;
constexpr int kMaxDims = 4;
// ggml's integer tensor types I8, I16, I32, I64 (ids 24..27): element size 1 << (id - 24)
constexpr uint32_t kTypeI8 = 24;
constexpr uint32_t kTypeI64 = 27;

size_t scalar_size(GGUFType type) {
    switch (type) {
        case GGUFType::UINT8: case GGUFType::INT8: case GGUFType::BOOL: return 1;
        case GGUFType::UINT16: case GGUFType::INT16: return 2;
        case GGUFType::UINT32: case GGUFType::INT32: case GGUFType::FLOAT32: return 4;
        case GGUFType::UINT64: case GGUFType::INT64: case GGUFType::FLOAT64: return 8;
        default: return 0;
    }
}

class Cursor {
public:
    Cursor(const uint8_t * base, size_t size) : base_(base), size_(size) {}

    size_t offset() const { return pos_; }

    const uint8_t * take(uint64_t n, const char * what) {
        if (n > size_ - pos_) {
            fail(SPARROW_ERR_FORMAT,
                 format("GGUF truncated: reading %s needs %llu bytes at offset %zu, file has %zu",
                        what, (unsigned long long) n, pos_, size_));
        }
        const uint8_t * p = base_ + pos_;
        pos_ += (size_t) n;
        return p;
    }
    template <typename T> T read(const char * what) {
        T v;
        memcpy(&v, take(sizeof(T), what), sizeof(T));
        return v;
    }
    std::string read_string(const char * what) {
        uint64_t n = read<uint64_t>(what);
        if (n > kMaxStringLength) {
            fail(SPARROW_ERR_FORMAT, format("GGUF %s: string length %llu is implausible",
                                            what, (unsigned long long) n));
        }
        const uint8_t * p = take(n, what);
        return std::string((const char *) p, (size_t) n);
    }

private:
    const uint8_t * base_;
    size_t size_;
    size_t pos_ = 0;
};

GGUFType read_type(Cursor & cur, const char * what) {
    uint32_t t = cur.read<uint32_t>(what);
    if (t > (uint32_t) GGUFType::FLOAT64) {
        fail(SPARROW_ERR_FORMAT, format("GGUF %s: unknown value type %u", what, t));
    }
    return (GGUFType) t;
}

void read_scalar(Cursor & cur, GGUFType type, GGUFValue & v, const char * what) {
    switch (type) {
        case GGUFType::UINT8:   v.u = cur.read<uint8_t>(what);  v.i = (int64_t) v.u; break;
        case GGUFType::INT8:    v.i = cur.read<int8_t>(what);   v.u = (uint64_t) v.i; break;
        case GGUFType::UINT16:  v.u = cur.read<uint16_t>(what); v.i = (int64_t) v.u; break;
        case GGUFType::INT16:   v.i = cur.read<int16_t>(what);  v.u = (uint64_t) v.i; break;
        case GGUFType::UINT32:  v.u = cur.read<uint32_t>(what); v.i = (int64_t) v.u; break;
        case GGUFType::INT32:   v.i = cur.read<int32_t>(what);  v.u = (uint64_t) v.i; break;
        case GGUFType::UINT64:  v.u = cur.read<uint64_t>(what); v.i = (int64_t) v.u; break;
        case GGUFType::INT64:   v.i = cur.read<int64_t>(what);  v.u = (uint64_t) v.i; break;
        case GGUFType::FLOAT32: v.f = cur.read<float>(what); break;
        case GGUFType::FLOAT64: v.f = cur.read<double>(what); break;
        case GGUFType::BOOL: {
            uint8_t b = cur.read<uint8_t>(what);
            if (b > 1) fail(SPARROW_ERR_FORMAT, format("GGUF %s: bool value %u", what, b));
            v.u = b; v.i = b;
            break;
        }
        default: fail(SPARROW_ERR_FORMAT, format("GGUF %s: not a scalar type", what));
    }
}

// Arrays of arrays are legal GGUF but no model uses them; they are parsed (to stay in sync)
// and recorded with array_type ARRAY so that a getter refuses them.
void skip_array(Cursor & cur, int depth, const char * what) {
    if (depth > 4) fail(SPARROW_ERR_FORMAT, format("GGUF %s: arrays nested too deeply", what));
    GGUFType et = read_type(cur, what);
    uint64_t n = cur.read<uint64_t>(what);
    if (et == GGUFType::STRING) {
        for (uint64_t k = 0; k < n; ++k) cur.read_string(what);
    } else if (et == GGUFType::ARRAY) {
        for (uint64_t k = 0; k < n; ++k) skip_array(cur, depth + 1, what);
    } else {
        size_t es = scalar_size(et);
        if (n > (uint64_t) -1 / es) fail(SPARROW_ERR_FORMAT, format("GGUF %s: array too large", what));
        cur.take(n * es, what);
    }
}

}  // namespace

const char * gguf_type_name(GGUFType type) {
    static const char * names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                   "bool", "string", "array", "uint64", "int64", "float64"};
    uint32_t t = (uint32_t) type;
    return t < sizeof(names) / sizeof(names[0]) ? names[t] : "unknown";
}

std::unique_ptr<GGUFFile> GGUFFile::open(const std::string & path, bool use_mmap) {
    std::unique_ptr<GGUFFile> file(new GGUFFile());
    file->path_ = path;
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(SPARROW_ERR_IO, format("cannot open '%s': %s", path.c_str(), strerror(errno)));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        fail(SPARROW_ERR_IO, format("'%s' is not a regular file", path.c_str()));
    }
    file->size_ = (size_t) st.st_size;
    if (file->size_ == 0) {
        ::close(fd);
        fail(SPARROW_ERR_FORMAT, format("'%s' is empty, not a GGUF file", path.c_str()));
    }
    if (use_mmap) {
        void * p = mmap(nullptr, file->size_, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            ::close(fd);
            fail(SPARROW_ERR_IO, format("cannot map '%s': %s", path.c_str(), strerror(errno)));
        }
        file->mapping_ = p;
        file->base_ = (const uint8_t *) p;
    } else {
        file->owned_.resize(file->size_);
        size_t done = 0;
        while (done < file->size_) {
            ssize_t r = ::read(fd, file->owned_.data() + done, file->size_ - done);
            if (r <= 0) {
                ::close(fd);
                fail(SPARROW_ERR_IO, format("cannot read '%s'", path.c_str()));
            }
            done += (size_t) r;
        }
        file->base_ = file->owned_.data();
    }
    ::close(fd);
    try {
        file->parse();
    } catch (const Error & e) {
        fail(e.status(), format("%s: %s", path.c_str(), e.what()));
    }
    return file;
}

std::unique_ptr<GGUFFile> GGUFFile::from_memory(const void * data, size_t size) {
    std::unique_ptr<GGUFFile> file(new GGUFFile());
    file->path_ = "<memory>";
    file->base_ = (const uint8_t *) data;
    file->size_ = size;
    file->parse();
    return file;
}

GGUFFile::~GGUFFile() {
    if (mapping_) munmap(mapping_, size_);
}

void GGUFFile::parse() {
    Cursor cur(base_, size_);
    if (size_ < 4 || cur.read<uint32_t>("magic") != kMagic) {
        fail(SPARROW_ERR_FORMAT, "not a GGUF file (bad magic)");
    }
    version_ = cur.read<uint32_t>("version");
    if (version_ < 2 || version_ > 3) {
        fail(SPARROW_ERR_UNSUPPORTED, format("GGUF version %u is not supported (2 and 3 are)", version_));
    }
    uint64_t n_tensors = cur.read<uint64_t>("tensor count");
    uint64_t n_kv = cur.read<uint64_t>("metadata count");
    if (n_tensors > kMaxTensors || n_kv > kMaxKV) {
        fail(SPARROW_ERR_FORMAT, format("implausible counts: %llu tensors, %llu metadata entries",
                                        (unsigned long long) n_tensors, (unsigned long long) n_kv));
    }

    for (uint64_t k = 0; k < n_kv; ++k) {
        std::string key = cur.read_string("metadata key");
        if (kv_.count(key)) fail(SPARROW_ERR_FORMAT, format("duplicate metadata key '%s'", key.c_str()));
        GGUFValue v;
        v.type = read_type(cur, key.c_str());
        if (v.type == GGUFType::STRING) {
            v.str = cur.read_string(key.c_str());
        } else if (v.type == GGUFType::ARRAY) {
            v.array_type = read_type(cur, key.c_str());
            v.array_n = cur.read<uint64_t>(key.c_str());
            if (v.array_type == GGUFType::STRING) {
                // each string needs at least its 8-byte length: bound the reservation by that
                if (v.array_n > (size_ - cur.offset()) / 8) {
                    fail(SPARROW_ERR_FORMAT, format("GGUF %s: array of %llu strings exceeds the file",
                                                    key.c_str(), (unsigned long long) v.array_n));
                }
                v.array_strings.reserve((size_t) v.array_n);
                for (uint64_t j = 0; j < v.array_n; ++j) v.array_strings.push_back(cur.read_string(key.c_str()));
            } else if (v.array_type == GGUFType::ARRAY) {
                for (uint64_t j = 0; j < v.array_n; ++j) skip_array(cur, 1, key.c_str());
            } else {
                size_t es = scalar_size(v.array_type);
                if (v.array_n > (uint64_t) -1 / es) fail(SPARROW_ERR_FORMAT, format("GGUF %s: array too large", key.c_str()));
                v.array_data = cur.take(v.array_n * es, key.c_str());
            }
        } else {
            read_scalar(cur, v.type, v, key.c_str());
        }
        key_order_.push_back(key);
        kv_.emplace(std::move(key), std::move(v));
    }

    uint64_t alignment = (uint64_t) get_int("general.alignment", 32);
    if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > (1u << 20)) {
        fail(SPARROW_ERR_FORMAT, format("general.alignment %llu is not a power of two",
                                        (unsigned long long) alignment));
    }

    tensors_.reserve((size_t) n_tensors);
    for (uint64_t k = 0; k < n_tensors; ++k) {
        GGUFTensorInfo t;
        t.name = cur.read_string("tensor name");
        const char * nm = t.name.c_str();
        uint32_t n_dims = cur.read<uint32_t>(nm);
        if (n_dims < 1 || n_dims > kMaxDims) fail(SPARROW_ERR_FORMAT, format("tensor '%s': %u dimensions", nm, n_dims));
        t.n_dims = (int) n_dims;
        for (uint32_t d = 0; d < n_dims; ++d) {
            int64_t ne = cur.read<int64_t>(nm);
            if (ne <= 0 || ne > (int64_t(1) << 40)) {
                fail(SPARROW_ERR_FORMAT, format("tensor '%s': dimension %u is %lld", nm, d, (long long) ne));
            }
            t.ne[d] = ne;
        }
        t.type = cur.read<uint32_t>(nm);
        t.offset = cur.read<uint64_t>(nm);
        int64_t block_size = 1;
        size_t block_bytes = 0;
        const char * type_name = "";
        if (const TypeTraits * tt = type_traits(t.type)) {
            block_size = tt->block_size;
            block_bytes = tt->type_size;
            type_name = tt->name;
        } else if (t.type >= kTypeI8 && t.type <= kTypeI64) {  // index tensors, e.g. a draft's d2t
            block_bytes = (size_t) 1 << (t.type - kTypeI8);
            type_name = "int";
        } else {
            fail(SPARROW_ERR_UNSUPPORTED, format("tensor '%s': tensor type %u is not supported", nm, t.type));
        }
        if (t.ne[0] % block_size != 0) {
            fail(SPARROW_ERR_FORMAT, format("tensor '%s': row of %lld elements is not a multiple of the %s block size %lld",
                                            nm, (long long) t.ne[0], type_name, (long long) block_size));
        }
        // overflow-safe size: every factor is < 2^40, check the running product
        unsigned __int128 rows = (unsigned __int128) t.ne[1] * t.ne[2] * t.ne[3];
        unsigned __int128 bytes = rows * (unsigned __int128) ((t.ne[0] / block_size) * block_bytes);
        if (bytes > (unsigned __int128) size_) {
            fail(SPARROW_ERR_FORMAT, format("tensor '%s' is larger than the file", nm));
        }
        t.nbytes = (uint64_t) bytes;
        if (t.offset % alignment != 0) fail(SPARROW_ERR_FORMAT, format("tensor '%s': offset not aligned", nm));
        if (tensor_index_.count(t.name)) fail(SPARROW_ERR_FORMAT, format("duplicate tensor '%s'", nm));
        tensor_index_.emplace(t.name, tensors_.size());
        tensors_.push_back(std::move(t));
    }

    size_t data_start = (cur.offset() + alignment - 1) / alignment * alignment;
    if (data_start > size_ && !tensors_.empty()) fail(SPARROW_ERR_FORMAT, "GGUF truncated before the tensor data");
    data_ = base_ + std::min(data_start, size_);
    uint64_t data_size = size_ - std::min(data_start, size_);
    for (const auto & t : tensors_) {
        if (t.offset > data_size || t.nbytes > data_size - t.offset) {
            fail(SPARROW_ERR_FORMAT, format("tensor '%s' (offset %llu, %llu bytes) lies past the end of the file",
                                            t.name.c_str(), (unsigned long long) t.offset,
                                            (unsigned long long) t.nbytes));
        }
    }
}

const GGUFValue * GGUFFile::find(const std::string & key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
}

static const GGUFValue & require(const GGUFFile & f, const std::string & key) {
    const GGUFValue * v = f.find(key);
    if (!v) fail(SPARROW_ERR_FORMAT, format("missing metadata key '%s'", key.c_str()));
    return *v;
}

static bool is_integer(GGUFType t) {
    return t == GGUFType::UINT8 || t == GGUFType::INT8 || t == GGUFType::UINT16 || t == GGUFType::INT16 ||
           t == GGUFType::UINT32 || t == GGUFType::INT32 || t == GGUFType::UINT64 || t == GGUFType::INT64;
}

std::string GGUFFile::get_string(const std::string & key) const {
    const GGUFValue & v = require(*this, key);
    if (v.type != GGUFType::STRING) {
        fail(SPARROW_ERR_FORMAT, format("metadata '%s' is %s, expected string", key.c_str(), gguf_type_name(v.type)));
    }
    return v.str;
}

std::string GGUFFile::get_string(const std::string & key, const std::string & fallback) const {
    return has(key) ? get_string(key) : fallback;
}

int64_t GGUFFile::get_int(const std::string & key) const {
    const GGUFValue & v = require(*this, key);
    if (!is_integer(v.type)) {
        fail(SPARROW_ERR_FORMAT, format("metadata '%s' is %s, expected an integer", key.c_str(), gguf_type_name(v.type)));
    }
    return v.i;
}

int64_t GGUFFile::get_int(const std::string & key, int64_t fallback) const {
    return has(key) ? get_int(key) : fallback;
}

double GGUFFile::get_float(const std::string & key) const {
    const GGUFValue & v = require(*this, key);
    if (v.type == GGUFType::FLOAT32 || v.type == GGUFType::FLOAT64) return v.f;
    if (is_integer(v.type)) return (double) v.i;
    fail(SPARROW_ERR_FORMAT, format("metadata '%s' is %s, expected a number", key.c_str(), gguf_type_name(v.type)));
}

double GGUFFile::get_float(const std::string & key, double fallback) const {
    return has(key) ? get_float(key) : fallback;
}

bool GGUFFile::get_bool(const std::string & key, bool fallback) const {
    const GGUFValue * v = find(key);
    if (!v) return fallback;
    if (v->type == GGUFType::BOOL || is_integer(v->type)) return v->i != 0;
    fail(SPARROW_ERR_FORMAT, format("metadata '%s' is %s, expected bool", key.c_str(), gguf_type_name(v->type)));
}

std::vector<std::string> GGUFFile::get_string_array(const std::string & key) const {
    const GGUFValue & v = require(*this, key);
    if (v.type != GGUFType::ARRAY || v.array_type != GGUFType::STRING) {
        fail(SPARROW_ERR_FORMAT, format("metadata '%s' is not an array of strings", key.c_str()));
    }
    return v.array_strings;
}

std::vector<int64_t> GGUFFile::get_int_array(const std::string & key) const {
    const GGUFValue & v = require(*this, key);
    if (v.type != GGUFType::ARRAY || !is_integer(v.array_type)) {
        fail(SPARROW_ERR_FORMAT, format("metadata '%s' is not an array of integers", key.c_str()));
    }
    std::vector<int64_t> out((size_t) v.array_n);
    const uint8_t * p = v.array_data;
    for (uint64_t j = 0; j < v.array_n; ++j) {
        GGUFValue tmp;
        Cursor cur(p + j * scalar_size(v.array_type), scalar_size(v.array_type));
        read_scalar(cur, v.array_type, tmp, key.c_str());
        out[j] = tmp.i;
    }
    return out;
}

std::vector<float> GGUFFile::get_float_array(const std::string & key) const {
    const GGUFValue & v = require(*this, key);
    if (v.type != GGUFType::ARRAY || (v.array_type != GGUFType::FLOAT32 && v.array_type != GGUFType::FLOAT64)) {
        fail(SPARROW_ERR_FORMAT, format("metadata '%s' is not an array of floats", key.c_str()));
    }
    std::vector<float> out((size_t) v.array_n);
    for (uint64_t j = 0; j < v.array_n; ++j) {
        if (v.array_type == GGUFType::FLOAT32) {
            float f; memcpy(&f, v.array_data + 4 * j, 4); out[j] = f;
        } else {
            double d; memcpy(&d, v.array_data + 8 * j, 8); out[j] = (float) d;
        }
    }
    return out;
}

const GGUFTensorInfo * GGUFFile::find_tensor(const std::string & name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace sparrow
