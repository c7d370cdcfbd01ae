//! The control socket (`<data dir>/control.sock`): how `ferry volume …` commands reach a running
//! volume service. JSON lines: one request per connection, answered by zero or more progress
//! lines and one final line. Bounded: a request line longer than `MAX_LINE` is refused.
//!
//! This module only moves requests and answers; what they do is `Registry`'s and `Admin`'s.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum ControlRequest {
    Ping,
    List,
    Create {
        name: String,
        size: u64,
        granularity: u64,
    },
    Delete {
        name: String,
    },
    Dirty {
        name: String,
    },
    Cut {
        names: Vec<String>,
    },
    Stats,
    Import {
        name: String,
        source: String,
        size: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    ReplicateStart {
        volumes: Vec<String>,
        to: String,
        /// The target site's node holding the replicas (none: the site's one volume service).
        #[serde(default)]
        to_node: Option<String>,
        mode: String,
        interval_ms: u64,
        rate: Option<u64>,
        level: Option<i32>,
        /// Sync pairs: `block` or `suspend` (the default) when the target is unreachable.
        #[serde(default)]
        on_loss: Option<String>,
        /// Sync pairs with `block`: how long a write waits for the target before EIO.
        #[serde(default)]
        block_timeout_ms: Option<u64>,
        /// Complete generations the target keeps as recovery points (the last one included).
        #[serde(default)]
        recovery_points: Option<usize>,
        /// Replicate back to the site these volumes were promoted from.
        #[serde(default)]
        reverse: Option<bool>,
        /// Largest message on the wire (bytes); never above the NATS server's `max_payload`.
        #[serde(default)]
        max_message: Option<usize>,
        /// Recovery points older than this are dropped at the target (ms; none: by count).
        #[serde(default)]
        points_max_age_ms: Option<u64>,
        /// `false`: cut only on `replicateCut` (the orchestrator's quiesce/capture cycle).
        #[serde(default)]
        scheduled: Option<bool>,
    },
    ReplicateStatus,
    ReplicateSync {
        volumes: Vec<String>,
        /// The pair's target site, when the volumes replicate to several.
        #[serde(default)]
        to: Option<String>,
    },
    /// Cut the group now; answered once the cut is taken, while it ships.
    ReplicateCut {
        volumes: Vec<String>,
        /// The pair's target site, when the volumes replicate to several.
        #[serde(default)]
        to: Option<String>,
    },
    ReplicateStop {
        volumes: Vec<String>,
        /// The pair's target site, when the volumes replicate to several.
        #[serde(default)]
        to: Option<String>,
    },
    /// At a target: make replicas writable at their last complete generation.
    ReplicatePromote {
        volumes: Vec<String>,
        /// Go back this many recovery points first (0 or none: the last complete generation).
        #[serde(default)]
        back: Option<usize>,
    },
    /// A target site's replicas: their recovery points.
    ReplicaPoints {
        volumes: Vec<String>,
    },
    /// Raise (`fenced: true`) or lift the fence of a planned migration or failback on ordinary
    /// volumes: while raised, client writes are refused (see `Volume::set_fenced`).
    Fence {
        volumes: Vec<String>,
        fenced: bool,
    },
    /// At a target: new writable volumes `names[i]` holding replica `volumes[i]` at recovery
    /// point `back`, while replication goes on (see `replica_clone`).
    ReplicaClone {
        volumes: Vec<String>,
        #[serde(default)]
        back: Option<usize>,
        names: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// One line from the service: progress, or the final answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ControlLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl ControlLine {
    fn answer(r: Result<Value>) -> ControlLine {
        match r {
            Ok(v) => ControlLine {
                progress: None,
                ok: Some(true),
                result: Some(v),
                code: None,
                message: None,
            },
            Err(e) => ControlLine {
                progress: None,
                ok: Some(false),
                result: None,
                code: Some(e.code().to_string()),
                message: Some(e.to_string()),
            },
        }
    }
}

/// Executes control requests inside the service.
pub trait ControlHandler: Send + Sync + 'static {
    /// Run `req`; may call `progress` any number of times before returning.
    fn handle(
        &self,
        req: ControlRequest,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Value>;
}

/// Serve the control socket until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::UnixListener,
    handler: Arc<dyn ControlHandler>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let h = handler.clone();
                tokio::spawn(async move { let _ = serve_one(stream, h).await; });
            }
        }
    }
}

async fn serve_one(
    stream: tokio::net::UnixStream,
    handler: Arc<dyn ControlHandler>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let n = tokio::io::BufReader::new(r.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    let req: std::result::Result<ControlRequest, String> = if n == 0 || !line.ends_with('\n') {
        Err(format!(
            "request line missing or longer than {MAX_LINE} bytes"
        ))
    } else {
        serde_json::from_str(&line).map_err(|e| format!("malformed control request: {e}"))
    };
    let req = match req {
        Ok(r) => r,
        Err(why) => {
            let a = ControlLine::answer(Err(Error::InvalidArgument(why)));
            return write_line(&mut w, &a).await;
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ControlLine>();
    let progress_tx = tx.clone();
    let job = tokio::task::spawn_blocking(move || {
        let progress = move |p: Progress| {
            let _ = progress_tx.send(ControlLine {
                progress: Some(p),
                ok: None,
                result: None,
                code: None,
                message: None,
            });
        };
        let answer = ControlLine::answer(handler.handle(req, &progress));
        let _ = tx.send(answer);
    });
    while let Some(l) = rx.recv().await {
        let last = l.ok.is_some();
        write_line(&mut w, &l).await?;
        if last {
            break;
        }
    }
    let _ = job.await;
    Ok(())
}

async fn write_line(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    l: &ControlLine,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(l).expect("control line serializes");
    bytes.push(b'\n');
    w.write_all(&bytes).await
}

/// Client side, blocking (called from worker threads, never from the JS event loop).
pub struct ControlClient {
    path: PathBuf,
    dir: PathBuf,
}

impl ControlClient {
    /// `Some` when a service answers on the data directory's control socket.
    pub fn connect(socket: &Path, data_dir: &Path) -> Option<ControlClient> {
        let c = ControlClient {
            path: socket.to_path_buf(),
            dir: data_dir.to_path_buf(),
        };
        c.request(&ControlRequest::Ping, &|_| {}).ok().map(|_| c)
    }

    pub fn request(&self, req: &ControlRequest, on_progress: &dyn Fn(Progress)) -> Result<Value> {
        let unreachable = |why: String| Error::Service {
            dir: self.dir.clone(),
            why,
        };
        let mut s = std::os::unix::net::UnixStream::connect(&self.path)
            .map_err(|e| unreachable(e.to_string()))?;
        let mut bytes = serde_json::to_vec(req).expect("request serializes");
        bytes.push(b'\n');
        s.write_all(&bytes)
            .map_err(|e| unreachable(e.to_string()))?;
        let mut reader = BufReader::new(s);
        loop {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .map_err(|e| unreachable(e.to_string()))?;
            if n == 0 {
                return Err(unreachable(
                    "the service closed the control connection without answering".into(),
                ));
            }
            let l: ControlLine = serde_json::from_str(&line)
                .map_err(|e| unreachable(format!("malformed answer: {e}")))?;
            if let Some(p) = l.progress {
                on_progress(p);
                continue;
            }
            return match l.ok {
                Some(true) => Ok(l.result.unwrap_or(Value::Null)),
                _ => Err(Error::Remote {
                    code: l.code.unwrap_or_else(|| "ERR_SERVICE".into()),
                    message: l
                        .message
                        .unwrap_or_else(|| "the service reported an unspecified error".into()),
                }),
            };
        }
    }
}

/// Bind the control socket, replacing a stale socket file nobody listens on.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path).map_err(|e| Error::Listen {
        addr: path.display().to_string(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_stable_json() {
        let r = ControlRequest::Cut {
            names: vec!["a".into()],
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"cut","names":["a"]}"#
        );
        let back: ControlRequest = serde_json::from_str(r#"{"op":"dirty","name":"x"}"#).unwrap();
        assert!(matches!(back, ControlRequest::Dirty { name } if name == "x"));
    }
}
