//! Path tricks and request smuggling, sent as raw bytes so no HTTP library cleans them up
//! first. The viewer key (`*:read`) may read datasets and anyone may use `/v1/public/...`;
//! `/v1/admin/...` needs write. Each test asserts the status and that the backend never got
//! a request the caller may not make (or got only the normalised, allowed path).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends `bytes`; the first status must be one of `allowed` and the backend must see nothing.
async fn refused(w: &World, bytes: &[u8], allowed: &[u16]) {
    let before = w.backend.count();
    let reply = w.raw(bytes).await;
    assert!(
        allowed.contains(&reply.status()),
        "request {:?}\nanswered {} (wanted one of {allowed:?}):\n{}",
        lossy(bytes),
        reply.status(),
        lossy(&reply.bytes)
    );
    assert_eq!(
        w.backend.count(),
        before,
        "request {:?} reached the backend: {:?}",
        lossy(bytes),
        w.backend.targets()
    );
}

/// GET `target` with the viewer key (expecting `with_key`) and without a key (`without`).
async fn refused_both_ways(w: &World, target: &str, with_key: &[u16], without: &[u16]) {
    refused(w, &raw_get(target, Some(&w.viewer)), with_key).await;
    refused(w, &raw_get(target, None), without).await;
}

/// Sends `bytes`, expects `status`, and on 200 exactly one backend request for `target`.
async fn forwarded_as(w: &World, bytes: &[u8], target: &str) {
    let reply = w.raw(bytes).await;
    assert_eq!(
        reply.status(),
        200,
        "request {:?}:\n{}",
        lossy(bytes),
        lossy(&reply.bytes)
    );
    let last = w.backend.requests().pop().expect("backend got the request");
    assert_eq!(
        last.target,
        target,
        "request {:?} was forwarded as",
        lossy(bytes)
    );
}

/// Either refused with 400, or forwarded exactly as `target` (never decoded into a climb).
async fn rejected_or_forwarded_verbatim(w: &World, bytes: &[u8], target: &str) {
    let reply = w.raw(bytes).await;
    match reply.status() {
        400 => assert_eq!(w.backend.count(), 0, "a 400 request reached the backend"),
        200 => assert_eq!(
            w.backend.single().target,
            target,
            "request {:?} was forwarded as",
            lossy(bytes)
        ),
        other => panic!(
            "request {:?}: unexpected {other}:\n{}",
            lossy(bytes),
            lossy(&reply.bytes)
        ),
    }
    assert_backend_clean(&w.backend);
}

// --- dot segments --------------------------------------------------------------------------

#[tokio::test]
async fn dot_dot_cannot_climb_out_of_a_public_prefix() {
    let w = World::start().await;
    refused_both_ways(&w, "/v1/public/../admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1/datasets/../admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1/public/a/b/../../../admin/x", &[403], &[401]).await;
}

#[tokio::test]
async fn encoded_dot_dot_is_decoded_then_resolved() {
    let w = World::start().await;
    refused_both_ways(&w, "/v1/public/%2e%2e/admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1/datasets/%2e%2e/admin/x", &[403], &[401]).await;
}

#[tokio::test]
async fn encoded_dot_dot_in_mixed_case_is_resolved() {
    let w = World::start().await;
    refused_both_ways(&w, "/v1/public/%2E%2e/admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1/public/%2E%2E/admin/x", &[403], &[401]).await;
}

#[tokio::test]
async fn half_encoded_dot_dot_is_resolved() {
    let w = World::start().await;
    refused_both_ways(&w, "/v1/public/.%2e/admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1/public/%2e./admin/x", &[403], &[401]).await;
}

#[tokio::test]
async fn single_dot_segments_are_removed() {
    let w = World::start().await;
    refused_both_ways(&w, "/./v1/admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1/./admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1/public/./../admin/x", &[403], &[401]).await;
    forwarded_as(
        &w,
        &raw_get("/v1/./datasets/./ds_1", Some(&w.viewer)),
        "/v1/datasets/ds_1",
    )
    .await;
}

#[tokio::test]
async fn dot_dot_above_the_root_clamps_at_the_root() {
    let w = World::start().await;
    refused_both_ways(&w, "/../../v1/admin/x", &[403], &[401]).await;
    forwarded_as(
        &w,
        &raw_get("/../../../v1/datasets/ds_1", Some(&w.viewer)),
        "/v1/datasets/ds_1",
    )
    .await;
    assert_backend_clean(&w.backend);
}

#[tokio::test]
async fn semicolon_dot_dot_is_not_a_way_around_the_route_table() {
    let w = World::start().await;
    for target in [
        "/v1/datasets/x/..;/admin",
        "/v1/datasets/..;/admin/x",
        "/v1/datasets/ds_1;/../../admin/x",
    ] {
        refused(&w, &raw_get(target, Some(&w.viewer)), &[400, 403]).await;
    }
}

// --- encoded separators and bad escapes ----------------------------------------------------

#[tokio::test]
async fn an_encoded_slash_is_400() {
    let w = World::start().await;
    for target in [
        "/v1/datasets/%2fadmin",
        "/v1/datasets/%2Fadmin",
        "/v1/public/..%2fadmin/x",
        "/v1/public/%2e%2e%2fadmin%2fx",
    ] {
        refused_both_ways(&w, target, &[400], &[400]).await;
    }
}

#[tokio::test]
async fn an_encoded_backslash_is_400() {
    let w = World::start().await;
    for target in ["/v1/public/..%5cadmin/x", "/v1/public/..%5Cadmin%5Cx"] {
        refused_both_ways(&w, target, &[400], &[400]).await;
    }
}

#[tokio::test]
async fn a_raw_backslash_is_400() {
    let w = World::start().await;
    refused_both_ways(&w, "/v1/public/..\\admin\\x", &[400], &[400]).await;
    refused_both_ways(&w, "/v1/public\\..\\..\\v1/admin/x", &[400], &[400]).await;
}

#[tokio::test]
async fn nul_raw_or_encoded_is_400() {
    let w = World::start().await;
    refused(
        &w,
        &raw_request("GET", b"/v1/public/a\0/../../admin/x", Some(&w.viewer)),
        &[400],
    )
    .await;
    refused_both_ways(&w, "/v1/public/a%00/../../admin/x", &[400], &[400]).await;
}

#[tokio::test]
async fn invalid_escapes_and_a_trailing_percent_are_400() {
    let w = World::start().await;
    for target in [
        "/v1/public/x%",
        "/v1/public/%zz",
        "/v1/public/%4",
        "/v1/public/%4/x",
        "/v1/public/%G0",
        "/v1/public/%%32%65",
    ] {
        refused_both_ways(&w, target, &[400], &[400]).await;
    }
}

#[tokio::test]
async fn overlong_utf8_dots_are_never_decoded_into_a_climb() {
    let w = World::start().await;
    refused(
        &w,
        &raw_get("/v1/datasets/%c0%ae%c0%ae/admin", Some(&w.viewer)),
        &[400, 403],
    )
    .await;
    let bytes = raw_get("/v1/public/%c0%ae%c0%ae/admin/x", None);
    rejected_or_forwarded_verbatim(&w, &bytes, "/v1/public/%C0%AE%C0%AE/admin/x").await;
}

#[tokio::test]
async fn double_encoding_is_decoded_once_at_most() {
    let w = World::start().await;
    let bytes = raw_get("/v1/public/%252e%252e/admin/x", None);
    rejected_or_forwarded_verbatim(&w, &bytes, "/v1/public/%252e%252e/admin/x").await;
}

// --- slashes, case, trailing slash ---------------------------------------------------------

#[tokio::test]
async fn double_slashes_collapse_before_matching() {
    let w = World::start().await;
    refused_both_ways(&w, "//v1/admin/x", &[403], &[401]).await;
    refused_both_ways(&w, "/v1//admin///x", &[403], &[401]).await;
    forwarded_as(
        &w,
        &raw_get("//v1///datasets", Some(&w.viewer)),
        "/v1/datasets",
    )
    .await;
    // Whatever order collapsing and dot removal run in, nothing un-normalised reaches the backend.
    let reply = w
        .raw(&raw_get("/v1/public//../admin/x", Some(&w.viewer)))
        .await;
    assert!(
        [200, 403].contains(&reply.status()),
        "{}",
        lossy(&reply.bytes)
    );
    assert_backend_clean(&w.backend);
}

#[tokio::test]
async fn a_trailing_slash_is_judged_like_the_path_without_it_and_forwarded_as_sent() {
    // Judging `/x/` by a broader catch-all than `/x` would let a backend that ignores trailing
    // slashes be reached around the narrower route; so the slash never changes the route.
    let w = World::start().await;
    for target in ["/v1/datasets/", "/v1/datasets/ds_1/", "/v1/jobs/"] {
        forwarded_as(&w, &raw_get(target, Some(&w.viewer)), target).await;
    }
    let put = format!(
        "PUT /v1/datasets/ds_1/ HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        w.viewer.key
    );
    refused(&w, put.as_bytes(), &[403]).await;
    refused(&w, &raw_get("/v1/admin/x/", Some(&w.viewer)), &[403]).await;
}

#[tokio::test]
async fn dot_segments_with_matrix_parameters_are_refused() {
    // Tomcat and Jetty read `..;x` as `..`: the proxy would judge a different path.
    let w = World::start().await;
    for target in [
        "/v1/public/..;/admin/x",
        "/v1/public/.;/x",
        "/v1/public/..;jsessionid=1/admin/x",
    ] {
        refused(&w, &raw_get(target, Some(&w.viewer)), &[400]).await;
    }
}

#[tokio::test]
async fn paths_are_case_sensitive() {
    let w = World::start().await;
    for target in ["/V1/ADMIN/x", "/v1/Admin/x", "/v1/aDmin/x"] {
        refused_both_ways(&w, target, &[403], &[401]).await;
    }
}

#[tokio::test]
async fn encoded_unreserved_characters_are_decoded_and_forwarded_normalised() {
    let w = World::start().await;
    forwarded_as(
        &w,
        &raw_get("/v1/d%61tasets/ds%5F1", Some(&w.viewer)),
        "/v1/datasets/ds_1",
    )
    .await;
    forwarded_as(
        &w,
        &raw_get("/v1/public/%7euser/caf%c3%a9?q=%c3%a9", None),
        "/v1/public/~user/caf%C3%A9?q=%c3%a9",
    )
    .await;
    refused(&w, &raw_get("/v1/%61dmin/x", Some(&w.viewer)), &[403]).await;
    forwarded_as(&w, &raw_get("/v1/%61dmin/x", Some(&w.ops)), "/v1/admin/x").await;
}

// --- request line and target forms ---------------------------------------------------------

#[tokio::test]
async fn a_lowercase_method_is_not_an_uppercase_one() {
    let w = World::start().await;
    refused(
        &w,
        &raw_request("get", b"/v1/admin/x", Some(&w.viewer)),
        &[400, 403, 405, 501],
    )
    .await;
    refused(
        &w,
        &raw_request("put", b"/v1/datasets/ds_1", Some(&w.viewer)),
        &[400, 403, 405, 501],
    )
    .await;
    refused(
        &w,
        &raw_request("pUT", b"/v1/datasets/ds_1", Some(&w.viewer)),
        &[400, 403, 405, 501],
    )
    .await;
}

#[tokio::test]
async fn absolute_form_is_judged_by_its_path_only() {
    let w = World::start().await;
    refused(
        &w,
        &raw_get("http://127.0.0.1/v1/admin/x", Some(&w.viewer)),
        &[403],
    )
    .await;
    refused(
        &w,
        &raw_get("http://127.0.0.1/v1/public/../admin/x", Some(&w.viewer)),
        &[403],
    )
    .await;
    refused(&w, &raw_get("http://127.0.0.1/v1/admin/x", None), &[401]).await;
    forwarded_as(
        &w,
        &raw_get("http://127.0.0.1/v1/datasets/ds_1", Some(&w.viewer)),
        "/v1/datasets/ds_1",
    )
    .await;
    assert_eq!(
        w.backend.requests().pop().unwrap().header("host"),
        Some("127.0.0.1")
    );
}

#[tokio::test]
async fn an_absolute_form_target_naming_another_host_than_host_is_400() {
    // RFC 9112 §3.2.2: the target's authority wins over Host; a backend that routes by Host
    // would serve another virtual host than the one the request line names, so refuse both.
    let w = World::start().await;
    for target in [
        "http://other.example/v1/datasets/ds_1",
        "http://127.0.0.1:1/v1/datasets/ds_1",
    ] {
        refused(&w, &raw_get(target, Some(&w.viewer)), &[400]).await;
    }
}

#[tokio::test]
async fn two_host_headers_are_400() {
    let w = World::start().await;
    let bytes = format!(
        "GET /v1/datasets/ds_1 HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: internal.admin\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        w.viewer.key
    );
    refused(&w, bytes.as_bytes(), &[400]).await;
    let bytes = format!(
        "GET /v1/datasets/ds_1 HTTP/1.1\r\nHost: bad host\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        w.viewer.key
    );
    refused(&w, bytes.as_bytes(), &[400]).await;
}

#[tokio::test]
async fn asterisk_form_is_not_forwarded() {
    let w = World::start().await;
    refused(
        &w,
        &raw_request("OPTIONS", b"*", Some(&w.viewer)),
        &[400, 403, 405],
    )
    .await;
}

#[tokio::test]
async fn a_tab_in_the_request_line_is_refused() {
    let w = World::start().await;
    // A tab instead of the space before the version (the rest becomes a junk header).
    refused(
        &w,
        &raw_request("GET", b"/v1/admin/x\tHTTP/1.1\r\nX:", Some(&w.viewer)),
        &[400, 403],
    )
    .await;
    let mut bytes = b"GET\t/v1/admin/x HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
    bytes.extend_from_slice(
        format!(
            "Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
            w.viewer.key
        )
        .as_bytes(),
    );
    refused(&w, &bytes, &[400, 403]).await;
    refused(
        &w,
        &raw_request("GET", b"/v1/public/x\t/../../admin/x", Some(&w.viewer)),
        &[400, 403],
    )
    .await;
}

#[tokio::test]
async fn a_fragment_in_the_target_never_changes_the_decision() {
    let w = World::start().await;
    refused(
        &w,
        &raw_get("/v1/admin/x#/../../v1/public/y", Some(&w.viewer)),
        &[400, 403],
    )
    .await;
    let reply = w.raw(&raw_get("/v1/public/x#/../../admin/x", None)).await;
    assert!(
        [200, 400].contains(&reply.status()),
        "{}",
        lossy(&reply.bytes)
    );
    for r in w.backend.requests() {
        assert_eq!(
            r.target, "/v1/public/x",
            "fragment leaked into the forwarded target"
        );
    }
}

#[tokio::test]
async fn a_query_with_dot_dot_is_forwarded_unchanged_and_ignored() {
    let w = World::start().await;
    refused(
        &w,
        &raw_get("/v1/admin/x?/../../v1/public/y", Some(&w.viewer)),
        &[403],
    )
    .await;
    forwarded_as(
        &w,
        &raw_get("/v1/public/x?/../../admin/x", None),
        "/v1/public/x?/../../admin/x",
    )
    .await;
}

#[tokio::test]
async fn head_does_not_reach_a_write_only_route() {
    let w = World::start().await;
    refused(
        &w,
        &raw_request("HEAD", b"/v1/jobs/j1/cancel", Some(&w.editor)),
        &[403],
    )
    .await;
    refused(
        &w,
        &raw_request("HEAD", b"/v1/jobs/j1/cancel", Some(&w.viewer)),
        &[403],
    )
    .await;
}

#[tokio::test]
async fn an_overlong_path_is_refused_or_denied() {
    let w = World::start().await;
    let climb = format!("/v1/public/{}v1/admin/x", "../".repeat(3000));
    refused(&w, &raw_get(&climb, Some(&w.viewer)), &[400, 403, 414, 431]).await;
    let long = format!("/v1/admin/{}", "a".repeat(70_000));
    refused(&w, &raw_get(&long, Some(&w.viewer)), &[400, 403, 414, 431]).await;
}

// --- request smuggling ---------------------------------------------------------------------

/// A request the viewer may not make, to hide inside another request's body.
fn smuggled(w: &World) -> String {
    format!(
        "GET /v1/admin/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
        w.viewer.key
    )
}

/// After a smuggling attempt: at most the one legitimate POST reached the backend.
fn assert_nothing_smuggled(w: &World) {
    let seen = w.backend.requests();
    assert!(
        seen.len() <= 1,
        "backend got more than one request: {:?}",
        w.backend.targets()
    );
    for r in &seen {
        assert_eq!(
            (r.method.as_str(), r.path()),
            ("POST", "/v1/public/upload"),
            "smuggled request reached the backend"
        );
    }
    assert_backend_clean(&w.backend);
}

#[tokio::test]
async fn cl_te_smuggling_does_not_reach_the_backend() {
    let w = World::start().await;
    let body = format!("0\r\n\r\n{}", smuggled(&w));
    let req = format!(
        "POST /v1/public/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let reply = w.raw(req.as_bytes()).await;
    assert!(
        matches!(reply.status(), 200 | 400),
        "{}",
        lossy(&reply.bytes)
    );
    assert_nothing_smuggled(&w);
}

#[tokio::test]
async fn te_cl_smuggling_does_not_reach_the_backend() {
    let w = World::start().await;
    let inner = smuggled(&w);
    let req = format!(
        "POST /v1/public/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
        inner.len()
    );
    let reply = w.raw(req.as_bytes()).await;
    assert!(
        matches!(reply.status(), 200 | 400),
        "{}",
        lossy(&reply.bytes)
    );
    assert_nothing_smuggled(&w);
}

#[tokio::test]
async fn two_content_lengths_are_400() {
    let w = World::start().await;
    let body = smuggled(&w);
    let req = format!(
        "POST /v1/public/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    refused(&w, req.as_bytes(), &[400]).await;
    assert_nothing_smuggled(&w);
}

#[tokio::test]
async fn obfuscated_transfer_encodings_are_400() {
    let w = World::start().await;
    let body = format!("0\r\n\r\n{}", smuggled(&w));
    for te in [
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding\t: chunked",
    ] {
        let req = format!(
            "POST /v1/public/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n{te}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        refused(&w, req.as_bytes(), &[400]).await;
    }
    assert_nothing_smuggled(&w);
}

#[tokio::test]
async fn a_pipelined_second_request_is_judged_on_its_own() {
    let w = World::start().await;
    let first =
        "POST /v1/public/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello";
    let req = format!("{first}{}", smuggled(&w));
    let reply = w.raw(req.as_bytes()).await;
    assert_eq!(
        reply.statuses().first(),
        Some(&200),
        "{}",
        lossy(&reply.bytes)
    );
    assert!(
        reply.statuses().get(1).is_none_or(|s| *s == 403),
        "second answer {:?}",
        reply.statuses()
    );
    assert_nothing_smuggled(&w);
    assert_eq!(&w.backend.single().body[..], b"hello");
}
