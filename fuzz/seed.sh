#!/usr/bin/env bash
# Seeds each corpus with the project's own examples (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/path corpus/credential corpus/policy corpus/keys_reader corpus/rfc5424
i=0
for p in / /v1/datasets /v1/datasets/ds_1 "/v1/%2e%2e/admin" "/a;x/b" "/v1/Datasets/LATEST.json" "//a///b/./c/../d" "/late%C5%BFt" "/a%2Fb" "/%C0%AE"; do
  printf '%s' "$p" > "corpus/path/seed$i"; i=$((i+1))
done
printf 'authorization:Bearer pcs_abc\nx-api-key:pcs_abc\n' > corpus/credential/seed0
printf 'authorization:Basic YWxpY2U6cGNzX2FiYw==\n' > corpus/credential/seed1
printf 'authorization:Digest x\nauthorization:bearer   a\t\n' > corpus/credential/seed2
n=0
for f in ../policies/*.yaml ../policies/examples/*/policy.yaml; do cp "$f" "corpus/policy/seed$n"; n=$((n+1)); done
printf 'version: 1\nkeys:\n  - id: a\n    prefix: pcs_aaaaaa\n    principal: alice\n    scopes: ["datasets:read"]\n    active: true\n    hash: "sha256:%064d"\n' 0 > corpus/keys_reader/seed0
printf 'version: 1\nkeys:\n  - {id: f, prefix: p, hash: "sha256:%064d", principal: alice}\n' 0 > corpus/keys_reader/seed1
printf 'version: 1\nkeys: []\n' > corpus/keys_reader/seed2
printf 'r1\x01GET\x01/v1/datasets/"x"]\\\x01/v1/{d}\x01curl/8\x01alice\x01127.0.0.1\x01host\x01sd@1' > corpus/rfc5424/seed0
