// bench_util.h - what the benchmarks under bench/ share.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <string>

namespace bench {

// "AMD EPYC (family 25, model 17, L1d 32 KiB)": /proc/cpuinfo's model name, family and model, and
// the L1 data cache's size, since a speed holds for the CPU it was measured on (virtual machines
// often hide the model name's number; the family and model tell Zen 4 from Zen 5, and the L1's
// size decides how some kernels prefetch: cpu/features.h's small_l1_data_cache).
inline std::string cpu_model() {
    std::FILE * f = std::fopen("/proc/cpuinfo", "r");
    if (!f) return "unknown CPU";
    std::string name = "unknown CPU", family, model;
    char line[512];
    while (std::fgets(line, sizeof line, f)) {
        const std::string l = line;
        const size_t colon = l.find(':');
        if (colon == std::string::npos) continue;
        std::string value = l.substr(colon + 1);
        value.erase(0, value.find_first_not_of(" \t"));
        value.erase(value.find_last_not_of(" \t\n") + 1);
        if (l.rfind("model name", 0) == 0 && name == "unknown CPU") name = value;
        if (l.rfind("cpu family", 0) == 0 && family.empty()) family = value;
        if (l.rfind("model\t", 0) == 0 && model.empty()) model = value;  // not "model name"
    }
    std::fclose(f);
    std::string details = family.empty() ? "" : "family " + family;
    if (!model.empty()) details += (details.empty() ? "model " : ", model ") + model;
#if defined(_SC_LEVEL1_DCACHE_SIZE)
    const long l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    if (l1d > 0) details += (details.empty() ? "L1d " : ", L1d ") + std::to_string(l1d / 1024) + " KiB";
#endif
    return details.empty() ? name : name + " (" + details + ")";
}


}  // namespace bench
