//! JSON answers as one line of text: the serialized value and a newline,
//! so `curl` output ends its line and line-oriented tools read it whole.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A JSON body ending with a newline.
pub struct JsonLine<T>(pub T);

impl<T: Serialize> IntoResponse for JsonLine<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
            }
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {error}\n")).into_response(),
        }
    }
}
