//! The control API of VM backups as the VM tests use it (curl on the
//! control socket), and what a backup may leave behind on the host.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::*;
use crate::vm_host::virsh;

/// A server with a control socket and VM backups on.
pub async fn vm_server(dir: &Path) -> (Server, Control) {
    start_with_control(dir, &["--libvirt"]).await
}

/// `POST /vms/{vm}/backups`: status and JSON body (or the error line).
pub fn begin(control: &Control, vm: &str, body: Value) -> (u16, Value) {
    let url = control.url(&format!("/vms/{vm}/backups"));
    let (code, text) = control.curl(&["-X", "POST", "-H", "Content-Type: application/json", "-d", &body.to_string(), &url]);
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub fn get_json(control: &Control, path: &str) -> (u16, Value) {
    let (code, text) = control.curl(&[&control.url(path)]);
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub fn delete(control: &Control, path: &str) -> (u16, String) {
    control.curl(&["-X", "DELETE", &control.url(path)])
}

pub fn end_backup(control: &Control, vm: &str, backup: &Value) {
    if let Some(id) = backup["id"].as_str() {
        delete(control, &format!("/vms/{vm}/backups/{id}"));
    }
}

/// Job directories in the state directory, and whether libvirt runs a
/// backup job for the domain.
pub fn leftovers(state_dir: &Path, vm: &str) -> (usize, bool) {
    let directories = std::fs::read_dir(state_dir.join("vm-backups")).map(|entries| entries.count()).unwrap_or(0);
    let job = virsh(&["domjobinfo", vm]).is_ok_and(|info| info.contains("Backup"));
    (directories, job)
}

pub fn checkpoint_ids(control: &Control, vm: &str) -> Vec<String> {
    let (code, list) = get_json(control, &format!("/vms/{vm}/checkpoints"));
    assert_eq!(code, 200, "{list}");
    list.as_array().unwrap().iter().map(|checkpoint| checkpoint["id"].as_str().unwrap().to_string()).collect()
}

pub fn blockgate(ca: &Path, args: &[&str]) -> Output {
    Command::new(binary("blockgate")).arg("--cacert").arg(ca).args(args).output().expect("run blockgate")
}

pub fn ok(output: Output) -> Output {
    assert!(output.status.success(), "blockgate failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}
