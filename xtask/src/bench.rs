//! `cargo xtask bench backup`: the agent against restic on the same data and the same S3
//! server, plus the local bound (`tar | zstd -1 > /dev/null`) and the agent's peak RSS at
//! two data sizes. `cargo xtask bench restore`: the same data set restored by the agent
//! (`restore-volume`: download, both checksums, unpack into staging, journaled swap) and
//! by restic (`restore latest`), each into an empty directory, then compared with the
//! source (`diff -r`, not timed). They print figures; they assert nothing (these
//! machines are noisy).
//!
//! Measured per run: wall time, MB/s of source data, CPU seconds (user + system of the
//! process and its children, from `getrusage`), and peak RSS (the process's `VmHWM`,
//! sampled every 20 ms). The agent is the release build of `stateward`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::resource::{UsageWho, getrusage};
use rand::{Rng, RngCore, SeedableRng};

use crate::testenv::{self, Env};

const MIB: u64 = 1 << 20;

#[derive(clap::Args, Debug)]
pub struct BackupBench {
    /// Size of the main data set in MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Also measure the agent's peak RSS at 1 GiB and 4 GiB (needs about 5 GiB of disk).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    rss_scaling: bool,
}

struct Measured {
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

fn children_cpu() -> f64 {
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// A KiB field of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`).
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `cmd`, sampling its peak RSS until it exits.
fn measure(what: &str, cmd: &mut Command) -> Result<Measured> {
    let cpu_before = children_cpu();
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(child.id()) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(Measured {
        seconds,
        cpu_seconds: children_cpu() - cpu_before,
        peak_rss_mib: peak as f64 / 1024.0,
    })
}

/// A data set of `size` bytes: about 40% in many small files (1–64 KiB), the rest in
/// large files (up to 256 MiB); half of the bytes compressible (text-like), half random.
/// Deterministic (seeded), reused when present.
fn generate(dir: &Path, size: u64) -> Result<()> {
    let done = dir.join(".complete");
    if done.exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(size);
    let words: Vec<String> = (0..4096)
        .map(|i| format!("word{i:04}-{}", ["alpha", "beta", "gamma", "delta"][i % 4]))
        .collect();
    let fill = |buf: &mut Vec<u8>, len: usize, compressible: bool, rng: &mut rand::rngs::StdRng| {
        buf.clear();
        if compressible {
            while buf.len() < len {
                let w = &words[rng.random_range(0..words.len())];
                buf.extend_from_slice(w.as_bytes());
                buf.push(if rng.random_range(0..12) == 0 {
                    b'\n'
                } else {
                    b' '
                });
            }
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
            rng.fill_bytes(buf);
        }
    };
    let small_budget = size * 2 / 5;
    let mut written = 0u64;
    let mut buf = Vec::with_capacity(8 << 20);
    let mut n = 0u64;
    while written < small_budget {
        let len = rng.random_range(1024..64 * 1024) as usize;
        let sub = dir.join(format!("small/{:03}", n / 500));
        if n.is_multiple_of(500) {
            std::fs::create_dir_all(&sub)?;
        }
        fill(&mut buf, len, n.is_multiple_of(2), &mut rng);
        std::fs::write(sub.join(format!("f{n:06}.dat")), &buf)?;
        written += len as u64;
        n += 1;
    }
    let mut large = 0u32;
    while written < size {
        let len = (size - written).min(256 * MIB);
        let mut file = std::io::BufWriter::new(std::fs::File::create(
            dir.join(format!("large-{large:02}.bin")),
        )?);
        let mut left = len;
        while left > 0 {
            let chunk = left.min(8 * MIB) as usize;
            fill(&mut buf, chunk, large.is_multiple_of(2), &mut rng);
            file.write_all(&buf)?;
            left -= chunk as u64;
        }
        file.flush()?;
        written += len;
        large += 1;
    }
    std::fs::write(done, format!("{n} small files, {large} large files\n"))?;
    Ok(())
}

pub(crate) fn release_agent() -> Result<PathBuf> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(crate::repo_root())
        .args(["build", "--release", "-p", "stateward-manager"])
        .status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(testenv::target_dir().join("release/stateward"))
}

fn rate(bytes: u64, m: &Measured) -> f64 {
    bytes as f64 / MIB as f64 / m.seconds.max(1e-9)
}

fn print_row(name: &str, bytes: u64, m: &Measured) {
    println!(
        "  {name:<28} {:>8.1} s {:>9.1} MB/s {:>8.1} CPU s {:>9.1} MiB peak RSS",
        m.seconds,
        rate(bytes, m),
        m.cpu_seconds,
        m.peak_rss_mib
    );
}

async fn empty_bucket(env: &Env, bucket: &str) -> Result<()> {
    let s3 = stateward_agent::cli::s3_client_with(
        &env.s3_access_key,
        &env.s3_secret_key,
        Some(&env.s3_endpoint),
        &env.s3_region,
        true,
        false,
    );
    if s3.head_bucket().bucket(bucket).send().await.is_err() {
        s3.create_bucket().bucket(bucket).send().await?;
        return Ok(());
    }
    loop {
        let listed = s3.list_objects_v2().bucket(bucket).send().await?;
        let keys: Vec<String> = listed
            .contents()
            .iter()
            .filter_map(|o| o.key().map(String::from))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            s3.delete_object().bucket(bucket).key(key).send().await?;
        }
    }
}

/// restic against the bench bucket's repository, with its credentials.
fn restic(env: &Env, work: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("restic");
    cmd.env("AWS_ACCESS_KEY_ID", &env.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &env.s3_secret_key)
        .env("RESTIC_PASSWORD", "bench")
        .env("RESTIC_CACHE_DIR", work.join("restic-cache"))
        .arg("-r")
        .arg(format!("s3:{}/bench/restic", env.s3_endpoint))
        .arg("--quiet")
        .args(args);
    cmd
}

fn agent_cmd(agent: &Path, env: &Env, source: &Path, key: &str) -> Command {
    let mut cmd = Command::new(agent);
    cmd.args(["agent", "backup-volume", "--source"])
        .arg(source)
        .args([
            "--bucket",
            "bench",
            "--key",
            key,
            "--endpoint",
            &env.s3_endpoint,
            "--force-path-style",
        ])
        .env("AWS_ACCESS_KEY_ID", &env.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &env.s3_secret_key)
        .env("RUST_LOG", "warn");
    cmd
}

pub fn backup(args: BackupBench) -> Result<()> {
    crate::deps::ensure()?;
    let env = testenv::up()?;
    println!("xtask bench: building the release agent");
    let agent = release_agent()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let work = testenv::target_dir().join("bench");
    let size = args.size_mib * MIB;
    let data = work.join(format!("data-{}m", args.size_mib));
    println!(
        "xtask bench: data set of {} MiB in {}",
        args.size_mib,
        data.display()
    );
    generate(&data, size)?;
    runtime.block_on(empty_bucket(&env, "bench"))?;

    println!(
        "\nbackup of {} MiB (40% small files, half compressible), {} cores",
        args.size_mib,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let bound = measure(
        "tar | zstd -1",
        Command::new("sh").arg("-c").arg(format!(
            "tar -C {} -cf - . | zstd -1 -T0 -q -c > /dev/null",
            data.display()
        )),
    )?;
    print_row("local bound: tar | zstd -1", size, &bound);
    let agent_run = measure(
        "the agent",
        &mut agent_cmd(&agent, &env, &data, "agent/data.tar.zst"),
    )?;
    print_row("stateward agent", size, &agent_run);
    measure("restic init", &mut restic(&env, &work, &["init"]))?;
    let restic_run = measure("restic backup", restic(&env, &work, &["backup"]).arg(&data))?;
    print_row("restic backup", size, &restic_run);
    println!(
        "  agent / restic: {:.2}x the throughput, {:.2}x the CPU, {:.2}x the peak RSS",
        restic_run.seconds / agent_run.seconds,
        agent_run.cpu_seconds / restic_run.cpu_seconds.max(1e-9),
        agent_run.peak_rss_mib / restic_run.peak_rss_mib.max(1e-9)
    );
    runtime.block_on(empty_bucket(&env, "bench"))?;

    if args.rss_scaling {
        println!("\nagent peak RSS by data size (flat means memory does not grow with data)");
        for mib in [1024u64, 4096] {
            let dir = work.join(format!("data-{mib}m"));
            generate(&dir, mib * MIB)?;
            let m = measure(
                "the agent",
                &mut agent_cmd(&agent, &env, &dir, &format!("agent/{mib}.tar.zst")),
            )?;
            print_row(&format!("agent, {mib} MiB"), mib * MIB, &m);
            runtime.block_on(empty_bucket(&env, "bench"))?;
        }
    }
    println!(
        "\nxtask bench: data sets stay in {} for the next run (delete to free the disk)",
        work.display()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct RestoreBench {
    /// Size of the data set in MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
}

/// The agent's backup summary (its stdout), which the restore needs as the manifest would
/// give it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentSummary {
    files: u64,
    bytes_read: u64,
    sha256: String,
    segments: u32,
    #[serde(default)]
    content_sha256: String,
}

pub fn restore(args: RestoreBench) -> Result<()> {
    crate::deps::ensure()?;
    let env = testenv::up()?;
    println!("xtask bench: building the release agent");
    let agent = release_agent()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let work = testenv::target_dir().join("bench");
    let size = args.size_mib * MIB;
    let data = work.join(format!("data-{}m", args.size_mib));
    println!(
        "xtask bench: data set of {} MiB in {}",
        args.size_mib,
        data.display()
    );
    generate(&data, size)?;
    runtime.block_on(empty_bucket(&env, "bench"))?;

    println!("xtask bench: backing the data set up with the agent and with restic (not timed)");
    let key = "agent/data.tar.zst";
    let out = agent_cmd(&agent, &env, &data, key)
        .output()
        .context("running the agent backup")?;
    if !out.status.success() {
        bail!(
            "the agent backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let summary: AgentSummary = serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .find(|l| l.starts_with(b"{"))
            .unwrap_or_default(),
    )
    .context("reading the agent's backup summary")?;
    let restic = |args: &[&str]| restic(&env, &work, args);
    measure("restic init", &mut restic(&["init"]))?;
    measure("restic backup", restic(&["backup"]).arg(&data))?;

    let agent_target = work.join("restore-agent");
    let restic_target = work.join("restore-restic");
    for dir in [&agent_target, &restic_target] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
    }
    println!(
        "\nrestore of {} MiB (40% small files, half compressible; {} files), {} cores, into an empty directory",
        args.size_mib,
        summary.files,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut agent_restore = Command::new(&agent);
    agent_restore
        .args(["agent", "restore-volume", "--target"])
        .arg(&agent_target)
        .args([
            "--restore-id",
            "bench",
            "--bytes",
            &summary.bytes_read.to_string(),
        ])
        .args(["--files", &summary.files.to_string()])
        .args(["--key", key, "--segments", &summary.segments.to_string()])
        .args(["--sha256", &summary.sha256])
        .args([
            "--bucket",
            "bench",
            "--endpoint",
            &env.s3_endpoint,
            "--force-path-style",
        ])
        .env("AWS_ACCESS_KEY_ID", &env.s3_access_key)
        .env("AWS_SECRET_ACCESS_KEY", &env.s3_secret_key)
        .env("RUST_LOG", "warn");
    if !summary.content_sha256.is_empty() {
        agent_restore.args(["--content-sha256", &summary.content_sha256]);
    }
    // Both start with nothing dirty in the page cache (the S3 server just wrote both
    // backups to this file system), so neither pays for the other's writeback.
    Command::new("sync").status()?;
    let agent_run = measure("the agent restore", &mut agent_restore)?;
    print_row("stateward agent", size, &agent_run);
    Command::new("sync").status()?;
    let restic_run = measure(
        "restic restore",
        restic(&["restore", "latest", "--target"]).arg(&restic_target),
    )?;
    print_row("restic restore", size, &restic_run);
    // The agent makes the data durable (syncfs) before its journal says the swap may
    // start; restic does not sync. The same restore followed by `sync` compares like with
    // like.
    let _ = std::fs::remove_dir_all(&restic_target);
    std::fs::create_dir_all(&restic_target)?;
    Command::new("sync").status()?;
    let restic_again = measure(
        "restic restore",
        restic(&["restore", "latest", "--target"]).arg(&restic_target),
    )?;
    let sync = measure("sync", &mut Command::new("sync"))?;
    let restic_durable = Measured {
        seconds: restic_again.seconds + sync.seconds,
        cpu_seconds: restic_again.cpu_seconds + sync.cpu_seconds,
        peak_rss_mib: restic_again.peak_rss_mib,
    };
    print_row("restic restore + sync", size, &restic_durable);
    for (against, run) in [("restic", &restic_run), ("restic + sync", &restic_durable)] {
        println!(
            "  agent / {against}: {:.2}x the throughput, {:.2}x the CPU, {:.2}x the peak RSS",
            run.seconds / agent_run.seconds,
            agent_run.cpu_seconds / run.cpu_seconds.max(1e-9),
            agent_run.peak_rss_mib / run.peak_rss_mib.max(1e-9)
        );
    }
    // Both restores must be the data set, or the figures mean nothing.
    let restic_tree = restic_target.join(data.strip_prefix("/").unwrap_or(&data));
    for (name, tree) in [("agent", agent_target.clone()), ("restic", restic_tree)] {
        let status = Command::new("diff")
            .arg("-rq")
            .arg(&data)
            .arg(&tree)
            .status()?;
        if !status.success() {
            bail!(
                "the {name} restore differs from the data set (diff -rq {} {})",
                data.display(),
                tree.display()
            );
        }
        println!("  {name}: identical to the data set (diff -rq)");
    }
    for dir in [&agent_target, &restic_target] {
        let _ = std::fs::remove_dir_all(dir);
    }
    runtime.block_on(empty_bucket(&env, "bench"))?;
    Ok(())
}
