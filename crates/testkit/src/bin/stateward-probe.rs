//! `stateward-probe`: a small program that stands in for "the project's image" in the
//! local cluster's own tests. Each subcommand does one observable thing.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stateward-probe")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sleep until SIGTERM (exit 0) or for the given seconds.
    Sleep {
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Serve HTTP: `/healthz` answers ok, everything else answers the text (default: hostname).
    Serve {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long)]
        text: Option<String>,
    },
    /// GET a plain-HTTP URL (`http://host:port/path`) and print the body.
    Fetch { url: String },
    /// Write content to a file (creating parent directories).
    Write { path: PathBuf, content: String },
    /// Print a file.
    Read { path: PathBuf },
    /// Print the total size in bytes of the filesystem holding the path.
    Df { path: PathBuf },
    /// Print an environment variable (exit 1 when unset).
    Env { name: String },
    /// Write a termination message, then exit with the code.
    Exit {
        code: i32,
        #[arg(long)]
        message: Option<String>,
        #[arg(long, default_value = "/dev/termination-log")]
        message_path: PathBuf,
    },
    /// GET an API path in-cluster with the pod's projected token; prints `HTTP <code>`.
    Kube { path: String },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Sleep { seconds } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let forever = std::time::Duration::from_secs(seconds.unwrap_or(u64::MAX / 4));
                tokio::select! {
                    _ = term.recv() => println!("SIGTERM received, exiting"),
                    _ = tokio::time::sleep(forever) => {}
                }
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Cmd::Serve { port, text } => serve(port, text)?,
        Cmd::Fetch { url } => {
            let rest = url.strip_prefix("http://").context("only http:// URLs")?;
            let (hostport, path) = rest
                .split_once('/')
                .map(|(h, p)| (h, format!("/{p}")))
                .unwrap_or((rest, "/".into()));
            let mut stream = std::net::TcpStream::connect(hostport)
                .with_context(|| format!("connecting to {hostport}"))?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            // One write: a request split over segments could be answered half-read.
            stream
                .write_all(format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b)
                .unwrap_or("");
            print!("{body}");
        }
        Cmd::Write { path, content } => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).ok();
            }
            std::fs::write(&path, content)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Cmd::Read { path } => {
            let data =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            std::io::stdout().write_all(&data)?;
        }
        Cmd::Df { path } => {
            let stat = nix::sys::statvfs::statvfs(&path)
                .with_context(|| format!("statvfs {}", path.display()))?;
            println!("{}", stat.blocks() as u64 * stat.fragment_size() as u64);
        }
        Cmd::Env { name } => match std::env::var(&name) {
            Ok(v) => println!("{v}"),
            Err(_) => bail!("{name} is not set"),
        },
        Cmd::Exit {
            code,
            message,
            message_path,
        } => {
            if let Some(m) = message {
                std::fs::write(&message_path, &m).ok();
                eprintln!("{m}");
            }
            std::process::exit(code);
        }
        Cmd::Kube { path } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let config = kube::Config::incluster().context("in-cluster config")?;
                let client = kube::Client::try_from(config)?;
                let request = http::Request::get(&path).body(Vec::new())?;
                match client.request_text(request).await {
                    Ok(body) => {
                        println!("HTTP 200");
                        println!("{body}");
                    }
                    Err(kube::Error::Api(status)) => {
                        println!("HTTP {}", status.code);
                        println!("{}", status.message);
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok::<_, anyhow::Error>(())
            })?;
        }
    }
    Ok(())
}

fn serve(port: u16, text: Option<String>) -> Result<()> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("binding port {port}"))?;
    let text = text.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    println!("serving on port {port}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Read the whole request head: closing with unread bytes would reset the connection.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let request = String::from_utf8_lossy(&head);
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        let body = if path == "/healthz" {
            "ok".to_string()
        } else {
            text.clone()
        };
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
    Ok(())
}
