//! Pre- and post-backup hooks: a command run in the app container through the API's
//! exec, with a timeout. The result is recorded in status so a restarted manager never
//! runs a hook twice.

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
    let mut params = AttachParams::default()
        .stdin(false)
        .stdout(true)
        .stderr(true);
    if let Some(container) = &hook.container {
        params = params.container(container.clone());
    }
    let mut process = pods
        .exec(pod, hook.command.clone(), &params)
        .await
        .map_err(|e| format!("hook {} could not start in pod {pod}: {e}", hook.name))?;
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
    let (_, err) = tokio::join!(
        drain(stdout.map(|r| Box::new(r) as Box<_>)),
        drain(stderr.map(|r| Box::new(r) as Box<_>))
    );
    let status = match status {
        Some(status) => status.await,
        None => None,
    };
    let _ = process.join().await;
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
