#include "integrity.hpp"

#include <cctype>

#include "hm_runtime.hpp"

#ifdef HM_WITH_OPENSSL
#include <openssl/evp.h>
#include <openssl/pem.h>
#endif

namespace hm {
namespace {

constexpr uint64_t kMaxSealBytes = 64 << 10;
constexpr uint64_t kMaxKeyBytes = 16 << 10;

std::vector<uint8_t> from_hex(const std::string& text, size_t bytes) {
  if (text.size() != 2 * bytes) return {};
  std::vector<uint8_t> out(bytes);
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
    const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (digit < 0) return {};
    out[i / 2] = static_cast<uint8_t>(out[i / 2] << 4 | digit);
  }
  return out;
}

bool ed25519_verify(const std::vector<uint8_t>& key, const std::string& message, const std::vector<uint8_t>& sig) {
#ifdef HM_WITH_OPENSSL
  EVP_PKEY* pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, key.data(), key.size());
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = pkey != nullptr && ctx != nullptr &&
                  EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, pkey) == 1 &&
                  EVP_DigestVerify(ctx, sig.data(), sig.size(), reinterpret_cast<const unsigned char*>(message.data()),
                                   message.size()) == 1;
  EVP_MD_CTX_free(ctx);
  EVP_PKEY_free(pkey);
  return ok;
#else
  (void)key, (void)message, (void)sig;
  return false;
#endif
}

}  // namespace

bool signatures_supported() {
#ifdef HM_WITH_OPENSSL
  return true;
#else
  return false;
#endif
}

void check_seal(const Tree& tree, const std::string& manifest, const std::vector<uint8_t>& verify_key) {
  const std::string path = tree.root() + "/bundle.sig";
  const json::Value seal = parse_json(tree.read("bundle.sig", "bundle seal", kMaxSealBytes), path);
  try {
    if (seal.at("format", "format").as_string("format") != "hm-export-bundle-seal" ||
        seal.at("format_version", "format_version").as_int("format_version") != 1)
      throw Error("not an hm-export-bundle-seal version 1 file");
    if (seal.at("manifest_sha256", "manifest_sha256").as_string("manifest_sha256") != sha256_hex(manifest))
      throw Error(tree.root() + "/manifest.json: sha256 differs from the one sealed in " + path +
                  " (manifest damaged or edited after export)");
    if (verify_key.empty()) return;
    if (!signatures_supported())
      throw Error("this runtime was built without OpenSSL (HM_WITH_OPENSSL): it cannot check signatures");
    const json::Value* signature = seal.find("signature");
    if (signature == nullptr) throw Error("the bundle is not signed, and a verify key was given");
    if (signature->at("algorithm", "signature").as_string("signature.algorithm") != "ed25519")
      throw Error("signature is not an ed25519 signature");
    std::vector<uint8_t> value = from_hex(signature->at("value", "signature").as_string("signature.value"), 64);
    if (verify_key.size() != 32 || value.empty() || !ed25519_verify(verify_key, manifest, value))
      throw Error("signature does not verify with the given key (manifest edited, or signed by another key)");
  } catch (const Error& e) {
    const std::string what = e.what();
    throw Error(what.rfind(tree.root(), 0) == 0 ? what : path + ": " + what);
  } catch (const std::runtime_error& e) {
    throw Error(path + ": " + e.what());
  }
}

std::vector<uint8_t> read_public_key(const std::string& path) {
  std::string text = read_file(path, kMaxKeyBytes);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
  std::vector<uint8_t> raw = from_hex(text, 32);
  if (!raw.empty()) return raw;
#ifdef HM_WITH_OPENSSL
  BIO* bio = BIO_new_mem_buf(text.data(), static_cast<int>(text.size()));
  EVP_PKEY* key = bio ? PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr) : nullptr;
  size_t length = 32;
  raw.assign(32, 0);
  const bool ok = key != nullptr && EVP_PKEY_id(key) == EVP_PKEY_ED25519 &&
                  EVP_PKEY_get_raw_public_key(key, raw.data(), &length) == 1 && length == 32;
  EVP_PKEY_free(key);
  BIO_free(bio);
  if (ok) return raw;
#endif
  throw Error(path + ": not an Ed25519 public key (64 hex digits" +
              std::string(signatures_supported() ? ", or PEM)" : "; PEM needs a build with OpenSSL)"));
}

}  // namespace hm
