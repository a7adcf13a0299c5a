// The bundle manifest (manifest.json, docs/bundle-format.md), read and checked as hm_export.formats.manifest
// reads it: the seal on the exact bytes first, strict JSON, format "hm-export-bundle" version 1, the structure
// every reader relies on (validate_manifest), then every listed file on disk (size; sha256 unless trusted).
// Runtime's constructor and `hm_bundle_check` both go through read_manifest; the manifest fixtures
// (tests/fixtures/formats/manifest) hold the two readers to the same verdicts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "files.hpp"
#include "json.hpp"

namespace hm {

constexpr uint64_t kMaxManifestBytes = 64 << 20;
constexpr int64_t kMaxFileBytes = 1ll << 44;  // 16 TiB: any real program or data file is far below

// Structure and ranges of the fields every reader relies on (the C++ twin of formats.manifest.validate):
// sections and their types, every listed file's bytes and sha256, every path the manifest names a safe
// bundle-relative path of a listed file, the targets' windows and programs, the checks. Throws Error
// "<path>: <field>: <problem>".
void validate_manifest(const json::Value& manifest, const std::string& path);

// Every listed file: a regular file inside the bundle of its declared size; with `hashes`, also its sha256.
// Throws Error naming every file that differs.
void check_listed_files(const Tree& tree, const json::Value& manifest, const std::string& path, bool hashes);

// The checked manifest of the bundle behind `tree`: seal (and signature, given `verify_key`), parse,
// format/version, validate_manifest, check_listed_files.
json::Value read_manifest(const Tree& tree, const std::vector<uint8_t>& verify_key, bool hashes);

}  // namespace hm
