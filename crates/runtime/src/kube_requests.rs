//! Counts the manager's own requests to the API server
//! (`stateward_kube_requests_total{verb,resource,code}`), as a layer on the kube client, so
//! an operator's API cost is visible without access to the API server's audit log.
//!
//! The verbs are the API server's own (`get`, `list`, `watch`, `create`, `update`, `patch`,
//! `apply`, `delete`, `deletecollection`), derived from the method, the path and the query
//! the same way the API server's request-info resolver does, so the figures line up with
//! its audit log and `apiserver_request_total`.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    /// `resource` or `resource/subresource` (`statefulapps/status`, `pods/exec`); the
    /// group is left out (Stateward's kinds do not collide across groups).
    pub resource: String,
    /// The HTTP status code, or `error` when no response came back.
    pub code: String,
}

/// What the API server would call this request: `(verb, resource)`. Paths that are not
/// resource requests (`/version`, `/apis`, discovery) are `("get", "nonresource")`.
pub fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
) -> (&'static str, String) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[][..],
    };
    // namespaces/<ns>/<resource>... is namespaced, unless it is the namespace itself.
    let rest = match rest {
        ["namespaces", _ns, resource, tail @ ..] => {
            let mut parts = vec![*resource];
            parts.extend_from_slice(tail);
            parts
        }
        other => other.to_vec(),
    };
    let (resource, named) = match rest.as_slice() {
        [] => return ("get", "nonresource".into()),
        [resource] => ((*resource).to_string(), false),
        [resource, _name] => ((*resource).to_string(), true),
        [resource, _name, subresource, ..] => (format!("{resource}/{subresource}"), true),
    };
    let watching = query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    });
    let verb = match *method {
        Method::GET if watching => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH if content_type.is_some_and(|c| c.starts_with("application/apply-patch")) => {
            "apply"
        }
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb, resource)
}

/// The counter family, registered once per process.
#[derive(Clone)]
pub struct RequestCounter {
    requests: Family<RequestLabels, Counter>,
}

impl RequestCounter {
    pub fn register(metrics: &Metrics) -> Self {
        let requests = Family::default();
        metrics.register(
            "kube_requests",
            "Requests this process sent to the Kubernetes API server, by verb, resource and response code",
            requests.clone(),
        );
        Self { requests }
    }

    /// The layer to put on the kube client (`ClientBuilder::with_layer`).
    pub fn layer(&self) -> CountLayer {
        CountLayer {
            requests: Arc::new(self.requests.clone()),
        }
    }
}

#[derive(Clone)]
pub struct CountLayer {
    requests: Arc<Family<RequestLabels, Counter>>,
}

impl<S> tower_layer::Layer<S> for CountLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            requests: self.requests.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    requests: Arc<Family<RequestLabels, Counter>>,
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for Counted<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (verb, resource) = classify(
            request.method(),
            request.uri().path(),
            request.uri().query(),
            content_type,
        );
        let requests = self.requests.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            requests
                .get_or_create(&RequestLabels {
                    verb: verb.to_string(),
                    resource,
                    code,
                })
                .inc();
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_as_the_api_server_names_them() {
        let apply = Some("application/apply-patch+yaml");
        let merge = Some("application/merge-patch+json");
        // (method, path, query, content type, verb, resource)
        type Row<'a> = (
            Method,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            &'a str,
        );
        let rows: [Row; 16] = [
            (
                Method::GET,
                "/api/v1/namespaces/a/pods",
                None,
                None,
                "list",
                "pods",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods",
                Some("labelSelector=x&watch=true&resourceVersion=1"),
                None,
                "watch",
                "pods",
            ),
            (
                Method::GET,
                "/api/v1/pods",
                Some("watch=1"),
                None,
                "watch",
                "pods",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods/p",
                None,
                None,
                "get",
                "pods",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods/p/log",
                Some("container=c"),
                None,
                "get",
                "pods/log",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods/p/exec",
                Some("command=sh"),
                None,
                "get",
                "pods/exec",
            ),
            // The namespace object itself, and cluster-scoped kinds.
            (
                Method::GET,
                "/api/v1/namespaces/a",
                None,
                None,
                "get",
                "namespaces",
            ),
            (
                Method::GET,
                "/api/v1/namespaces",
                None,
                None,
                "list",
                "namespaces",
            ),
            (
                Method::GET,
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com",
                None,
                None,
                "get",
                "customresourcedefinitions",
            ),
            (
                Method::PATCH,
                "/apis/stateward.io/v1alpha1/namespaces/a/statefulapps/x/status",
                Some("fieldManager=stateward-scaling&force=true"),
                apply,
                "apply",
                "statefulapps/status",
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/a/statefulsets/x",
                None,
                merge,
                "patch",
                "statefulsets",
            ),
            (
                Method::POST,
                "/apis/batch/v1/namespaces/a/jobs",
                None,
                None,
                "create",
                "jobs",
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/a/leases/l",
                None,
                None,
                "update",
                "leases",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/persistentvolumeclaims/c",
                None,
                None,
                "delete",
                "persistentvolumeclaims",
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/pods",
                Some("labelSelector=x"),
                None,
                "deletecollection",
                "pods",
            ),
            (Method::GET, "/version", None, None, "get", "nonresource"),
        ];
        for (method, path, query, content_type, verb, resource) in rows {
            assert_eq!(
                classify(&method, path, query, content_type),
                (verb, resource.to_string()),
                "{method} {path}?{query:?}"
            );
        }
    }
}
