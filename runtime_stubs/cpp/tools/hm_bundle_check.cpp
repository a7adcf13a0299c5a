// hm_bundle_check: checks a bundle's manifest as the runtime does before it loads anything (manifest.hpp):
//
//   hm_bundle_check BUNDLE_DIR [--trusted-storage] [--verify-key KEY]
//
// the seal (with --verify-key, the Ed25519 signature by KEY: 64 hex digits or a PEM public key), strict JSON,
// format and version, the manifest's structure (validate_manifest), every listed file's size and (unless
// --trusted-storage) sha256. Prints {"files": N, "targets": M} and exits 0, or the error on stderr and
// exits 2: the C++ half of the manifest fixtures tests/test_formats.py feeds to both readers.
#include <iostream>
#include <string>
#include <vector>

#include "files.hpp"
#include "hm_runtime.hpp"
#include "integrity.hpp"
#include "manifest.hpp"

int main(int argc, char** argv) {
  try {
    std::string dir;
    std::vector<uint8_t> key;
    bool hashes = true;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--trusted-storage") hashes = false;
      else if (arg == "--verify-key" && i + 1 < argc) key = hm::read_public_key(argv[++i]);
      else if (dir.empty() && !arg.empty() && arg[0] != '-') dir = arg;
      else throw hm::Error("usage: hm_bundle_check BUNDLE_DIR [--trusted-storage] [--verify-key KEY]");
    }
    if (dir.empty()) throw hm::Error("usage: hm_bundle_check BUNDLE_DIR [--trusted-storage] [--verify-key KEY]");
    const hm::Tree tree(dir, "bundle");
    const hm::json::Value manifest = hm::read_manifest(tree, key, hashes);
    std::cout << "{\"files\": " << manifest.at("files", "files").object.size()
              << ", \"targets\": " << manifest.at("targets", "targets").object.size() << "}\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
