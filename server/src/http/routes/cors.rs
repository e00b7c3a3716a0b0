//! CORS for browser consoles, as imageio answers it. tower-http's layer
//! treats every OPTIONS as a preflight, which would swallow imageio's own
//! `OPTIONS /images/{ticket}`; here only an OPTIONS with both `Origin` and
//! `Access-Control-Request-Method` is a preflight, and every other request
//! that carries `Origin` gets `Access-Control-Allow-Origin: *` and the
//! headers a page may read.

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Preflight results may be cached for a day.
const MAX_AGE: &str = "86400";
/// Response headers a page may read.
const EXPOSED: &str = "Content-Range, Content-Length, Accept-Ranges";

/// The CORS middleware.
pub async fn cors(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let has_origin = headers.contains_key(header::ORIGIN);
    if request.method() == Method::OPTIONS && has_origin {
        if let Some(method) = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD).cloned() {
            let asked_headers = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
            let mut response = StatusCode::NO_CONTENT.into_response();
            let out = response.headers_mut();
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, method);
            if let Some(asked_headers) = asked_headers {
                out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked_headers);
            }
            out.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
            return response;
        }
    }
    let mut response = next.run(request).await;
    if has_origin {
        let out = response.headers_mut();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
    }
    response
}
