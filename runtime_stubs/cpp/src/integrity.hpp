// The bundle's integrity root (docs/bundle-format.md, hm_export/integrity.py): bundle.sig seals the exact bytes
// of manifest.json with their sha256 and, optionally, an Ed25519 signature. Signatures are checked with
// OpenSSL's libcrypto when the runtime is built with HM_WITH_OPENSSL (the default when CMake finds it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "files.hpp"

namespace hm {

// Whether this build can check Ed25519 signatures.
bool signatures_supported();

// Checks the manifest bytes against `tree`/bundle.sig before any field is parsed: the sha256 always, and
// with a 32-byte `verify_key` an Ed25519 signature by that key. Throws Error naming the file.
void check_seal(const Tree& tree, const std::string& manifest, const std::vector<uint8_t>& verify_key);

// An Ed25519 public key file: 64 hex digits, or PEM SubjectPublicKeyInfo (PEM needs OpenSSL).
std::vector<uint8_t> read_public_key(const std::string& path);

}  // namespace hm
