#!/usr/bin/env python3
"""Writes the load benchmark's inputs for portcullis, nginx and HAProxy into one folder.

The same 10,000 keys, the same principals and the same grants in each proxy's own format:
  policy.yaml, keys.yaml           portcullis (keys stored as SHA-256, as always)
  nginx-keys.map, nginx-ids.map    nginx `map $http_x_api_key` bodies (plaintext key -> value)
  nginx-grants.map                 nginx `map "$principal|$need"` body
  haproxy-keys.map, haproxy-ids.map, haproxy-grants.map
  load-keys.env                    ALLOW_KEY (a reader), DENY_KEY (same reader), UNKNOWN_KEY

Keys are deterministic (seeded), so runs are comparable. Usage: gen_fixtures.py DIR [N]
"""

import hashlib
import os
import random
import string
import sys

ALPHANUM = string.ascii_letters + string.digits

# principal -> grants as "resource:access"; write includes read (spelled out for nginx/HAProxy).
PRINCIPALS = {
    "reader": ["datasets:read"],
    "writer": ["datasets:write", "jobs:write"],
    "ops": ["*:read"],
    "jobs-bot": ["jobs:write"],
}
RESOURCES = ["datasets", "jobs", "companies", "files"]

POLICY = """\
# Load-benchmark policy; nginx.conf.in and haproxy.cfg.in encode the same routes.
version: 1
routes:
  - match: GET /status
    public: true
  - match: GET /v1/datasets
    resource: datasets
    access: read
  - match: POST /v1/datasets
    resource: datasets
    access: write
  - match: GET /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: read
  - match: PUT|PATCH|DELETE /v1/datasets/{dataset}
    resource: datasets
    instance: dataset
    access: write
  - match: GET /v1/jobs
    resource: jobs
    access: read
  - match: POST /v1/jobs
    resource: jobs
    access: write
  - match: GET /v1/jobs/{job}
    resource: jobs
    instance: job
    access: read
  - match: DELETE /v1/jobs/{job}
    resource: jobs
    instance: job
    access: write
  - match: GET /v1/companies/{company}
    resource: companies
    instance: company
    access: read
  - match: GET /v1/files/{*path}
    resource: files
    access: read
roles:
  viewer: ["*:read"]
principals:
  reader: { kind: user, grants: ["datasets:read"] }
  writer: { kind: user, grants: ["datasets:write", "jobs:write"] }
  ops: { kind: user, roles: [viewer] }
  jobs-bot: { kind: robot, grants: ["jobs:write"] }
"""


def expanded_grants(principal):
    """Every "resource:access" string the principal satisfies."""
    out = set()
    for grant in PRINCIPALS[principal]:
        resource, access = grant.split(":")
        resources = RESOURCES if resource == "*" else [resource]
        levels = ["read", "write"] if access == "write" else ["read"]
        for r in resources:
            for level in levels:
                out.add(f"{r}:{level}")
    return sorted(out)


def main():
    folder = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(20260101)
    names = list(PRINCIPALS)
    keys = []
    for i in range(count):
        key_id = "".join(rng.choice(ALPHANUM) for _ in range(8))
        key = "pcs_" + key_id + "".join(rng.choice(ALPHANUM) for _ in range(32))
        keys.append((key_id, key, names[i % len(names)]))

    def write(name, text):
        with open(os.path.join(folder, name), "w", encoding="ascii") as f:
            f.write(text)

    write("policy.yaml", POLICY)
    entries = ["version: 1", "keys:"]
    for key_id, key, principal in keys:
        digest = hashlib.sha256(key.encode()).hexdigest()
        entries += [
            f"  - id: {key_id}",
            f'    prefix: "{key[:10]}"',
            f'    hash: "sha256:{digest}"',
            f"    principal: {principal}",
            "    created: 2026-01-01T00:00:00Z",
        ]
    write("keys.yaml", "\n".join(entries) + "\n")
    write("nginx-keys.map", "".join(f"{k} {p};\n" for _, k, p in keys))
    write("nginx-ids.map", "".join(f"{k} {i};\n" for i, k, _ in keys))
    write("haproxy-keys.map", "".join(f"{k} {p}\n" for _, k, p in keys))
    write("haproxy-ids.map", "".join(f"{k} {i}\n" for i, k, _ in keys))
    grants = [f"{p}|{g}" for p in names for g in expanded_grants(p)]
    write("nginx-grants.map", "".join(f'"{g}" 1;\n' for g in grants))
    write("haproxy-grants.map", "".join(f"{g} 1\n" for g in grants))
    reader = next(k for _, k, p in keys if p == "reader")
    unknown = "pcs_" + "".join(rng.choice(ALPHANUM) for _ in range(40))
    write(
        "load-keys.env",
        f"ALLOW_KEY={reader}\nDENY_KEY={reader}\nUNKNOWN_KEY={unknown}\n",
    )


if __name__ == "__main__":
    main()
