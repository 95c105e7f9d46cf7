//! The dashboard: a page the control plane serves at `/dashboard` that reads and changes
//! the fleet through the REST API with the operator's own token (the same authentication
//! and roles as every API call; the page itself holds no data). Proxies by region with
//! their version, ACK/NACK and health; per-route traffic and a search of the access records
//! proxies stream; the config with validation as it is typed and the
//! change against what is served before it is applied (optionally as a canary); history
//! with rollback; canary state and events.
//!
//! Its three files are compiled in and served with a content security policy that allows
//! nothing but themselves and the API.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// What a browser may load and run on the dashboard: its own files and the API, nothing
/// inline, no frames.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      connect-src 'self'; img-src 'self'; frame-ancestors 'none'; \
                      base-uri 'none'; form-action 'none'";

/// The dashboard's routes (public: they serve the same page to everyone).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/dashboard",
            get(|| async {
                file(
                    "text/html; charset=utf-8",
                    include_str!("dashboard/index.html"),
                )
            }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async {
                file(
                    "text/javascript; charset=utf-8",
                    include_str!("dashboard/app.js"),
                )
            }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async {
                file(
                    "text/css; charset=utf-8",
                    include_str!("dashboard/style.css"),
                )
            }),
        )
}

/// Whether a request is for one of the dashboard's files.
pub fn is_dashboard(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::GET
        && matches!(
            path,
            "/dashboard" | "/dashboard/app.js" | "/dashboard/style.css"
        )
}

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
