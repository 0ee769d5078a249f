//! Hooks: a command run in the app container through the API's exec, with a timeout —
//! the backup controller's pre- and post-backup hooks and the scaling controller's
//! pre-scale-down hook. Callers record the result in status so a restarted manager never
//! runs a hook twice.
//!
//! A pre-hook with `holdUntilPostHook` keeps its session: its stdin stays open while the
//! data is copied, and is closed (end of input) when the copy is done, before the
//! post-hooks. The command holds whatever it took (a read lock) until it reads end of
//! input, e.g. `psql` reading from stdin, or `sh -c '...; cat >/dev/null; ...'`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::AttachParams;
use stateward_api::statefulapp::Hook;
use tokio::io::AsyncReadExt;

/// How much output is kept for the status message.
const OUTPUT_TAIL: usize = 512;

/// Runs `hook` in `pod`; `Ok(())` when it exited 0 in time, otherwise a sentence.
pub async fn run(pods: &Api<Pod>, pod: &str, hook: &Hook) -> Result<(), String> {
    let timeout = Duration::from_secs(u64::try_from(hook.timeout_seconds.max(1)).unwrap_or(60));
    match tokio::time::timeout(timeout, exec(pods, pod, hook)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!(
            "hook {} did not finish within {}s in pod {pod}",
            hook.name, hook.timeout_seconds
        )),
    }
}

async fn exec(pods: &Api<Pod>, pod: &str, hook: &Hook) -> Result<(), String> {
    let (status, _, err) = capture(pods, pod, hook.container.as_deref(), hook.command.clone())
        .await
        .map_err(|e| format!("hook {} could not start in pod {pod}: {e}", hook.name))?;
    match status {
        Some(s) if s.status.as_deref() == Some("Success") => Ok(()),
        Some(s) => {
            let text = String::from_utf8_lossy(&err);
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(OUTPUT_TAIL)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let mut message = format!(
                "hook {} failed in pod {pod}: {}",
                hook.name,
                s.message.unwrap_or_else(|| "non-zero exit".into())
            );
            if !tail.is_empty() {
                message.push_str(&format!("; stderr: {tail}"));
            }
            Err(message)
        }
        None => Err(format!(
            "hook {} in pod {pod} ended without an exit status",
            hook.name
        )),
    }
}

/// Runs `command` in `pod` (its `container`, or the default one) and collects its exit
/// status, standard output and standard error. Callers bound the time.
async fn capture(
    pods: &Api<Pod>,
    pod: &str,
    container: Option<&str>,
    command: Vec<String>,
) -> Result<
    (
        Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
        Vec<u8>,
        Vec<u8>,
    ),
    kube::Error,
> {
    let mut params = AttachParams::default()
        .stdin(false)
        .stdout(true)
        .stderr(true);
    if let Some(container) = container {
        params = params.container(container);
    }
    let mut process = pods.exec(pod, command, &params).await?;
    let stdout = process.stdout();
    let stderr = process.stderr();
    let status = process.take_status();
    let drain = |reader: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| async move {
        let mut out = Vec::new();
        if let Some(mut reader) = reader {
            let _ = reader.read_to_end(&mut out).await;
        }
        out
    };
    let (out, err) = tokio::join!(
        drain(stdout.map(|r| Box::new(r) as Box<_>)),
        drain(stderr.map(|r| Box::new(r) as Box<_>))
    );
    let status = match status {
        Some(status) => status.await,
        None => None,
    };
    let _ = process.join().await;
    Ok((status, out, err))
}

/// Runs a short read-only `command` in `container` of `pod` and returns its standard
/// output, or a sentence saying why not (it did not start, failed, or outlived
/// `timeout`).
pub async fn output(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    command: Vec<String>,
    timeout: Duration,
) -> Result<String, String> {
    let shown = command.join(" ");
    match tokio::time::timeout(timeout, capture(pods, pod, Some(container), command)).await {
        Err(_) => Err(format!(
            "`{shown}` in pod {pod} did not finish within {}s",
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("`{shown}` could not start in pod {pod}: {e}")),
        Ok(Ok((Some(s), out, _))) if s.status.as_deref() == Some("Success") => {
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        Ok(Ok((status, _, err))) => {
            let err = String::from_utf8_lossy(&err);
            let tail: String = err.trim().chars().take(OUTPUT_TAIL).collect();
            Err(format!(
                "`{shown}` failed in pod {pod}: {}{}",
                status
                    .and_then(|s| s.message)
                    .unwrap_or_else(|| "no exit status".into()),
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {tail}")
                }
            ))
        }
    }
}

/// The exit status of an exec session, to be awaited later.
type StatusFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
            > + Send,
    >,
>;

/// A pre-hook session held open while the data is copied.
pub struct Held {
    /// `<hook>@<pod>`.
    pub name: String,
    timeout: Duration,
    stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    status: Option<
        std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
                    > + Send,
            >,
        >,
    >,
    _process: kube::api::AttachedProcess,
}

/// How long a held hook may take to prove it started well (exit early non-zero).
const SETTLE: Duration = Duration::from_secs(2);

/// Starts `hook` in `pod` and keeps its session. `Ok(Some)` when it is holding, `Ok(None)`
/// when it already finished successfully, `Err` when it failed.
pub async fn hold(pods: &Api<Pod>, pod: &str, hook: &Hook) -> Result<Option<Held>, String> {
    let mut params = AttachParams::default()
        .stdin(true)
        .stdout(false)
        .stderr(false);
    if let Some(container) = &hook.container {
        params = params.container(container.clone());
    }
    let mut process = pods
        .exec(pod, hook.command.clone(), &params)
        .await
        .map_err(|e| format!("hook {} could not start in pod {pod}: {e}", hook.name))?;
    let stdin = process
        .stdin()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
    let mut status: Option<StatusFuture> =
        process.take_status().map(|s| Box::pin(s) as StatusFuture);
    if let Some(fut) = status.as_mut() {
        match tokio::time::timeout(SETTLE, fut).await {
            Ok(Some(s)) if s.status.as_deref() == Some("Success") => return Ok(None),
            Ok(Some(s)) => {
                return Err(format!(
                    "hook {} failed in pod {pod}: {}",
                    hook.name,
                    s.message.unwrap_or_else(|| "non-zero exit".into())
                ));
            }
            Ok(None) => {
                return Err(format!(
                    "hook {} in pod {pod} ended without an exit status",
                    hook.name
                ));
            }
            Err(_) => {}
        }
    }
    Ok(Some(Held {
        name: format!("{}@{pod}", hook.name),
        timeout: Duration::from_secs(u64::try_from(hook.timeout_seconds.max(1)).unwrap_or(60)),
        stdin,
        status,
        _process: process,
    }))
}

impl Held {
    /// Closes the session's stdin and waits for the command to end. An error means the
    /// hold did not end cleanly (so what it protected may not have been held throughout).
    pub async fn release(mut self) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.shutdown().await;
        }
        let Some(status) = self.status.take() else {
            return Err(format!("hook {}: no exit status", self.name));
        };
        match tokio::time::timeout(self.timeout, status).await {
            Ok(Some(s)) if s.status.as_deref() == Some("Success") => Ok(()),
            Ok(Some(s)) => Err(format!(
                "held hook {} failed: {}",
                self.name,
                s.message.unwrap_or_else(|| "non-zero exit".into())
            )),
            Ok(None) => Err(format!(
                "held hook {} ended without an exit status",
                self.name
            )),
            Err(_) => Err(format!(
                "held hook {} did not end within {}s after its input was closed",
                self.name,
                self.timeout.as_secs()
            )),
        }
    }
}
