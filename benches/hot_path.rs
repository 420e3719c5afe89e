//! Micro-benchmarks of the pure pieces on the request path and of loading the state.
//!
//! Every input (policies, keys files, compiled snapshots, paths) is built before the timed
//! closure; the closures only call the function under test. Run with `cargo bench --bench
//! hot_path`; results and targets are in `benches/README.md`.

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode};
use http::Method;
use portcullis::keys::{self, secret, KeyLookup, UsageTable};
use portcullis::state::Snapshot;
use portcullis::{decision, path, policy};

mod workload;

/// Keys in the large store, as in the issue's target.
const MANY_KEYS: usize = 1_000_000;
/// Unix time at which every benchmark key is valid.
const NOW: i64 = 1_800_000_000;

fn normalisation(c: &mut Criterion) {
    let mut group = c.benchmark_group("path_normalise");
    let cases = [
        ("plain", "/v1/orgs/acme/datasets/ds_42/versions/7"),
        ("dot_segments", "/v1/orgs/acme/./datasets/../datasets/ds_42/"),
        ("double_slashes", "//v1//orgs///acme/datasets//ds_42"),
        ("escapes", "/v1/orgs/ac%6De/datasets/ds%5F42/files/a%20b%2Ec%C3%A9"),
        (
            "long",
            "/v1/orgs/acme/datasets/ds_42/files/2026/01/01/raw/events/part-00000-1f2e3d4c.snappy.parquet",
        ),
    ];
    for (name, raw) in cases {
        group.bench_with_input(BenchmarkId::from_parameter(name), raw, |b, raw| {
            b.iter(|| path::normalise(black_box(raw)))
        });
    }
    group.finish();
}

fn route_matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_match");
    for routes in [10, 1_000, 10_000] {
        let policy = compile_policy(routes);
        // A resource in the middle of the file, so the radix tree has neighbours on both sides.
        let res = workload::resource(routes / workload::ROUTES_PER_RESOURCE / 2);
        let cases = [
            ("static", Method::GET, format!("/v1/orgs/acme/{res}")),
            (
                "params",
                Method::GET,
                format!("/v1/orgs/acme/{res}/ds_42/versions/7"),
            ),
            (
                "catch_all",
                Method::GET,
                format!("/v1/orgs/acme/{res}/ds_42/files/2026/01/report.csv"),
            ),
            (
                "head_as_get",
                Method::HEAD,
                format!("/v1/orgs/acme/{res}/ds_42"),
            ),
            (
                "miss",
                Method::GET,
                format!("/v1/orgs/acme/{res}/ds_42/nope"),
            ),
        ];
        for (name, method, path) in &cases {
            let expect_hit = *name != "miss";
            assert_eq!(policy.lookup(method, path).is_some(), expect_hit, "{path}");
            let id = BenchmarkId::new(*name, routes);
            group.bench_with_input(id, &(method, path.as_str()), |b, (method, path)| {
                b.iter(|| policy.lookup(black_box(method), black_box(path)).is_some())
            });
        }
    }
    group.finish();
}

fn key_lookup(c: &mut Criterion) {
    let snapshot = snapshot(100, MANY_KEYS);
    let known = workload::bench_key(MANY_KEYS / 2);
    let unknown = workload::bench_key(MANY_KEYS + 1);
    assert!(matches!(
        snapshot.keys.lookup(&known, NOW),
        KeyLookup::Valid(_)
    ));
    let mut group = c.benchmark_group("key_lookup_1M");
    group.bench_function("known", |b| {
        b.iter(|| {
            matches!(
                snapshot.keys.lookup(black_box(&known), NOW),
                KeyLookup::Valid(_)
            )
        })
    });
    group.bench_function("unknown", |b| {
        b.iter(|| {
            matches!(
                snapshot.keys.lookup(black_box(&unknown), NOW),
                KeyLookup::Unknown
            )
        })
    });
    group.finish();
    let mut group = c.benchmark_group("key_secret");
    group.bench_function("hash_text", |b| {
        b.iter(|| secret::hash_text(black_box(&known)))
    });
    group.bench_function("generate", |b| b.iter(secret::generate));
    group.finish();
}

fn whole_decision(c: &mut Criterion) {
    let snapshot = snapshot(1_000, 10_000);
    // Key 0 belongs to `reader` (viewer role: read on everything, nothing else).
    let reader = workload::bench_key(0);
    assert_eq!(workload::bench_principal(0), "reader");
    let stranger = workload::bench_key(10_000_000);
    let res = workload::resource(50);
    let item = format!("/v1/orgs/acme/{res}/ds_42");
    let raw = format!("/v1/orgs/acme/{res}/./ds_42");
    let cases = [
        ("allow", Method::GET, &reader, decision::Reason::Granted),
        (
            "deny_403",
            Method::PUT,
            &reader,
            decision::Reason::Forbidden,
        ),
        (
            "deny_401",
            Method::GET,
            &stranger,
            decision::Reason::UnknownKey,
        ),
    ];
    let reading = path::BackendReading::default();
    let mut group = c.benchmark_group("decide");
    for (name, method, key, reason) in &cases {
        let got = decision::decide(&snapshot, method, &item, &reading, Ok(Some(key)), NOW).reason;
        assert_eq!(got, *reason, "{name}");
        group.bench_function(*name, |b| {
            b.iter(|| {
                let d = decision::decide(
                    &snapshot,
                    black_box(method),
                    black_box(&item),
                    &reading,
                    Ok(Some(black_box(key.as_str()))),
                    NOW,
                );
                d.reason
            })
        });
    }
    // What the proxy does per request before the decision: normalise, then decide.
    group.bench_function("normalise_and_allow", |b| {
        b.iter(|| {
            let normalised = path::normalise_for(black_box(&raw), &reading).unwrap_or_default();
            let credential = Ok(Some(reader.as_str()));
            decision::decide(
                &snapshot,
                &Method::GET,
                &normalised,
                &reading,
                credential,
                NOW,
            )
            .reason
        })
    });
    group.finish();
}

/// OAuth access tokens: a signature check (first sight of a token) and a cache hit (every
/// request after), for the two curve algorithms ring can make keys for here.
fn tokens(c: &mut Criterion) {
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use portcullis::oauth::{jwks::KeySet, IssuerConfig, OAuth, OAuthConfig, OAuthMetrics};
    use ring::signature::{self as sig, KeyPair};

    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rng = ring::rand::SystemRandom::new();
    let ed = sig::Ed25519KeyPair::generate_pkcs8(&rng).expect("ed25519 key");
    let ed_public = sig::Ed25519KeyPair::from_pkcs8(ed.as_ref())
        .expect("ed25519 pair")
        .public_key()
        .as_ref()
        .to_vec();
    let ec_alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
    let ec = sig::EcdsaKeyPair::generate_pkcs8(ec_alg, &rng).expect("p256 key");
    let ec_public = sig::EcdsaKeyPair::from_pkcs8(ec_alg, ec.as_ref(), &rng)
        .expect("p256 pair")
        .public_key()
        .as_ref()
        .to_vec();
    let set = serde_json::json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": b64(&ed_public), "kid": "ed"},
        {"kty": "EC", "crv": "P-256", "x": b64(&ec_public[1..33]), "y": b64(&ec_public[33..]), "kid": "ec"},
    ]});
    let keys = KeySet::parse(set.to_string().as_bytes()).expect("key set");
    let issuer = "https://idp.bench/";
    let config = OAuthConfig {
        issuers: vec![IssuerConfig {
            issuer: issuer.to_string(),
            jwks_uri: "https://idp.bench/jwks".parse().expect("uri"),
            audience: "api://bench".to_string(),
            principal_claim: "sub".to_string(),
            algorithms: vec![Algorithm::EdDSA, Algorithm::ES256],
            ca: None,
        }],
        refresh_interval: Duration::from_secs(300),
        cache_size: 10_000,
    };
    let metrics = OAuthMetrics::register(&prometheus::Registry::new()).expect("metrics");
    let oauth = OAuth::with_sets(&config, metrics, vec![keys]).expect("oauth");
    let claims = serde_json::json!({
        "iss": issuer, "aud": "api://bench", "sub": "reader", "scope": "openid datasets:read",
        "exp": NOW + 3600, "client_id": "bench",
    });
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, &claims, key).expect("sign")
    };
    let ed_token = sign(
        Algorithm::EdDSA,
        "ed",
        &EncodingKey::from_ed_der(ed.as_ref()),
    );
    let ec_token = sign(
        Algorithm::ES256,
        "ec",
        &EncodingKey::from_ec_der(ec.as_ref()),
    );
    let snapshot = snapshot(100, 1_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("token");
    for (name, token) in [("eddsa", &ed_token), ("es256", &ec_token)] {
        let verified = runtime.block_on(oauth.verify(token, NOW));
        assert!(verified.is_ok_and(|v| v.principal == "reader"), "{name}");
        group.bench_function(format!("verify_{name}"), |b| {
            b.iter(|| {
                runtime
                    .block_on(oauth.verify(black_box(token), NOW))
                    .is_ok()
            })
        });
    }
    assert!(runtime
        .block_on(oauth.identify(&ed_token, &snapshot, NOW))
        .is_ok());
    group.bench_function("identify_cached", |b| {
        b.iter(|| {
            runtime
                .block_on(oauth.identify(black_box(&ed_token), &snapshot, NOW))
                .is_ok()
        })
    });
    group.finish();
}

/// Response filtering: a 1,000-item list and a ~1 MB list, keeping every other item, against
/// validating the same body only (what any JSON-aware proxy pays) .
fn filtering(c: &mut Criterion) {
    use portcullis::policy::filter::{filter, Pointer};
    let list = |n: usize, pad: usize| {
        let items: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"id": "c{i}", "name": "company {i}", "pad": "{}"}}"#,
                    ".".repeat(pad)
                )
            })
            .collect();
        format!(
            r#"{{"total": {n}, "data": [{}], "next": null}}"#,
            items.join(", ")
        )
    };
    let items = Pointer::parse("/data").expect("pointer");
    let instance = Pointer::parse("/id").expect("pointer");
    let mut group = c.benchmark_group("filter");
    for (name, body) in [("1k_items", list(1_000, 16)), ("1mb", list(5_000, 160))] {
        let keep = |i: &str| i.len().is_multiple_of(2);
        assert!(filter(body.as_bytes(), &items, &instance, keep).is_ok());
        group.throughput(criterion::Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("{name}_filter"), |b| {
            b.iter(|| {
                filter(black_box(body.as_bytes()), &items, &instance, keep)
                    .map(|(v, n)| (v.len(), n))
            })
        });
        group.bench_function(format!("{name}_validate_only"), |b| {
            b.iter(|| {
                serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body.as_bytes())).is_ok()
            })
        });
    }
    group.finish();
}

fn loading(c: &mut Criterion) {
    let policy_text = workload::policy_yaml(10_000);
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("policy_compile_10k_routes", |b| {
        b.iter(|| policy::compile(black_box(&policy_text)).is_ok())
    });

    let policy = compile_policy(100);
    let keys_text = workload::keys_yaml(MANY_KEYS);
    group.measurement_time(Duration::from_secs(40));
    group.bench_function("keys_parse_compile_1M", |b| {
        // A first load: no previous store, empty usage table. The store and table are returned,
        // so their (large) drop happens outside the timing.
        b.iter_batched(
            || Arc::new(UsageTable::default()),
            |usage| {
                let store = keys::compile(black_box(&keys_text), &policy, None, &usage).ok();
                (store, usage)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn compile_policy(routes: usize) -> policy::Policy {
    match policy::compile(&workload::policy_yaml(routes)) {
        Ok(p) => p,
        Err(problems) => panic!("generated policy does not compile: {problems:?}"),
    }
}

fn snapshot(routes: usize, keys: usize) -> Snapshot {
    let policy_text = workload::policy_yaml(routes);
    let keys_text = workload::keys_yaml(keys);
    match Snapshot::compile(
        &policy_text,
        &keys_text,
        1,
        &Arc::new(UsageTable::default()),
    ) {
        Ok((snapshot, _warnings)) => snapshot,
        Err(problems) => panic!("generated state does not compile: {problems:?}"),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = normalisation, route_matching, key_lookup, whole_decision, tokens, filtering, loading
}
criterion_main!(benches);
