#!/usr/bin/env bash
# The main job on the shipped example: set up, export a bundle, verify it against eager, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
example=examples/stdlib_docs
hm-export export "$example/checkpoint" out/stdlib_docs.bundle --target executorch,onnx \
    --check-contexts "$example/heldout.jsonl" --overwrite
hm-export check out/stdlib_docs.bundle   # the golden checks that travel with the bundle, per target
hm-export inspect out/stdlib_docs.bundle --json | python -c \
    'import json,sys; m=json.load(sys.stdin); print("slot inputs:", [t["name"] for t in m["slot"]["inputs"]]); print("delegation:", m["targets"]["executorch"]["delegation"])'
hm-export verify out/stdlib_docs.bundle --checkpoint "$example/checkpoint" --contexts "$example/heldout.jsonl" -n 64
# Two contexts (the head of the file being worked on) that route to different memory paths.
hm-export run out/stdlib_docs.bundle \
    --context '"""Generic socket server classes. This module tries to capture the various aspects of
defining a server: for socket-based servers, address family, socket type and request handling."""' \
    --prompt 'class TCPServer(BaseServer):
    def server_bind(self):
        ' --max-new-tokens 32
hm-export run out/stdlib_docs.bundle \
    --context '"""Basic message object for the email package. A Message holds MIME headers and a payload,
which may be a list of sub-messages."""' \
    --prompt 'def get_payload(self, i=None, decode=False):
        ' --max-new-tokens 32
hm-export bench out/stdlib_docs.bundle --runs 3 --plot out/stdlib_docs.bench.png
