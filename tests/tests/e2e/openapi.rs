//! `openapi/openapi.yaml` and `openapi/control.yaml` and the running
//! server describe the same APIs: every path and method of a spec is
//! served (neither 404 nor 405), and every other method on those paths is
//! a 405 whose `Allow` lists exactly the documented ones.

use std::collections::BTreeMap;
use std::process::Command;

use reqwest::{Method, StatusCode};
use serde_yaml::Value;

use crate::common::*;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"];

fn spec_routes() -> BTreeMap<String, Vec<String>> {
    routes_of(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.yaml"))
}

fn routes_of(path: &str) -> BTreeMap<String, Vec<String>> {
    let spec: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut routes = BTreeMap::new();
    for (path, item) in spec["paths"].as_mapping().unwrap() {
        let methods =
            item.as_mapping().unwrap().keys().filter_map(Value::as_str).filter(|key| *key != "parameters").map(str::to_uppercase).collect();
        routes.insert(path.as_str().unwrap().to_string(), methods);
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_and_the_router_agree() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[format!("demo={}/demo.qcow2,size=16M", dir.path().display())]).await;
    let client = server.client();
    let routes = spec_routes();
    assert!(routes.len() >= 4, "{routes:?}");
    let made = client.post(server.url("/images/demo/checkpoints")).json(&serde_json::json!({"id": "spec"})).send().await.unwrap();
    assert_eq!(made.status(), StatusCode::CREATED);
    for (path, methods) in &routes {
        let url = server.url(&path.replace("{ticket}", "demo").replace("{id}", "spec"));
        for method in methods {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let body = if method == Method::PATCH { r#"{"op":"flush"}"# } else { "" };
            let response = client.request(method.clone(), &url).body(body).send().await.unwrap();
            assert!(response.status().is_success(), "{method} {path} is in the spec but answers {}", response.status());
        }
        // `/images/*` is the `{ticket}` route with ticket `*`; its other
        // methods belong to that route.
        if path == "/images/*" {
            continue;
        }
        for method in METHODS.iter().filter(|m| !methods.contains(&m.to_string())) {
            let response = client.request(Method::from_bytes(method.as_bytes()).unwrap(), &url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is not in the spec");
            let allow = response.headers()["allow"].to_str().unwrap().to_string();
            for documented in methods {
                assert!(allow.contains(documented.as_str()), "{path}: Allow {allow:?} lacks {documented}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_spec_and_the_control_router_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, control) = start_with_control(dir.path(), &[]).await;
    let routes = routes_of(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/control.yaml"));
    assert!(routes.len() >= 8, "{routes:?}");
    for (path, methods) in &routes {
        let url = control.url(&path.replace("{id}", "x1").replace("{vm}", "vm1"));
        for method in methods {
            let (code, said) = control.curl(&["-X", method, "-d", "{}", &url]);
            assert!(code != 405 && !said.contains("no route"), "{method} {path} is in control.yaml but answers {code} {said}");
        }
        for method in METHODS.iter().filter(|m| !methods.contains(&m.to_string())) {
            let output = Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-D", "-", "--unix-socket"])
                .arg(&control.socket)
                .args(["-X", method, &url])
                .output()
                .unwrap();
            let head = String::from_utf8_lossy(&output.stdout).to_lowercase();
            assert!(head.starts_with("http/1.1 405"), "{method} {path} is not in control.yaml: {head}");
            let allow: Vec<String> = head
                .lines()
                .find_map(|line| line.strip_prefix("allow: "))
                .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow: {head}"))
                .trim()
                .split(',')
                .map(|method| method.trim().to_uppercase())
                .collect();
            let mut documented = methods.clone();
            documented.sort();
            let mut allowed = allow.clone();
            allowed.sort();
            assert_eq!(allowed, documented, "{method} {path}: Allow {allow:?}");
        }
    }
}
