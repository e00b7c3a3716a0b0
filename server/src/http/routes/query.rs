//! Query-string parameters shared by the routes: imageio's `y`/`n` flags
//! and unsigned integers, each refused with a message naming the parameter.

use std::collections::HashMap;

use crate::error::ApiError;

/// The query parameters of a request.
pub type Params = HashMap<String, String>;

/// A `y`/`n` flag, `default` when absent.
pub fn flag(params: &Params, name: &str, default: bool) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None => Ok(default),
        Some("y") => Ok(true),
        Some("n") => Ok(false),
        Some(other) => Err(ApiError::BadRequest(format!("invalid {name}={other:?}: expected {name}=y or {name}=n"))),
    }
}

/// An unsigned integer parameter, if present.
pub fn number(params: &Params, name: &str) -> Result<Option<u64>, ApiError> {
    params
        .get(name)
        .map(|value| {
            value.parse::<u64>().map_err(|_| ApiError::BadRequest(format!("invalid {name}={value:?}: expected a non-negative integer")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_numbers() {
        let params: Params = [("flush", "n"), ("start", "42"), ("bad", "-1"), ("close", "yes")].map(|(k, v)| (k.into(), v.into())).into();
        assert!(!flag(&params, "flush", true).unwrap());
        assert!(flag(&params, "absent", true).unwrap());
        assert!(flag(&params, "close", false).unwrap_err().to_string().contains("close"));
        assert_eq!(number(&params, "start").unwrap(), Some(42));
        assert!(number(&params, "bad").unwrap_err().to_string().contains("bad"));
    }
}
