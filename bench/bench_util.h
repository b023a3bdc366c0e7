// bench_util.h - what the benchmarks under bench/ share.
#pragma once

#include <cstdio>
#include <string>

namespace bench {

// "AMD EPYC (family 26)": /proc/cpuinfo's model name and family, since a speed holds for the CPU
// it was measured on (virtual machines often hide the model number).
inline std::string cpu_model() {
    std::FILE * f = std::fopen("/proc/cpuinfo", "r");
    if (!f) return "unknown CPU";
    std::string name = "unknown CPU", family;
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
    }
    std::fclose(f);
    return family.empty() ? name : name + " (family " + family + ")";
}


}  // namespace bench
