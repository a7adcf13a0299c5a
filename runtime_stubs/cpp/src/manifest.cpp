// The bundle manifest: see manifest.hpp. Field names and checks follow hm_export/formats/manifest.py, so an
// error names the same field in both readers.
#include "manifest.hpp"

#include <unistd.h>

#include <regex>
#include <stdexcept>

#include "hm_runtime.hpp"
#include "integrity.hpp"

namespace hm {
namespace {

using Kind = json::Value::Kind;

constexpr size_t kMaxFiles = 1 << 20;
constexpr int64_t kMaxRouterTokens = 1 << 16;

class Fields {
 public:
  explicit Fields(const std::string& path) : path_(path) {}
  [[noreturn]] void refuse(const std::string& field, const std::string& problem) const {
    throw Error(path_ + ": " + field + ": " + problem);
  }
  // `container[key]` of `kind`; nullptr when absent and `optional` (a JSON null is present, of the wrong kind,
  // as in Python's Fields.get).
  const json::Value* get(const json::Value& container, const std::string& key, const std::string& field, Kind kind,
                         bool optional = false) const {
    const json::Value* value = container.find(key);
    if (value == nullptr) {
      if (optional) return nullptr;
      refuse(field, "missing");
    }
    if (value->kind != kind) refuse(field, std::string("expected ") + kind_name(kind));
    return value;
  }
  int64_t integer(const json::Value& container, const std::string& key, const std::string& field, int64_t lo,
                  int64_t hi, bool optional = false) const {
    const json::Value* value = get(container, key, field, Kind::Number, optional);
    if (value == nullptr) return lo;
    int64_t v = 0;
    try {
      v = value->as_int(field);
    } catch (const std::runtime_error&) {
      refuse(field, "expected an integer");
    }
    if (v < lo || v > hi) refuse(field, std::to_string(v) + " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v;
  }
  // A safe bundle-relative path (as hm_export.safeio.relative_parts).
  const std::string& relative(const json::Value& container, const std::string& key, const std::string& field) const {
    const std::string& path = get(container, key, field, Kind::String)->string;
    if (path.empty()) refuse(field, "path '' is not a non-empty string");
    if (path[0] == '/' || path.find('\\') != std::string::npos || path.find('\0') != std::string::npos)
      refuse(field, "path '" + path + "' is absolute or not '/'-separated (must stay inside the bundle)");
    size_t start = 0;
    while (true) {
      const size_t end = path.find('/', start);
      const std::string part = path.substr(start, end == std::string::npos ? std::string::npos : end - start);
      if (part.empty() || part == "." || part == "..")
        refuse(field, "unsafe path '" + path + "' (must stay inside the bundle: no empty, '.' or '..' component)");
      if (end == std::string::npos) break;
      start = end + 1;
    }
    return path;
  }

 private:
  static const char* kind_name(Kind kind) {
    switch (kind) {
      case Kind::Object: return "an object";
      case Kind::Array: return "a list";
      case Kind::String: return "a string";
      case Kind::Number: return "an integer";
      case Kind::Bool: return "a boolean";
      default: return "null";
    }
  }
  const std::string& path_;
};

class Validator {
 public:
  Validator(const json::Value& manifest, const std::string& path)
      : manifest_(manifest), fields_(path) {}

  // In formats.manifest.validate's order, so that both readers name the same first problem.
  void run() {
    for (const char* section : {"model", "slot", "bank", "tokenizer", "router", "targets"})
      if (!manifest_.find(section)) fields_.refuse(section, "malformed manifest, missing '" + std::string(section) + "'");
    for (const char* section : {"model", "slot", "bank", "tokenizer", "router", "targets"})
      fields_.get(manifest_, section, section, Kind::Object);
    files_ = fields_.get(manifest_, "files", "files", Kind::Object);
    if (files_->object.size() > kMaxFiles) fields_.refuse("files", "more than " + std::to_string(kMaxFiles) + " entries");
    static const std::regex sha256("^[0-9a-f]{64}$");
    for (const auto& [relative, record] : files_->object) {
      const std::string where = "files['" + relative + "']";
      json::Value name;  // relative_parts on the key itself
      name.kind = Kind::Object;
      json::Value key;
      key.kind = Kind::String;
      key.string = relative;
      name.object.emplace_back("path", std::move(key));
      fields_.relative(name, "path", where);
      if (record.kind != Kind::Object) fields_.refuse(where, "expected an object");
      fields_.integer(record, "bytes", where + ".bytes", 0, kMaxFileBytes);
      const std::string& digest = fields_.get(record, "sha256", where + ".sha256", Kind::String)->string;
      if (!std::regex_match(digest, sha256)) fields_.refuse(where + ".sha256", "not 64 lowercase hex digits");
    }
    const json::Value& router = manifest_.at("router", "router");
    listed(manifest_.at("tokenizer", "tokenizer"), "file", "tokenizer.file");
    listed(router, "file", "router.file");
    fields_.integer(router, "dim", "router.dim", 1, 1 << 16);
    fields_.get(router, "embedder", "router.embedder", Kind::String, true);
    router_program(router);
    const json::Value& bank = manifest_.at("bank", "bank");
    const std::string& dir = fields_.relative(bank, "dir", "bank.dir");
    fields_.get(bank, "schema_hash", "bank.schema_hash", Kind::String);
    fields_.get(bank, "scheme", "bank.scheme", Kind::String, true);
    if (const json::Value* levels = fields_.get(bank, "levels", "bank.levels", Kind::Array, true))
      for (size_t level = 0; level < levels->array.size(); ++level)
        if (levels->array[level].kind != Kind::String)
          fields_.refuse("bank.levels[" + std::to_string(level) + "]", "expected a string");
    if (!files_->find(dir + "/index.json")) fields_.refuse("bank.dir", dir + "/index.json is not listed in 'files'");
    const json::Value& targets = manifest_.at("targets", "targets");
    if (targets.object.empty()) fields_.refuse("targets", "no targets");
    for (const auto& [name, entry] : targets.object) target(name, entry);
    checks(manifest_, "checks");
    fields_.get(manifest_, "created", "created", Kind::String, true);
  }

 private:
  void listed(const json::Value& container, const std::string& key, const std::string& field) const {
    const std::string& relative = fields_.relative(container, key, field);
    if (!files_->find(relative))
      fields_.refuse(field, "'" + relative + "' is not listed in 'files' (no size or sha256 to check it by)");
  }

  // A program path: a listed file, or a directory (.mlpackage) whose files are all listed under it.
  void program_file(const json::Value& roles, const std::string& role, const std::string& field) const {
    const std::string& relative = fields_.relative(roles, role, field);
    if (files_->find(relative)) return;
    for (const auto& [name, record] : files_->object)
      if (name.compare(0, relative.size() + 1, relative + "/") == 0) return;
    fields_.refuse(field, "'" + relative + "' is not listed in 'files' (no size or sha256 to check it by)");
  }

  void programs(const json::Value& program, const std::string& field, bool may_be_empty) const {
    const json::Value& roles = *fields_.get(program, "files", field + ".files", Kind::Object);
    if (roles.object.empty() && !may_be_empty) fields_.refuse(field + ".files", "no program files");
    for (const auto& [role, path] : roles.object) program_file(roles, role, field + ".files." + role);
  }

  void target(const std::string& name, const json::Value& entry) const {
    const std::string field = "targets." + name;
    if (entry.kind != Kind::Object) fields_.refuse(field, "expected an object");
    const json::Value* decode = fields_.get(entry, "decode", field + ".decode", Kind::Object, true);
    const json::Value* window = fields_.get(entry, "window", field + ".window", Kind::String, true);
    if (window && ((window->string != "program" && window->string != "decode") || (window->string == "decode" && !decode)))
      fields_.refuse(field + ".window", "'" + window->string + "': expected 'decode' (with a decode program)");
    programs(entry, field, window && window->string == "decode");
    if (decode) programs(*decode, field + ".decode", false);
    checks(entry, field + ".checks");
  }

  void checks(const json::Value& container, const std::string& field) const {
    const json::Value* checks = fields_.get(container, "checks", field, Kind::Object, true);
    if (!checks) return;
    listed(*checks, "file", field + ".file");
    listed(*checks, "expected", field + ".expected");
    fields_.integer(*checks, "count", field + ".count", 0, 1 << 16);
    fields_.integer(*checks, "new_tokens", field + ".new_tokens", 0, 1 << 16, true);
  }

  // router.tokenizer, router.program_io and router.programs: all three or none.
  void router_program(const json::Value& router) const {
    const auto present = [&](const char* key) {
      const json::Value* value = router.find(key);
      return value && value->kind != Kind::Null;
    };
    if (!present("tokenizer") && !present("program_io") && !present("programs")) return;
    const json::Value& tokenizer = *fields_.get(router, "tokenizer", "router.tokenizer", Kind::Object);
    const json::Value& io = *fields_.get(router, "program_io", "router.program_io", Kind::Object);
    const json::Value& programs = *fields_.get(router, "programs", "router.programs", Kind::Object);
    listed(tokenizer, "file", "router.tokenizer.file");
    fields_.integer(tokenizer, "max_tokens", "router.tokenizer.max_tokens", 1, kMaxRouterTokens);
    const json::Value& inputs = *fields_.get(io, "inputs", "router.program_io.inputs", Kind::Array);
    if (inputs.array.empty()) fields_.refuse("router.program_io.inputs[0]", "missing");
    if (inputs.array[0].kind != Kind::Object) fields_.refuse("router.program_io.inputs[0]", "expected an object");
    const std::string tokens_field = "router.program_io.inputs[0].tokens";
    const json::Value& tokens = *fields_.get(inputs.array[0], "tokens", tokens_field, Kind::Array);
    if (tokens.array.size() != 2) fields_.refuse(tokens_field, "expected 2 integers");
    int64_t bounds[2];
    for (int i = 0; i < 2; ++i) {
      json::Value holder;
      holder.kind = Kind::Object;
      holder.object.emplace_back("v", tokens.array[i]);
      bounds[i] = fields_.integer(holder, "v", tokens_field, 1, kMaxRouterTokens);
    }
    if (bounds[0] > bounds[1]) fields_.refuse(tokens_field, "not a range");
    fields_.get(io, "outputs", "router.program_io.outputs", Kind::Array);
    for (const auto& [name, entry] : programs.object) {
      const std::string field = "router.programs." + name;
      if (entry.kind != Kind::Object) fields_.refuse(field, "expected an object");
      const std::string& runtime = fields_.get(entry, "runtime", field + ".runtime", Kind::String)->string;
      if (runtime != "executorch" && runtime != "onnxruntime" && runtime != "coreml")
        fields_.refuse(field + ".runtime", "'" + runtime + "' is not one of ['executorch', 'onnxruntime', 'coreml']");
      this->programs(entry, field, false);
    }
  }

  const json::Value& manifest_;
  const Fields fields_;
  const json::Value* files_ = nullptr;  // manifest.files, once checked to be an object
};

}  // namespace

void validate_manifest(const json::Value& manifest, const std::string& path) {
  if (manifest.kind != Kind::Object) throw Error(path + ": expected a JSON object");
  try {
    Validator(manifest, path).run();
  } catch (const Error&) {
    throw;
  } catch (const std::runtime_error& e) {  // a JSON accessor's type error
    throw Error(path + ": " + e.what());
  }
}

void check_listed_files(const Tree& tree, const json::Value& manifest, const std::string& path, bool hashes) {
  std::string problems;
  for (const auto& [relative, entry] : manifest.at("files", "files").object) {
    const int64_t bytes = entry.at("bytes", relative).as_int("files." + relative + ".bytes");
    const std::string& digest = entry.at("sha256", relative).as_string("files." + relative + ".sha256");
    const std::string file = tree.root() + "/" + relative;
    try {
      const int fd = tree.open(relative, "a listed file");
      struct Close {
        int fd;
        ~Close() { ::close(fd); }
      } close{fd};
      const int64_t size = static_cast<int64_t>(::lseek(fd, 0, SEEK_END));
      if (size != bytes)
        problems += "\n  " + file + ": " + std::to_string(size) + " bytes, the manifest records " + std::to_string(bytes);
      else if (hashes && sha256_fd(fd, file, static_cast<uint64_t>(size)) != digest)
        problems += "\n  " + file + ": sha256 differs from the manifest's (file modified)";
    } catch (const Error& e) {
      problems += std::string("\n  ") + e.what();
    }
  }
  if (!problems.empty()) throw Error(path + ": files do not match the manifest:" + problems);
}

json::Value read_manifest(const Tree& tree, const std::vector<uint8_t>& verify_key, bool hashes) {
  const std::string path = tree.root() + "/manifest.json";
  // The seal is checked on the manifest's bytes before a single field is read.
  const std::string bytes = tree.read("manifest.json", "bundle manifest", kMaxManifestBytes);
  check_seal(tree, bytes, verify_key);
  json::Value manifest = parse_json(bytes, path);
  const json::Value* format = manifest.find("format");
  const json::Value* version = manifest.find("format_version");
  if (!format || format->kind != Kind::String || format->string != "hm-export-bundle" || !version ||
      version->kind != Kind::Number || version->number != 1)
    throw Error(path + ": format_version: not an hm-export-bundle format_version 1 manifest");
  validate_manifest(manifest, path);
  check_listed_files(tree, manifest, path, hashes);
  return manifest;
}

}  // namespace hm
