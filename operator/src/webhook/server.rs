//! The HTTPS server of the webhook: `POST /mutate-v1-pod` (AdmissionReview
//! v1 in, AdmissionReview with a JSON patch out) and `GET /healthz`, over
//! rustls with the certificate of [`CertStore`] (swapped without restart).
//!
//! Failure rules: a body that is not an AdmissionReview gets a 400 that says
//! so; a body over the limit a 413; anything else (wrong kind, an unreadable
//! pod, an error or panic while building the patch) is allowed unchanged
//! with an admission warning, so the pod is never broken by the webhook.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store};
use rm_crds::labels;
use tokio_rustls::TlsAcceptor;

use super::certs::CertStore;
use super::inject::{Decision, InjectConfig, plan};

/// Path the MutatingWebhookConfiguration points at.
pub const PATH: &str = "/mutate-v1-pod";
/// Default limit of a request body: above the apiserver's own request limit
/// (3 MiB), so a real pod never hits it.
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct WebhookState {
    pub inject: Arc<InjectConfig>,
    /// Namespaces' metadata, for the namespace opt-in annotation; `None`
    /// when there is no cluster (benchmarks, unit tests).
    pub namespaces: Option<Store<PartialObjectMeta<Namespace>>>,
}

impl WebhookState {
    fn namespace_opt_in(&self, namespace: Option<&str>) -> bool {
        let (Some(store), Some(ns)) = (&self.namespaces, namespace) else {
            return false;
        };
        store
            .get(&ObjectRef::new(ns))
            .and_then(|n| {
                n.metadata
                    .annotations
                    .as_ref()?
                    .get(labels::INJECT)
                    .cloned()
            })
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }
}

/// The answer to one request body: HTTP status and body. Pure apart from
/// the namespace cache; used by the server, the benchmark and the property test.
pub fn review(state: &WebhookState, body: &[u8]) -> (StatusCode, Vec<u8>) {
    let req: AdmissionRequest<Pod> = match serde_json::from_slice::<AdmissionReview<Pod>>(body) {
        Ok(r) => match r.try_into() {
            Ok(req) => req,
            Err(_) => return bad_request("the AdmissionReview has no request"),
        },
        // Not readable as a pod review: answer for the request if there is
        // one (allowed, with a warning), else it is not an AdmissionReview.
        Err(pod_err) => {
            return match serde_json::from_slice::<AdmissionReview<DynamicObject>>(body)
                .ok()
                .and_then(|r| r.request)
            {
                Some(req) => respond(allowed_with_warning(
                    AdmissionResponse::from(&req),
                    format!(
                        "rm-abstract: the object is not a readable pod ({pod_err}); not injected"
                    ),
                )),
                None => bad_request(&format!(
                    "the body is not an admission.k8s.io/v1 AdmissionReview with a request: {pod_err}"
                )),
            };
        }
    };
    let response = AdmissionResponse::from(&req);
    if req.kind.kind != "Pod" || req.resource.resource != "pods" {
        let what = format!("{}/{}", req.kind.group, req.kind.kind);
        return respond(allowed_with_warning(
            response,
            format!("rm-abstract: this webhook handles pods, not {what}; allowed unchanged"),
        ));
    }
    if req.operation != Operation::Create || req.sub_resource.is_some() {
        return respond(response);
    }
    let Some(pod) = req.object.as_ref() else {
        return respond(allowed_with_warning(
            response,
            "rm-abstract: the review has no pod; not injected".into(),
        ));
    };
    let opt_in = state.namespace_opt_in(req.namespace.as_deref());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        plan(pod, opt_in, &state.inject)
    }));
    let pod_name = pod
        .metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or("");
    let namespace = req.namespace.as_deref().unwrap_or("");
    match outcome {
        Ok(Ok(Decision::Skip(reason))) => {
            tracing::debug!(namespace, pod = pod_name, reason, "not injected");
            respond(response)
        }
        Ok(Ok(Decision::Inject {
            patch,
            containers,
            warnings,
        })) => match response.clone().with_patch(patch) {
            Ok(mut r) => {
                tracing::debug!(namespace, pod = pod_name, ?containers, "injected");
                if !warnings.is_empty() {
                    r.warnings = Some(warnings);
                }
                respond(r)
            }
            Err(e) => respond(allowed_with_warning(
                response,
                format!("rm-abstract: internal error, patch not serializable ({e}); not injected"),
            )),
        },
        Ok(Err(e)) => {
            tracing::info!(namespace, pod = pod_name, error = %e, "not injected");
            respond(allowed_with_warning(
                response,
                format!("rm-abstract: not injected: {e}"),
            ))
        }
        Err(_) => {
            tracing::error!(
                namespace,
                pod = pod_name,
                "injection panicked; pod allowed unchanged"
            );
            respond(allowed_with_warning(
                response,
                "rm-abstract: internal error while building the injection; not injected".into(),
            ))
        }
    }
}

fn allowed_with_warning(mut r: AdmissionResponse, warning: String) -> AdmissionResponse {
    r.allowed = true;
    r.warnings.get_or_insert_with(Vec::new).push(warning);
    r
}

fn respond(r: AdmissionResponse) -> (StatusCode, Vec<u8>) {
    match serde_json::to_vec(&r.into_review()) {
        Ok(body) => (StatusCode::OK, body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialize the AdmissionReview: {e}").into_bytes(),
        ),
    }
}

fn bad_request(msg: &str) -> (StatusCode, Vec<u8>) {
    (StatusCode::BAD_REQUEST, msg.as_bytes().to_vec())
}

pub fn router(state: WebhookState, max_body: usize) -> Router {
    Router::new()
        .route(PATH, post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn mutate(State(state): State<WebhookState>, body: Bytes) -> impl IntoResponse {
    let (status, body) = review(&state, &body);
    let content_type = if status == StatusCode::OK {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    (status, [("content-type", content_type)], body)
}

/// The rustls configuration serving the certificate of `certs`.
pub fn tls_config(certs: Arc<CertStore>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let svc = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn state() -> WebhookState {
        WebhookState {
            inject: Arc::new(InjectConfig::default()),
            namespaces: None,
        }
    }

    pub(crate) fn review_body(
        kind: &str,
        resource: &str,
        operation: &str,
        object: Value,
    ) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0d9b7e0c-1111-2222-3333-444455556666",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": resource},
                "namespace": "ns",
                "operation": operation,
                "userInfo": {"username": "tester"},
                "object": object,
                "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn response(body: &[u8]) -> Value {
        serde_json::from_slice::<Value>(body).unwrap()["response"].clone()
    }

    fn injectable_pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "annotations": {"rm-abstract.io/inject": "true"}},
            "spec": {"containers": [{"name": "app", "image": "python:3.12"}]}})
    }

    #[test]
    fn pod_create_is_answered_with_a_json_patch_and_the_request_uid() {
        let (status, body) = review(
            &state(),
            &review_body("Pod", "pods", "CREATE", injectable_pod()),
        );
        assert_eq!(status, StatusCode::OK);
        let r = response(&body);
        assert_eq!(r["uid"], "0d9b7e0c-1111-2222-3333-444455556666");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        // kube serializes the patch as a JSON array of bytes, which the
        // apiserver's decoder accepts for `[]byte` like a base64 string.
        let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes(&r["patch"])).unwrap();
        assert!(!patch.0.is_empty());
    }

    #[test]
    fn not_selected_pod_is_allowed_without_patch() {
        let mut pod = injectable_pod();
        pod["metadata"]["annotations"] = json!({});
        let (status, body) = review(&state(), &review_body("Pod", "pods", "CREATE", pod));
        assert_eq!(status, StatusCode::OK);
        let r = response(&body);
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
    }

    #[test]
    fn wrong_kind_is_allowed_with_a_warning() {
        let (status, body) = review(
            &state(),
            &review_body(
                "ConfigMap",
                "configmaps",
                "CREATE",
                json!({"metadata": {"name": "c"}}),
            ),
        );
        assert_eq!(status, StatusCode::OK);
        let r = response(&body);
        assert_eq!(r["allowed"], true);
        assert!(r["warnings"][0].as_str().unwrap().contains("handles pods"));
    }

    #[test]
    fn unreadable_pod_is_allowed_with_a_warning() {
        let (status, body) = review(
            &state(),
            &review_body(
                "Pod",
                "pods",
                "CREATE",
                json!({"spec": {"containers": "not a list"}}),
            ),
        );
        assert_eq!(status, StatusCode::OK);
        let r = response(&body);
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
        assert!(
            r["warnings"][0]
                .as_str()
                .unwrap()
                .contains("not a readable pod")
        );
    }

    #[test]
    fn update_is_allowed_unchanged() {
        let (_, body) = review(
            &state(),
            &review_body("Pod", "pods", "UPDATE", injectable_pod()),
        );
        assert!(response(&body).get("patch").is_none());
    }

    #[test]
    fn malformed_bodies_are_400_with_a_message() {
        for body in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"kind\":\"AdmissionReview\"}",
            b"\xff\xfe",
        ] {
            let (status, msg) = review(&state(), body);
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert!(String::from_utf8_lossy(&msg).contains("AdmissionReview"));
        }
    }

    #[tokio::test]
    async fn huge_body_is_413() {
        use tower::ServiceExt;
        let router = router(state(), 1024);
        let req = axum::http::Request::post(PATH)
            .body(axum::body::Body::from(vec![b' '; 4096]))
            .unwrap();
        let resp = router.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes: a 200 (a well-formed review) or a 4xx, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (status, _) = review(&state(), &bytes);
            prop_assert!(status == StatusCode::OK || status.is_client_error());
        }

        /// Reviews with arbitrary pod-ish objects: always allowed, and any
        /// patch applies to the object that was sent.
        #[test]
        fn arbitrary_pods_are_allowed_and_patches_apply(
            names in proptest::collection::vec("[a-z][a-z0-9-]{0,8}", 0..4),
            inits in proptest::collection::vec("[a-z][a-z0-9-]{0,16}", 0..3),
            pythonpath in proptest::option::of("[a-z/:]{0,12}"),
            annotate in any::<bool>(),
            list in proptest::option::of("[a-z, ]{0,12}"),
            opts in proptest::option::of(".{0,16}"),
        ) {
            let containers: Vec<Value> = names.iter().map(|n| {
                let mut c = json!({"name": n});
                if let Some(p) = &pythonpath { c["env"] = json!([{"name": "PYTHONPATH", "value": p}]); }
                c
            }).collect();
            let mut annotations = serde_json::Map::new();
            if annotate { annotations.insert("rm-abstract.io/inject".into(), json!("true")); }
            if let Some(l) = &list { annotations.insert("rm-abstract.io/container-names".into(), json!(l)); }
            if let Some(o) = &opts { annotations.insert("rm-abstract.io/compile-options".into(), json!(o)); }
            let pod = json!({"metadata": {"name": "p", "annotations": annotations},
                "spec": {"containers": containers, "initContainers": inits.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()}});
            let (status, body) = review(&state(), &review_body("Pod", "pods", "CREATE", pod.clone()));
            prop_assert_eq!(status, StatusCode::OK);
            let r = response(&body);
            prop_assert_eq!(&r["allowed"], &json!(true));
            if r.get("patch").is_some() {
                let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes(&r["patch"])).unwrap();
                let mut out = pod;
                prop_assert!(json_patch::patch(&mut out, &patch).is_ok());
            }
        }
    }

    fn patch_bytes(v: &Value) -> Vec<u8> {
        serde_json::from_value::<Vec<u8>>(v.clone()).unwrap()
    }
}
