//! The node's kubelet endpoint (HTTPS): exec over WebSocket (`v5.channel.k8s.io`, with
//! `v4` as fallback), container logs and health. The API server proxies exec straight here
//! because the nodes declare `ExtendWebSocketsToKubelet`; a SPDY upgrade is refused and
//! recorded in `<state>/spdy-attempts.log` so tests can prove none happened.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::pods::PodContext;

const V5: &str = "v5.channel.k8s.io";
const V4: &str = "v4.channel.k8s.io";

pub async fn serve(
    ctx: Arc<PodContext>,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the kubelet endpoint {addr}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tracing::info!(%addr, "kubelet endpoint listening");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = service_fn(move |req| handle(ctx.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

/// A Kubernetes `Status` error body, which the API server relays to the client.
fn status_error(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "code": code.as_u16(),
    });
    let mut r = text(code, body.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    ctx: Arc<PodContext>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if upgrade.starts_with("spdy") {
        record_spdy(&ctx, &req);
        return Ok(status_error(
            StatusCode::BAD_REQUEST,
            "the stateward local node speaks WebSocket (v5.channel.k8s.io) only; SPDY was refused",
        ));
    }
    let response = match path
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["healthz"] => text(StatusCode::OK, "ok"),
        ["exec", ns, pod, container] => exec(ctx, req, ns, pod, Some(container)).await,
        ["exec", ns, pod] => exec(ctx, req, ns, pod, None).await,
        ["containerLogs", ns, pod, container] => logs(&ctx, &req, ns, pod, container),
        _ => status_error(
            StatusCode::NOT_FOUND,
            "the stateward local node serves exec, containerLogs and healthz only",
        ),
    };
    Ok(response)
}

fn record_spdy(ctx: &PodContext, req: &Request<Incoming>) {
    tracing::error!(uri = %req.uri(), "refused a SPDY upgrade");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.cfg.state_dir.join("spdy-attempts.log"))
    {
        let _ = writeln!(f, "{}", req.uri());
    }
}

fn logs(
    ctx: &PodContext,
    req: &Request<Incoming>,
    ns: &str,
    pod: &str,
    container: &str,
) -> Response<Full<Bytes>> {
    let Some(rt) = ctx.find(ns, pod) else {
        return status_error(
            StatusCode::NOT_FOUND,
            &format!("pod {ns}/{pod} not found on this node"),
        );
    };
    let path = ctx
        .cfg
        .state_dir
        .join("pods")
        .join(&rt.uid)
        .join(format!("{container}.log"));
    let Ok(body) = std::fs::read(&path) else {
        return status_error(
            StatusCode::NOT_FOUND,
            &format!("no logs for container {container}"),
        );
    };
    let params: HashMap<String, String> = query(req).into_iter().collect();
    let body = match params
        .get("tailLines")
        .and_then(|t| t.parse::<usize>().ok())
    {
        Some(n) => {
            let text = String::from_utf8_lossy(&body);
            let lines: Vec<&str> = text.lines().collect();
            let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
            out.push('\n');
            out.into_bytes()
        }
        None => body,
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

async fn exec(
    ctx: Arc<PodContext>,
    req: Request<Incoming>,
    ns: &str,
    pod: &str,
    container: Option<&str>,
) -> Response<Full<Bytes>> {
    let params = query(&req);
    let command: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let flag = |name: &str| {
        params
            .iter()
            .any(|(k, v)| k == name && (v == "1" || v == "true"))
    };
    let (stdin, stdout, stderr) = (flag("input"), flag("output"), flag("error"));
    if command.is_empty() {
        return status_error(StatusCode::BAD_REQUEST, "exec needs a command");
    }
    let Some(rt) = ctx.find(ns, pod) else {
        return status_error(
            StatusCode::NOT_FOUND,
            &format!("pod {ns}/{pod} not found on this node"),
        );
    };
    let target = match rt.exec_target(container) {
        Ok(t) => t,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let is_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.eq_ignore_ascii_case("websocket"))
        .unwrap_or(false);
    let Some(key) = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .filter(|_| is_ws)
    else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "exec needs a WebSocket upgrade (v5.channel.k8s.io)",
        );
    };
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    let protocol = if offered.iter().any(|p| p == V5) {
        V5
    } else if offered.iter().any(|p| p == V4) {
        V4
    } else {
        return status_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "no supported exec protocol offered ({offered:?}); the local node speaks {V5} and {V4}"
            ),
        );
    };

    let mut child = match target
        .command(&command)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(if stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(if stderr {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return status_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("starting the exec: {e}"),
            );
        }
    };

    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let io = match upgrade.await {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(error = %e, "exec upgrade failed");
                let _ = child.kill().await;
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
        if let Err(e) = pump(ws, child, protocol == V5).await {
            tracing::debug!(error = %e, "exec stream ended with an error");
        }
    });

    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        header::HeaderValue::from_static(if protocol == V5 { V5 } else { V4 }),
    );
    r
}

/// Moves bytes between the WebSocket channels and the exec'd process, then sends the
/// exit status on channel 3.
async fn pump<S>(ws: WebSocketStream<S>, mut child: tokio::process::Child, v5: bool) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(16);

    let mut readers = Vec::new();
    for (channel, pipe) in [
        (
            1u8,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
        (
            2u8,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match pipe.read(&mut buf[1..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf[0] = channel;
                if tx.send(Message::binary(buf[..=n].to_vec())).await.is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);

    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(msg).await.is_err() {
                return None;
            }
        }
        Some(sink)
    });

    // Client -> process stdin. Ends when the client closes stdin (v5) or the connection.
    let mut stdin = child.stdin.take();
    let stdin_task = tokio::spawn(async move {
        while let Some(Ok(msg)) = source.next().await {
            match msg {
                Message::Binary(data) if !data.is_empty() => match data[0] {
                    0 => {
                        if let Some(pipe) = stdin.as_mut()
                            && pipe.write_all(&data[1..]).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    255 if v5 && data.get(1) == Some(&0) => {
                        if let Some(mut pipe) = stdin.take() {
                            let _ = pipe.shutdown().await;
                        }
                    }
                    _ => {}
                },
                Message::Close(_) => return false,
                _ => {}
            }
        }
        false
    });

    let status = child.wait().await?;
    for r in readers {
        let _ = r.await;
    }
    stdin_task.abort();
    let Ok(Some(mut sink)) = writer.await else {
        return Ok(());
    };
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    let body = if code == 0 {
        serde_json::json!({ "metadata": {}, "status": "Success" })
    } else {
        serde_json::json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command, exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": { "causes": [{ "reason": "ExitCode", "message": code.to_string() }] },
        })
    };
    let mut frame = vec![3u8];
    frame.extend(body.to_string().into_bytes());
    sink.send(Message::binary(frame)).await?;
    // A kubelet ends the stream with a Normal Closure (1000). A close frame without a
    // code reads as 1005 ("no status") on the client, and kubectl then fails the whole
    // exec with `error reading from error stream` however the command exited.
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("echo%20hi"), "echo hi");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%2Fbin%2Fsh"), "/bin/sh");
    }
}
