// hm_runner: replay a bundle's golden checks, fill paths, and benchmark like `hm-export bench`, natively.
//
//   hm_runner BUNDLE [--checks] [--fill 0,1 ...] [--dump-slot FILE] [--bench] [--json] [options]
//
// Exit code: 0 all good, 1 a check failed, 2 bad input or a runtime error (message on stderr).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "files.hpp"
#include "hm_runtime.hpp"
#include "integrity.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

struct Args {
  std::string bundle, embeddings, dump_slot, verify_key, cache = "stream", context, prompt, next_context;
  bool checks = false, bench = false, json = false, verify_files = true, route_on_device = false, has_context = false;
  hm::GenerateOptions generate;
  std::vector<std::vector<int>> fills;
  int runs = 3, contexts = 8, prompt_tokens = 64, new_tokens = 32, threads = 0;
};

const char* kUsage =
    "usage: hm_runner BUNDLE [--checks [--route-on-device | --embeddings FILE]] [--fill L0,L1,... (repeat)]\n"
    "       [--context TEXT --prompt TEXT [--next-context TEXT] [--max-new-tokens 32] [--temperature 0]\n"
    "        [--top-k 0] [--top-p 1] [--seed 0] [--stop-token ID (repeat)]] [--dump-slot FILE]\n"
    "       [--bench [--runs 3] [-n 8] [--prompt-tokens 64] [--new-tokens 32] [--cache stream|default]]\n"
    "       [--threads N] [--no-verify-files] [--verify-key PUBLIC_KEY] [--json]\n";

std::vector<int> parse_path(const std::string& text) {
  std::vector<int> path;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) path.push_back(std::stoi(part));
  return path;
}

Args parse_args(int argc, char** argv) {
  Args args;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw hm::Error(std::string(argv[i]) + " needs a value\n" + kUsage);
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--checks") args.checks = true;
    else if (arg == "--bench") args.bench = true;
    else if (arg == "--json") args.json = true;
    else if (arg == "--no-verify-files") args.verify_files = false;
    else if (arg == "--embeddings") args.embeddings = value(i);
    else if (arg == "--route-on-device") args.route_on_device = true;
    else if (arg == "--context") args.context = value(i), args.has_context = true;
    else if (arg == "--prompt") args.prompt = value(i);
    else if (arg == "--next-context") args.next_context = value(i);
    else if (arg == "--max-new-tokens") args.generate.max_new_tokens = std::stoi(value(i));
    else if (arg == "--temperature") args.generate.temperature = std::stof(value(i));
    else if (arg == "--top-k") args.generate.top_k = std::stoi(value(i));
    else if (arg == "--top-p") args.generate.top_p = std::stof(value(i));
    else if (arg == "--seed") args.generate.seed = std::stoull(value(i));
    else if (arg == "--stop-token") args.generate.stop_tokens.push_back(std::stoll(value(i)));
    else if (arg == "--verify-key") args.verify_key = value(i);
    else if (arg == "--fill") args.fills.push_back(parse_path(value(i)));
    else if (arg == "--dump-slot") args.dump_slot = value(i);
    else if (arg == "--cache") args.cache = value(i);
    else if (arg == "--runs") args.runs = std::stoi(value(i));
    else if (arg == "-n") args.contexts = std::stoi(value(i));
    else if (arg == "--prompt-tokens") args.prompt_tokens = std::stoi(value(i));
    else if (arg == "--new-tokens") args.new_tokens = std::stoi(value(i));
    else if (arg == "--threads") args.threads = std::stoi(value(i));
    else if (!arg.empty() && arg[0] != '-' && args.bundle.empty()) args.bundle = arg;
    else throw hm::Error("unknown argument '" + arg + "'\n" + kUsage);
  }
  if (args.bundle.empty()) throw hm::Error(std::string("no bundle given\n") + kUsage);
  if (args.cache != "stream" && args.cache != "default") throw hm::Error("--cache must be stream or default");
  if (args.route_on_device && !args.embeddings.empty())
    throw hm::Error("--route-on-device and --embeddings both route the checks: give one");
  if (args.has_context && args.prompt.empty()) throw hm::Error("--context needs --prompt");
  if (args.generate.max_new_tokens < 0 || args.generate.temperature < 0 || args.generate.top_k < 0 ||
      !(args.generate.top_p > 0 && args.generate.top_p <= 1))
    throw hm::Error("need --max-new-tokens >= 0, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1");
  if (args.runs < 1 || args.contexts < 1 || args.prompt_tokens < 1 || args.new_tokens < 1)
    throw hm::Error("--runs, -n, --prompt-tokens and --new-tokens must be positive");
  return args;
}

// ---- JSON output -------------------------------------------------------------------------------------------

std::string quote(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (c == '\n') out += "\\n";
    else if (static_cast<unsigned char>(c) < 0x20) out += "\\u00", out += "0123456789abcdef"[c >> 4], out += "0123456789abcdef"[c & 15];
    else out += c;
  }
  return out + "\"";
}

std::string number(double value) {
  if (!std::isfinite(value)) return "null";
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.6g", value);
  return buffer;
}

template <typename T>
std::string list(const std::vector<T>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + number(static_cast<double>(values[i]));
  return out + "]";
}

// n, p50, p99, mean, sd in milliseconds (percentiles interpolated like numpy's default).
std::string latency(std::vector<double> seconds) {
  if (seconds.empty()) return "{\"n\": 0}";
  std::sort(seconds.begin(), seconds.end());
  auto percentile = [&](double p) {
    double rank = p / 100 * (seconds.size() - 1);
    size_t lo = static_cast<size_t>(rank), hi = std::min(lo + 1, seconds.size() - 1);
    return 1e3 * (seconds[lo] + (seconds[hi] - seconds[lo]) * (rank - lo));
  };
  double mean = std::accumulate(seconds.begin(), seconds.end(), 0.0) / seconds.size(), var = 0;
  for (double s : seconds) var += (s - mean) * (s - mean);
  double sd = seconds.size() > 1 ? std::sqrt(var / (seconds.size() - 1)) : 0;
  return "{\"n\": " + std::to_string(seconds.size()) + ", \"p50\": " + number(percentile(50)) +
         ", \"p99\": " + number(percentile(99)) + ", \"mean\": " + number(1e3 * mean) + ", \"sd\": " + number(1e3 * sd) + "}";
}

std::string throughput(const std::vector<double>& per_run) {
  double mean = std::accumulate(per_run.begin(), per_run.end(), 0.0) / per_run.size(), var = 0;
  for (double v : per_run) var += (v - mean) * (v - mean);
  double sd = per_run.size() > 1 ? std::sqrt(var / (per_run.size() - 1)) : 0;
  return "{\"mean\": " + number(mean) + ", \"sd\": " + number(sd) + ", \"runs\": " + list(per_run) + "}";
}

// ---- golden checks -----------------------------------------------------------------------------------------

struct Check {
  std::string name, context;
  std::vector<int> path;
  std::vector<int64_t> prompt, greedy;
  std::vector<double> margins;
};

struct Checks {
  std::vector<Check> checks;
  double tolerance = 0;
  std::map<std::string, hm::Tensor> expected;
};

// Every id in [0, vocab) (a token id indexes the embedding and the logits).
void check_ids(const std::vector<int64_t>& ids, int vocab, const std::string& what) {
  for (int64_t id : ids)
    if (id < 0 || id >= vocab) throw std::runtime_error(what + ": token id " + std::to_string(id) + " is outside [0, " +
                                                        std::to_string(vocab) + ")");
}

// The golden checks of the bundle `runtime` opened (its manifest already checked), every field range-checked
// against the model so that a damaged checks file is refused here, never indexed out of bounds later.
Checks load_checks(const hm::Runtime& runtime, const std::string& bundle) {
  const auto [file, expected_file] = runtime.checks_files();
  if (file.empty()) throw hm::Error(bundle + "/manifest.json: the bundle has no golden checks (--checks 0)");
  const std::string path = bundle + "/" + file, expected_path = bundle + "/" + expected_file;
  hm::json::Value body = hm::parse_json(runtime.read_listed(file), path);
  const int vocab = runtime.vocab_size();
  Checks out;
  try {
    if (body.at("format", "format").as_string("format") != "hm-export-checks" ||
        body.at("version", "version").as_int("version") != 1)
      throw hm::Error("not hm-export-checks version 1");
    const std::string precision = runtime.check_precision();
    out.tolerance = body.at("tolerance", "tolerance").at(precision, "tolerance").as_number("tolerance." + precision);
    for (const hm::json::Value& item : body.at("checks", "checks").as_array("checks")) {
      Check check;
      check.name = item.at("name", "checks[]").as_string("checks[].name");
      check.context = item.at("context", check.name).as_string(check.name + ".context");
      for (int64_t node : item.at("path", check.name).as_int_list(check.name + ".path")) {
        if (node < 0 || node > INT32_MAX) throw hm::Error(check.name + ".path: node out of range");
        check.path.push_back(static_cast<int>(node));
      }
      check.prompt = item.at("prompt", check.name).as_int_list(check.name + ".prompt");
      check.greedy = item.at("greedy", check.name).as_int_list(check.name + ".greedy");
      check_ids(check.prompt, vocab, check.name + ".prompt");
      check_ids(check.greedy, vocab, check.name + ".greedy");
      if (check.prompt.empty() || check.prompt.size() + check.greedy.size() > static_cast<size_t>(runtime.max_seq_len()))
        throw hm::Error(check.name + ": prompt and greedy tokens do not fit the " + std::to_string(runtime.max_seq_len()) +
                        " positions");
      for (const auto& m : item.at("margins", check.name).as_array(check.name)) check.margins.push_back(m.as_number("margin"));
      if (check.margins.size() != check.greedy.size())
        throw hm::Error(check.name + ": " + std::to_string(check.margins.size()) + " margins for " +
                        std::to_string(check.greedy.size()) + " greedy tokens");
      out.checks.push_back(std::move(check));
    }
  } catch (const std::runtime_error& e) {
    throw hm::Error(path + ": " + e.what());
  }
  out.expected = hm::parse_safetensors(runtime.read_listed(expected_file), expected_path);
  for (const Check& check : out.checks) {  // the digest shapes logits_diff relies on
    const int64_t rows = static_cast<int64_t>(check.prompt.size());
    auto require = [&](const std::string& key, std::vector<int64_t> shape, bool ids) -> const hm::Tensor& {
      auto it = out.expected.find(check.name + "." + key);
      if (it == out.expected.end() || it->second.shape != shape ||
          (ids ? it->second.i64.size() : it->second.f32.size()) == 0)
        throw hm::Error(expected_path + ": tensor " + check.name + "." + key + " is missing or has the wrong shape");
      return it->second;
    };
    auto ids = out.expected.find(check.name + ".topk_ids");
    const int64_t k = ids != out.expected.end() && ids->second.shape.size() == 2 ? ids->second.shape[1] : 0;
    if (k < 1 || k > vocab) throw hm::Error(expected_path + ": tensor " + check.name + ".topk_ids has a bad shape");
    check_ids(require("topk_ids", {rows, k}, true).i64, vocab, expected_path + ": " + check.name + ".topk_ids");
    require("topk_values", {rows, k}, false);
    require("logsumexp", {rows}, false);
    require("last_logits", {vocab}, false);
  }
  return out;
}

const hm::Tensor& expected_tensor(const Checks& checks, const std::string& name) {
  auto it = checks.expected.find(name);
  if (it == checks.expected.end()) throw hm::Error("checks/expected.safetensors: missing tensor " + name);
  return it->second;
}

// Max |diff| of prefill logits [n, vocab] against the digest (top-k logits, logsumexp, last row), as checks.py.
double logits_diff(const Checks& checks, const std::string& name, const std::vector<float>& logits, int vocab) {
  const hm::Tensor& ids = expected_tensor(checks, name + ".topk_ids");
  const hm::Tensor& values = expected_tensor(checks, name + ".topk_values");
  const hm::Tensor& lse = expected_tensor(checks, name + ".logsumexp");
  const hm::Tensor& last = expected_tensor(checks, name + ".last_logits");
  const size_t rows = logits.size() / vocab;
  if (lse.f32.size() != rows) return INFINITY;
  double worst = 0;
  const size_t k = ids.shape.at(1);
  for (size_t row = 0; row < rows; ++row) {
    const float* line = logits.data() + row * vocab;
    for (size_t j = 0; j < k; ++j) worst = std::max(worst, std::fabs(double(line[ids.i64[row * k + j]]) - values.f32[row * k + j]));
    double top = *std::max_element(line, line + vocab), sum = 0;
    for (int v = 0; v < vocab; ++v) sum += std::exp(double(line[v]) - top);
    worst = std::max(worst, std::fabs(top + std::log(sum) - lse.f32[row]));
  }
  for (int v = 0; v < vocab; ++v) worst = std::max(worst, std::fabs(double(logits[(rows - 1) * vocab + v]) - last.f32[v]));
  return worst;
}

int64_t argmax(const float* logits, int vocab) { return std::max_element(logits, logits + vocab) - logits; }

struct Generation {
  std::vector<int64_t> tokens;
  double prefill_seconds = 0, first_token_seconds = 0;
  std::vector<double> steps;
};

// Greedy continuation with the KV cache, timed like runtime_stubs/generate.py.
Generation generate(hm::Runtime& runtime, const std::vector<int64_t>& prompt, int new_tokens,
                    std::vector<float>* prefill_logits = nullptr) {
  Generation out;
  const int vocab = runtime.vocab_size();
  auto start = Clock::now();
  // The checks compare every prompt position; generation needs only the last (the program's prefill method).
  std::vector<float> logits = prefill_logits ? runtime.prefill(prompt) : runtime.prefill_last(prompt);
  out.prefill_seconds = since(start);
  if (prefill_logits) *prefill_logits = logits;
  const float* last = logits.data() + logits.size() - vocab;
  while (static_cast<int>(out.tokens.size()) < new_tokens) {
    int64_t token = argmax(last, vocab);
    if (out.tokens.empty()) out.first_token_seconds = since(start);
    out.tokens.push_back(token);
    if (static_cast<int>(out.tokens.size()) == new_tokens || runtime.position() >= runtime.max_seq_len()) break;
    auto step = Clock::now();
    logits = runtime.decode(token);
    out.steps.push_back(since(step));
    last = logits.data();
  }
  return out;
}

// Replays the checks. With `embeddings` each check's context is routed from its embedding (the recorded path
// still fills the slot); with `on_device` it is routed from its text by the bundle's router program and the
// routed path fills the slot, so the continuation proves text in -> path -> memory -> tokens end to end.
std::string replay_checks(hm::Runtime& runtime, const Checks& checks, const std::vector<std::vector<float>>& embeddings,
                          bool on_device, bool* passed, std::string* human) {
  std::string results;
  int pass = 0, fail = 0, routes_matched = 0;
  size_t tokens_matched = 0, tokens_total = 0;
  for (size_t i = 0; i < checks.checks.size(); ++i) {
    const Check& check = checks.checks[i];
    std::string route = "null", embedding_json;
    bool route_ok = true;
    std::vector<int> fill = check.path;
    if (!embeddings.empty() || on_device) {
      std::vector<float> embedding = on_device ? runtime.embed(check.context) : embeddings.at(i);
      std::vector<int> routed = runtime.route(embedding.data(), embedding.size());
      route = list(routed);
      route_ok = routed == check.path;
      routes_matched += route_ok;
      if (on_device) fill = routed, embedding_json = ", \"embedding\": " + list(embedding);
    }
    runtime.set_path(fill);
    std::vector<float> logits;
    Generation generation = generate(runtime, check.prompt, static_cast<int>(check.greedy.size()), &logits);
    const double diff = logits_diff(checks, check.name, logits, runtime.vocab_size());
    size_t matched = 0;
    bool greedy_ok = true;
    std::string detail = "all greedy tokens equal";
    for (; matched < check.greedy.size(); ++matched) {
      if (matched >= generation.tokens.size() || generation.tokens[matched] != check.greedy[matched]) {
        const bool stopped = matched >= generation.tokens.size();
        greedy_ok = !stopped && check.margins[matched] <= 2 * checks.tolerance;
        detail = stopped     ? "stopped after " + std::to_string(matched) + " greedy tokens"
                 : greedy_ok ? "near-tie at step " + std::to_string(matched) + ": not compared further"
                             : "greedy token " + std::to_string(matched) + " differs";
        break;
      }
    }
    const bool ok = route_ok && diff <= checks.tolerance && greedy_ok;
    (ok ? pass : fail) += 1;
    tokens_matched += matched;
    tokens_total += check.greedy.size();
    results += std::string(results.empty() ? "" : ", ") + "{\"check\": " + quote(check.name) +
               ", \"status\": " + quote(ok ? "pass" : "fail") + ", \"max_abs_diff\": " + number(diff) +
               ", \"tokens_matched\": " + std::to_string(matched) + ", \"tokens\": " + list(generation.tokens) +
               ", \"route\": " + route + ", \"route_ok\": " + (route_ok ? "true" : "false") +
               ", \"detail\": " + quote(detail) + embedding_json + "}";
    *human += check.name + ": " + (ok ? "pass" : "FAIL") + "  max |logit diff| " + number(diff) + ", " +
              std::to_string(matched) + "/" + std::to_string(check.greedy.size()) + " greedy tokens" +
              (route == "null" ? "" : route_ok ? ", routes to its path" : ", ROUTES ELSEWHERE") + "\n";
  }
  *passed = fail == 0 && pass > 0;
  const bool routed = !embeddings.empty() || on_device;
  return "{\"passed\": " + std::string(*passed ? "true" : "false") + ", \"pass\": " + std::to_string(pass) +
         ", \"fail\": " + std::to_string(fail) + ", \"tolerance\": " + number(checks.tolerance) +
         ", \"routing\": " + quote(on_device ? "on-device" : routed ? "embeddings" : "recorded-paths") +
         ", \"routes_matched\": " + (routed ? std::to_string(routes_matched) : "null") +
         ", \"tokens_matched\": " + std::to_string(tokens_matched) + ", \"tokens_total\": " + std::to_string(tokens_total) +
         ", \"results\": [" + results + "]}";
}

// ---- fills and benchmark -----------------------------------------------------------------------------------

std::string update_json(const hm::SlotUpdate& update) {
  std::string sources = "[";
  for (size_t i = 0; i < update.sources.size(); ++i) sources += (i ? ", " : "") + quote(update.sources[i]);
  std::vector<double> level_ms;
  for (double s : update.level_seconds) level_ms.push_back(1e3 * s);
  return "{\"path\": " + list(update.path) + ", \"levels_changed\": " + list(update.levels_changed) +
         ", \"sources\": " + sources + "], \"level_ms\": " + list(level_ms) +
         ", \"storage_bytes\": " + std::to_string(update.storage_bytes) + "}";
}

// This process's peak RSS. Linux: VmHWM, because ru_maxrss survives execve and would report the parent's
// (e.g. a Python process that spawned the runner).
double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
#ifdef __APPLE__
  return usage.ru_maxrss / (1024.0 * 1024.0);  // bytes on macOS
#else
  return usage.ru_maxrss / 1024.0;  // KiB elsewhere
#endif
}

std::vector<int> leaf_path(const hm::Runtime& runtime, const std::vector<int>& branching, int leaf) {
  std::vector<int> path(runtime.num_levels());
  for (int level = runtime.num_levels() - 1; level >= 0; --level) {
    path[level] = leaf;
    leaf /= branching[level];
  }
  return path;
}

uint64_t slot_bytes(const hm::Runtime& runtime) {
  uint64_t total = 0;
  for (size_t i = 0; i < runtime.slot_count(); ++i) total += runtime.slot_nbytes(i);
  return total;
}

std::string bench(const Args& args, const Checks& checks, const std::vector<std::vector<float>>& embeddings) {
  hm::Options options;
  options.verify_files = false;
  if (!args.verify_key.empty()) options.verify_key = hm::read_public_key(args.verify_key);
  options.threads = args.threads;
  if (args.cache == "stream") options.cache = {0, 0, true};
  hm::Runtime runtime(args.bundle, options);
  std::vector<int> branching;
  for (int level = 0; level < runtime.num_levels(); ++level)
    branching.push_back(runtime.nodes_at(level) / (level ? runtime.nodes_at(level - 1) : 1));
  const int capacity = runtime.max_seq_len(), new_tokens = std::min(args.new_tokens, capacity / 2);
  const size_t prompt_tokens = std::min(args.prompt_tokens, capacity - new_tokens);
  const size_t count = std::min<size_t>(args.contexts, checks.checks.size());
  if (count == 0) throw hm::Error(args.bundle + ": no benchmark contexts (the bundle has no checks)");
  auto prompt_of = [&](size_t i) {
    const auto& prompt = checks.checks[i].prompt;
    return std::vector<int64_t>(prompt.begin(), prompt.begin() + std::min(prompt_tokens, prompt.size()));
  };
  runtime.set_path(checks.checks[0].path);
  generate(runtime, prompt_of(0), new_tokens);  // warm-up
  std::mt19937_64 rng(0);
  std::uniform_int_distribution<int> leaves(0, runtime.nodes_at(runtime.num_levels() - 1) - 1);
  std::vector<double> route, ttft, steps, prefill_rates, decode_rates;
  std::vector<double> parts[4];  // route, fetch_fill, prefill, first_sample
  std::vector<std::vector<double>> fetch(runtime.num_levels());
  std::set<std::vector<int>> paths;
  double mean_prompt = 0;
  for (int run = 0; run < args.runs; ++run) {
    double prefill_tokens = 0, prefill_seconds = 0, decoded = 0, decode_seconds = 0;
    for (size_t i = 0; i < count; ++i) {
      runtime.set_path(leaf_path(runtime, branching, leaves(rng)));  // the context we switch away from
      auto start = Clock::now();
      std::vector<int> path = checks.checks[i].path;
      if (!embeddings.empty()) path = runtime.route(embeddings[i].data(), embeddings[i].size());
      const double routed = embeddings.empty() ? 0 : since(start);
      hm::SlotUpdate update = runtime.set_path(path);
      double fill = std::accumulate(update.level_seconds.begin(), update.level_seconds.end(), 0.0);
      std::vector<int64_t> prompt = prompt_of(i);
      Generation result = generate(runtime, prompt, new_tokens);
      if (!embeddings.empty()) route.push_back(routed);
      ttft.push_back(routed + fill + result.first_token_seconds);
      for (int p = 0; p < 4; ++p)
        parts[p].push_back(p == 0 ? routed : p == 1 ? fill : p == 2 ? result.prefill_seconds
                                                                  : result.first_token_seconds - result.prefill_seconds);
      for (size_t c = 0; c < update.levels_changed.size(); ++c) fetch[update.levels_changed[c]].push_back(update.level_seconds[c]);
      paths.insert(path);
      prefill_tokens += prompt.size();
      prefill_seconds += result.prefill_seconds;
      decoded += result.steps.size();
      decode_seconds += std::accumulate(result.steps.begin(), result.steps.end(), 0.0);
      steps.insert(steps.end(), result.steps.begin(), result.steps.end());
      mean_prompt += prompt.size();
    }
    prefill_rates.push_back(prefill_tokens / prefill_seconds);
    decode_rates.push_back(decode_seconds > 0 ? decoded / decode_seconds : 0.0);
  }
  std::string fetch_json = "{";
  for (int level = 0; level < runtime.num_levels(); ++level)
    if (!fetch[level].empty())
      fetch_json += std::string(fetch_json.size() > 1 ? ", " : "") + "\"level" + std::to_string(level) + "\": " + latency(fetch[level]);
  const char* names[4] = {"route", "fetch_fill", "prefill", "first_sample"};
  std::string breakdown = "{";
  for (int p = 0; p < 4; ++p)
    breakdown += std::string(p ? ", " : "") + quote(names[p]) + ": " +
                 number(1e3 * std::accumulate(parts[p].begin(), parts[p].end(), 0.0) / parts[p].size());
  return "{\"bundle\": " + quote(args.bundle) + ", \"target\": \"executorch\", \"program\": \"decode\", \"runtime\": \"native\"" +
         ", \"slot_strategy\": " + quote(runtime.slot_strategy()) + ", \"slot_bytes\": " + std::to_string(slot_bytes(runtime)) +
         ", \"threads\": " + std::to_string(args.threads) + ", \"runs\": " + std::to_string(args.runs) +
         ", \"contexts\": " + std::to_string(count) + ", \"distinct_paths\": " + std::to_string(paths.size()) +
         ", \"prompt_tokens\": " + number(std::round(mean_prompt / (args.runs * count))) +
         ", \"new_tokens\": " + std::to_string(new_tokens) + ", \"cache_policy\": " + quote(args.cache) +
         ", \"route_ms\": " + latency(route) + ", \"fetch_fill_ms\": " + fetch_json + "}" +
         ", \"ttft_after_switch_ms\": " + latency(ttft) + ", \"ttft_breakdown_ms\": " + breakdown + "}" +
         ", \"prefill_tokens_per_s\": " + throughput(prefill_rates) + ", \"decode_tokens_per_s\": " + throughput(decode_rates) +
         ", \"decode_step_ms\": " + latency(steps) + ", \"peak_rss_mb\": " + number(peak_rss_mb()) + "}";
}

std::string generation_json(const hm::Generation& g) {
  return "{\"path\": " + list(g.path) + ", \"fill\": " + update_json(g.update) + ", \"prompt_tokens\": " +
         list(g.prompt_tokens) + ", \"new_tokens\": " + list(g.new_tokens) + ", \"text\": " + quote(g.text) +
         ", \"stop_reason\": " + quote(g.stop_reason) + ", \"route_ms\": " + number(1e3 * g.route_seconds) +
         ", \"fill_ms\": " + number(1e3 * g.fill_seconds) + ", \"prefill_ms\": " + number(1e3 * g.prefill_seconds) +
         ", \"first_token_ms\": " + number(1e3 * g.first_token_seconds) + ", \"decode_ms\": " +
         number(1e3 * g.decode_seconds) + "}";
}

// Embeddings [n, dim] of the checks' contexts, computed off device (the router's embedder is not exported yet).
std::vector<std::vector<float>> load_embeddings(const std::string& file, size_t count) {
  if (file.empty()) return {};
  auto tensors = hm::parse_safetensors(hm::read_file(file, 1ull << 32), file);
  auto it = tensors.find("embeddings");
  if (it == tensors.end() || it->second.shape.size() != 2 || static_cast<size_t>(it->second.shape[0]) < count ||
      it->second.f32.size() != static_cast<size_t>(it->second.shape[0] * it->second.shape[1]))
    throw hm::Error(file + ": expected a float32 tensor 'embeddings' [contexts, dim] with a row per check");
  std::vector<std::vector<float>> rows;
  const size_t dim = it->second.shape[1];
  for (size_t i = 0; i < count; ++i)
    rows.emplace_back(it->second.f32.begin() + i * dim, it->second.f32.begin() + (i + 1) * dim);
  return rows;
}

int run(const Args& args) {
  hm::Options options;
  options.verify_files = args.verify_files;
  if (!args.verify_key.empty()) options.verify_key = hm::read_public_key(args.verify_key);
  options.threads = args.threads;
  auto open_start = Clock::now();
  hm::Runtime runtime(args.bundle, options);
  const double open_seconds = since(open_start);
  std::string json = "{\"bundle\": " + quote(args.bundle) + ", \"open_ms\": " + number(1e3 * open_seconds) +
                     ", \"slot_strategy\": " + quote(runtime.slot_strategy()) +
                     ", \"slot_bytes\": " + std::to_string(slot_bytes(runtime));
  std::string human = "opened " + args.bundle + " in " + number(1e3 * open_seconds) + " ms\n";
  bool passed = true;
  Checks checks;
  std::vector<std::vector<float>> embeddings;
  if (args.checks || args.bench) {
    checks = load_checks(runtime, args.bundle);
    embeddings = load_embeddings(args.embeddings, checks.checks.size());
  }
  if (args.checks)
    json += ", \"checks\": " + replay_checks(runtime, checks, embeddings, args.route_on_device, &passed, &human);
  if (args.has_context) {
    const bool stream = !args.json;
    if (!args.next_context.empty()) runtime.prefetch_text(args.next_context);  // read while this one decodes
    hm::Generation first = runtime.generate(args.context, args.prompt, args.generate, [&](const std::string& piece) {
      if (stream) std::cout << piece << std::flush;
    });
    json += ", \"generation\": " + generation_json(first);
    if (stream) std::cout << "\n";
    if (!args.next_context.empty()) {
      const std::vector<int> prefetched = runtime.wait_prefetch();
      hm::Generation next = runtime.generate(args.next_context, args.prompt, args.generate);
      json += ", \"next\": " + generation_json(next) + ", \"prefetched_path\": " + list(prefetched);
      if (stream) std::cout << next.text << "\n";
    }
    if (stream) human.clear();
  }
  if (!args.fills.empty()) {
    json += ", \"fills\": [";
    for (size_t i = 0; i < args.fills.size(); ++i) {
      hm::SlotUpdate update = runtime.set_path(args.fills[i]);
      json += (i ? ", " : "") + update_json(update);
      human += "fill " + list(update.path) + ": levels " + list(update.levels_changed) + " changed\n";
    }
    json += "]";
  }
  if (!args.dump_slot.empty()) {
    std::ofstream out(args.dump_slot, std::ios::binary);
    for (size_t i = 0; i < runtime.slot_count(); ++i)
      out.write(static_cast<const char*>(runtime.slot_data(i)), runtime.slot_nbytes(i));
    if (!out) throw hm::Error(args.dump_slot + ": cannot write the slot");
  }
  if (args.bench) {
    std::string report = bench(args, checks, embeddings);
    json += ", \"bench\": " + report;
    human += "bench: " + report + "\n";
  }
  std::cout << (args.json ? json + "}\n" : human);
  return passed ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
