//! The control socket: a Unix socket (default `<state-dir>/control.sock`, mode
//! 0600) through which `patchbook trigger` asks the service to start a run. Control
//! never goes over TCP.
//!
//! Only the user running the service may use it. The file mode keeps other users
//! from connecting at all; the peer's uid, read from the kernel with `SO_PEERCRED`
//! (tokio's `peer_cred`), is checked on every connection as well, which also covers
//! the instant between `bind` and `chmod` and callers that ignore file modes (root).
//!
//! Protocol: one JSON request line, one JSON answer line.
//! `{"op":"trigger","playbook":"nightly","params":{"k":"v"}}` → `{"ok":true,"run":"…","generation":3}` (`params` optional);
//! `{"op":"status"}` → `{"ok":true,"status":{…}}`; refusals are `{"ok":false,"error":"…"}`.
//!
//! This module owns the socket and its protocol; it must not decide anything a
//! [`Service`] decides.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::launcher::Cause;
use super::service::Service;

/// The longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once. The control socket has its own budget, apart from
/// the status page's, so a flood of browsers never blocks `patchbook trigger`.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request line before it is dropped.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another `patchbook watch` is already listening on {path}; stop it first or pass a different --socket")]
    InUse { path: PathBuf },
    #[error("--socket {path} exists and is not a socket ({kind}); refusing to replace it. Pass a --socket path that does not exist, or move that file away")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on the control socket {path}: it is owner-only; run `patchbook trigger` as the user running `patchbook watch`")]
    Denied { path: PathBuf },
    #[error("no `patchbook watch` is listening on {path} ({source}); start it, or pass the --socket it uses")]
    NotListening {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control socket {path} answered badly: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Whether a peer may use the socket: only the service's own user.
pub fn peer_allowed(peer_uid: u32, owner_uid: u32) -> bool {
    peer_uid == owner_uid
}

/// The effective uid of this process.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Binds the socket at `path` with mode 0600. A stale socket file (nobody
/// listening) is replaced; a live one is an error. Anything that is not a
/// socket (a regular file, a directory, a symlink, even one to a socket) is
/// never removed: `--socket ./important.txt` must not cost the operator a file.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::FileTypeExt;
    // symlink_metadata: judge the path itself, not what a symlink points to.
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            let ft = meta.file_type();
            if !ft.is_socket() {
                let kind = if ft.is_symlink() {
                    "a symlink"
                } else if ft.is_dir() {
                    "a directory"
                } else if ft.is_file() {
                    "a regular file"
                } else {
                    "a special file"
                };
                return Err(ControlError::NotASocket {
                    path: path.to_path_buf(),
                    kind,
                });
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ControlError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ControlError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Usually the state dir: it must come out 0700 like everything in it.
        crate::journal::private::create_dir_all(parent).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Accepts connections until the service stops.
pub async fn serve(listener: UnixListener, service: Arc<Service>) {
    let owner = own_uid();
    let budget = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take a slot before accepting: over budget, connections wait in the
        // kernel's backlog instead of costing this process a descriptor each.
        let Ok(permit) = budget.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on accept.
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, service, owner)).await;
        });
    }
}

async fn answer(stream: UnixStream, service: Arc<Service>, owner: u32) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    if !peer_allowed(peer.uid(), owner) {
        tracing::warn!(peer_uid = peer.uid(), "control socket: connection refused");
        let reply = json!({"ok": false, "error": format!(
            "refused: the control socket is owner-only (peer uid {}, service uid {owner})", peer.uid())});
        write.write_all(format!("{reply}\n").as_bytes()).await?;
        return write.shutdown().await;
    }
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Value>(&line) {
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        Ok(req) => handle(&service, &req),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await?;
    write.shutdown().await
}

fn handle(service: &Arc<Service>, req: &Value) -> Value {
    match req.get("op").and_then(Value::as_str) {
        Some("trigger") => {
            let Some(name) = req.get("playbook").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "trigger needs a playbook name"});
            };
            let params = match trigger_params(req) {
                Ok(p) => p,
                Err(e) => return json!({"ok": false, "error": e}),
            };
            match service.trigger_with(name, Cause::Trigger, params) {
                Ok(run) => json!({
                    "ok": true,
                    "run": run,
                    "generation": service.live().map(|g| g.number),
                }),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some("status") => json!({"ok": true, "status": service.status()}),
        _ => {
            json!({"ok": false, "error": "unknown op; use {\"op\":\"trigger\",\"playbook\":NAME} or {\"op\":\"status\"}"})
        }
    }
}

/// The request's `params` object: names to string values, as `--param` gives them.
fn trigger_params(req: &Value) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    match req.get("params") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Some(v) = v.as_str() else {
                    return Err(format!("trigger: param `{k}` must be a string"));
                };
                out.insert(k.clone(), v.to_string());
            }
        }
        Some(_) => return Err("trigger: `params` must be an object of strings".into()),
    }
    Ok(out)
}

use tokio::io::AsyncReadExt as _;

/// Sends one request and returns the answer (blocking; for the `trigger` verb).
pub fn request(path: &Path, req: &Value) -> Result<Value, ControlError> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::Denied {
                path: path.to_path_buf(),
            }
        } else {
            ControlError::NotListening {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    let protocol = |message: String| ControlError::Protocol {
        path: path.to_path_buf(),
        message,
    };
    // A refused peer is answered before it sends anything; a failed write then is
    // not the whole story, so read the answer either way.
    let _ = stream.write_all(format!("{req}\n").as_bytes());
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| protocol(e.to_string()))?;
    if line.trim().is_empty() {
        return Err(protocol("the connection closed without an answer".into()));
    }
    serde_json::from_str(&line).map_err(|e| protocol(e.to_string()))
}
